"""One MoE block as an IR graph (embed -> norm -> one MoE layer -> lm_head): the dispatch tests and benchmark."""

from __future__ import annotations

from typing import Any


def moe_block_graph(hidden: int, inter: int, experts: int, top_k: int, bits: int = 4, vocab: int = 256,
                    seed: int = 0) -> Any:
    """embed -> norm -> one MoE layer (random weights, RTN-quantized to ``bits``, group 32) -> lm_head."""
    import torch

    from ..ir.graph import Graph
    from ..ir.weights import WeightStore
    from ..passes.base import PassContext
    from ..passes.quantize import QuantizePass

    gen = torch.Generator().manual_seed(seed)
    store = WeightStore()

    def w(key, *shape, std=0.02):
        store.add(key, torch.randn(*shape, generator=gen) * std)
        return key

    g = Graph({"family": "bench", "hidden_size": hidden, "vocab_size": vocab, "num_layers": 1,
               "num_experts": experts, "top_k": top_k}, store)
    g.add("tokens", "input")
    g.add("embed", "embed", ["tokens"], {"weight": w("emb", vocab, hidden, std=1.0)})
    g.add("norm", "norm", ["embed"], {"weight": w("norm", hidden)}, eps=1e-6)
    g.add("router", "router", ["norm"], {"weight": w("router", experts, hidden, std=0.1)}, layer=0,
          num_experts=experts, top_k=top_k, norm_topk_prob=False)
    for e in range(experts):
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        g.add(f"E{e}", "expert", ["norm", "router"], {r: w(f"E{e}.{r}", *s) for r, s in shapes.items()},
              layer=0, expert=e)
    g.add("combine", "combine", ["router"] + [f"E{e}" for e in range(experts)], layer=0)
    g.add("res", "add", ["embed", "combine"])
    g.add("lm_head", "lm_head", ["res"], {"weight": w("head", vocab, hidden)})
    for n in g.experts():
        g.annotate(n.id, "bits", bits)
    QuantizePass(group_size=32).call(g, PassContext(progress=False))
    return g

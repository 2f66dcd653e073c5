import pytest
import torch
from dmpq_compile.passes import PassContext, make_pass

from dmpq_compile.frontend import load


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_counts_match_transformers_router_logits(family, tiny_dirs, calib_ids):
    from transformers import AutoModelForCausalLM

    path = tiny_dirs(family)
    ids = calib_ids(family)
    g = make_pass("profile").call(load(path), PassContext(calibration=ids, progress=False)).graph
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    k, n_exp = g.meta["top_k"], g.meta["num_experts"]
    for layer, logits in enumerate(router_logits):
        top = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices
        expected = torch.bincount(top.reshape(-1), minlength=n_exp)
        got = [g.node(f"L{layer}.E{e}").ann["tokens"] for e in range(n_exp)]
        assert got == expected.tolist()
        freqs = [g.node(f"L{layer}.E{e}").ann["freq"] for e in range(n_exp)]
        assert sum(freqs) == pytest.approx(k)
        masses = [g.node(f"L{layer}.E{e}").ann["mass"] for e in range(n_exp)]
        if g.node(f"L{layer}.router").attrs["norm_topk_prob"]:
            assert sum(masses) == pytest.approx(1.0)
        routing = g.node(f"L{layer}.router").ann["routing"]
        assert 0 < routing["load_entropy"] <= routing["max_entropy"] + 1e-9

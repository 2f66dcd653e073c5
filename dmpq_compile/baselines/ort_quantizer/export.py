"""``torch.onnx`` (dynamo) export of a causal LM with the runtime's KV-cache interface."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...backends.onnx_lowering import KVSpec
from .config import BaselineError

log = logging.getLogger(__name__)


class CachedCausalLM(nn.Module):
    """``(input_ids, ((past_k, past_v), ...)) -> (logits, present_k0, present_v0, ...)``.

    Holds the causal LM's decoder as ``model`` and its head as ``lm_head``, so parameter names
    stay ``model.layers.{l}...`` as in the checkpoint. Positions continue from the past length.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.model = lm.model
        self.lm_head = lm.lm_head
        self._config = lm.config

    def forward(self, input_ids: torch.Tensor, past: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> tuple:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(past), config=self._config)
        start = past[0][0].shape[2]
        positions = (torch.arange(input_ids.shape[1], device=input_ids.device) + start).unsqueeze(0)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(out.last_hidden_state), *presents)


def load_export_model(model_dir: str | Path) -> nn.Module:
    """The checkpoint as a transformers causal LM in fp32 with eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise BaselineError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True)
    for attr in ("model", "lm_head"):
        if not hasattr(model, attr):
            raise BaselineError(f"{type(model).__name__} has no .{attr}; this baseline exports decoder-only "
                                "causal LMs laid out as model + lm_head")
    return model.eval()


def kv_specs(config: Any) -> list[KVSpec]:
    """Names and shapes of the KV-cache inputs/outputs of the exported model, per layer."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return [KVSpec(layer=l, past_key=f"past_key_values.{l}.key", past_value=f"past_key_values.{l}.value",
                   present_key=f"present.{l}.key", present_value=f"present.{l}.value",
                   num_kv_heads=kv_heads, head_dim=head_dim)
            for l in range(int(config.num_hidden_layers))]


def _trace_inputs(config: Any, specs: list[KVSpec], seed: int) -> tuple[torch.Tensor, tuple]:
    """Random tracing inputs: batch 2, 7 new tokens after 5 cached positions (all sizes >= 2,
    so torch.export keeps every dimension symbolic)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    ids = torch.randint(0, int(config.vocab_size), (2, 7), generator=gen)
    past = tuple((torch.randn(2, s.num_kv_heads, 5, s.head_dim, generator=gen),
                  torch.randn(2, s.num_kv_heads, 5, s.head_dim, generator=gen)) for s in specs)
    return ids, past


def export_cached_lm(model: nn.Module, path: str | Path, opset: int = 21, seed: int = 0) -> list[KVSpec]:
    """``torch.onnx.export(dynamo=True)`` of ``CachedCausalLM(model)`` to ``path`` (weights in
    ``path.data``). Call :func:`make_experts_exportable` first.

    Returns:
        The KV-cache specs (input/output names, kv heads, head dim) of the exported graph.
    """
    from torch.export import Dim

    specs = kv_specs(model.config)
    wrapper = CachedCausalLM(model).eval()
    ids, past = _trace_inputs(model.config, specs, seed)
    batch, seq, past_len = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "past": tuple(({0: batch, 2: past_len}, {0: batch, 2: past_len})
                                                              for _ in specs)}
    names_in = ["input_ids"] + [n for s in specs for n in (s.past_key, s.past_value)]
    names_out = ["logits"] + [n for s in specs for n in (s.present_key, s.present_value)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.onnx.export(wrapper, (ids, past), dynamo=True, dynamic_shapes=dynamic,
                                        opset_version=opset, input_names=names_in, output_names=names_out,
                                        optimize=True, verbose=False)
    except Exception as e:  # torch.export / torch.onnx raise many exception types
        raise BaselineError(f"torch.onnx.export failed for {type(model).__name__}: {str(e)[:2000]}") from e
    program.save(str(path), external_data=True)
    log.info("exported %s in %.1fs", path, time.perf_counter() - t0)
    return specs


"""Peer baseline: ONNX Runtime's own weight quantizer on a ``torch.onnx`` export of the same model.

:func:`build_ort_quantizer_baseline` runs these steps:

1. Load the checkpoint with transformers (fp32, eager attention). Record reference logits on
   validation inputs *before* anything is changed.
2. Replace every fused experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
   with :class:`GatherExperts`. It loops over *all* experts in a fixed order; each expert picks
   its tokens with ``nonzero``, runs its two projections as separate 2-D ``[K, N]`` weights and
   scatter-adds the weighted result. transformers 5's own implementations do not fit:

   * ``eager`` loops over the experts *hit by the input*: data-dependent Python control flow,
     so a trace keeps only the experts that the tracing input reached;
   * ``grouped_mm`` (the CPU default) exports to ``transformers::grouped_mm_fallback``, which
     ``torch.onnx`` cannot translate;
   * ``batched_mm`` gathers rows of 3-D weight tensors, which ``MatMulNBitsQuantizer`` leaves
     in fp32 (it quantizes only MatMuls whose weight is a constant 2-D tensor).

3. Export with ``torch.onnx.export(..., dynamo=True)``. The wrapper has the runtime's KV-cache
   interface (``input_ids``, ``past_key_values.{l}.key|value`` -> ``logits``,
   ``present.{l}.key|value``), with dynamic batch, sequence and past lengths. Tracing uses
   random inputs unrelated to the validation inputs.
4. Check the exported graph in onnxruntime against the reference logits: one full pass, then
   a prefill followed by one-token decode steps. The batch size, lengths and tokens differ
   from the trace. A graph that is correct only for its tracing input fails here with
   :class:`ExportMismatchError`.
5. Run ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``: the
   ``DEFAULT`` (min/max round-to-nearest) or ``HQQ`` algorithm, with the block size, the
   symmetric flag and the accuracy level. ``scope="all"`` quantizes every MatMul that has a
   constant weight (the tool's default); ``scope="experts"`` quantizes only the expert
   MatMuls, the same tensors that dmpq-compile quantizes.
6. Write an ``ort-cpu`` artifact through :func:`dmpq_compile.artifact.write_artifact`: the
   manifest, a report with routing frequencies from the ``profile`` statistics, and the
   tokenizer. ``dmpq_compile.runtime.load`` and ``dmpq-compile bench`` run it like a compiled
   artifact.
"""

from __future__ import annotations

import gc
import logging
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..backends.base import Backend
from ..backends.onnx_io import DATA_FILE, MODEL_FILE, initializer_bytes, save_model, use_external
from ..backends.onnx_lowering import KVSpec

log = logging.getLogger(__name__)

ALGOS = ("default", "hqq")
SCOPES = ("all", "experts")
QUANT_BITS = (2, 4, 8)
EXPORT_ONLY = 16  # bits=16: export without quantizing (an fp32 torch.onnx artifact)
BLOCK_SIZES = (16, 32, 64, 128, 256)
_EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(?:[\w.]*\.)?experts\.(\d+)\.(gate_up|down)$")


class BaselineError(RuntimeError):
    """The baseline cannot be built for this model or these settings; the message says why."""


class ExportMismatchError(BaselineError):
    """The exported ONNX graph computes other logits than the PyTorch model it came from."""


@dataclass(frozen=True)
class OrtQuantizerConfig:
    """Settings of the ORT-quantizer peer baseline.

    Defaults follow dmpq-compile's ``ort-cpu`` defaults (group size 64, asymmetric codes,
    ``accuracy_level`` 4), so that the peer and a compiled artifact differ only in the graph
    and the rounding. ORT's own defaults are block size 128 and ``accuracy_level`` unset (0).
    """

    bits: int = 4  # 2, 4 or 8; 16 = export only, no quantization
    block_size: int = 64
    is_symmetric: bool = False
    accuracy_level: int = 4  # MatMulNBits accuracy_level: 0 = fp32 activations, 4 = int8 activations
    algo: str = "default"  # "default" (RTN-style min/max) or "hqq"
    scope: str = "all"  # "all" MatMuls with constant weights, or "experts" only
    opset: int = 21
    calib_corpus: str | None = "pydoc"  # text for the routing-frequency profile; None: assume uniform
    calib_sequences: int = 32
    seq_len: int = 128
    tolerance: float = 1e-4  # export check: max |onnx - torch| <= tolerance * max(1, max |torch|)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS + (EXPORT_ONLY,):
            raise BaselineError(f"bits must be one of {QUANT_BITS} (MatMulNBits) or {EXPORT_ONLY} (export only), "
                                f"got {self.bits!r}")
        if self.block_size not in BLOCK_SIZES:
            raise BaselineError(f"block_size must be one of {BLOCK_SIZES} (a power of two >= 16, which "
                                f"MatMulNBits needs), got {self.block_size!r}")
        if self.algo not in ALGOS:
            raise BaselineError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.scope not in SCOPES:
            raise BaselineError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise BaselineError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        if self.algo == "hqq" and self.is_symmetric:
            raise BaselineError("ORT's HQQ quantizer has no symmetric mode; drop is_symmetric / --symmetric")
        if not self.tolerance > 0:
            raise BaselineError(f"tolerance must be > 0, got {self.tolerance!r}")


# -- export-friendly experts -----------------------------------------------------------------------
class _ExpertWeights(nn.Module):
    """One expert's projections as ``[K, N]`` weights: ``gate_up [H, 2I]`` and ``down [I, H]``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)


class GatherExperts(nn.Module):
    """Drop-in replacement for transformers 5's fused experts that exports correctly.

    Same call as the original module: ``(hidden_states [N, H], top_k_index [N, k],
    top_k_weights [N, k]) -> [N, H]``. The loop runs over all experts (static), and only the
    number of tokens per expert depends on the data. Expert ``e``'s weights are the submodule
    ``str(e)``, so parameters are named ``...experts.{e}.gate_up`` / ``.down``.
    """

    def __init__(self, experts: list[_ExpertWeights], act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = len(experts)
        for e, weights in enumerate(experts):
            self.add_module(str(e), weights)
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, module: nn.Module) -> GatherExperts:
        """Split a fused experts module into per-expert transposed weights (copies)."""
        _check_fused_layout(module)
        experts = [_ExpertWeights(module.gate_up_proj[e].detach().t().contiguous(),
                                  module.down_proj[e].detach().t().contiguous())
                   for e in range(module.gate_up_proj.shape[0])]
        return cls(experts, module.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            weights = getattr(self, str(e))
            token, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            x = hidden_states.index_select(0, token)
            gate, up = torch.matmul(x, weights.gate_up).chunk(2, dim=-1)
            y = torch.matmul(self.act_fn(gate) * up, weights.down)
            y = y * top_k_weights[token, slot].unsqueeze(-1).to(y.dtype)
            out = out.index_add(0, token, y.to(out.dtype))
        return out


def _check_fused_layout(module: nn.Module) -> None:
    expected = {"is_transposed": False, "has_bias": False, "has_gate": True, "has_post_expert_norm": False,
                "is_concatenated": True, "_is_expert_parallel": False}
    bad = {k: getattr(module, k) for k, v in expected.items() if getattr(module, k, v) != v}
    if bad:
        raise BaselineError(f"{type(module).__name__} has an experts layout this baseline does not export ({bad}); "
                            f"supported: {expected}")


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn"))


def make_experts_exportable(model: nn.Module, check_tokens: int = 16, seed: int = 0) -> int:
    """Replace every fused experts module in ``model`` by :class:`GatherExperts`, in place.

    Each replacement is checked against the module it replaces on ``check_tokens`` random
    tokens with random routing (catches a layout this code misreads).

    Returns:
        The number of modules replaced.

    Raises:
        BaselineError: no fused experts module found, an unsupported layout, or a mismatch.
    """
    targets = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    if not targets:
        raise BaselineError(f"{type(model).__name__} has no fused experts module (gate_up_proj [E, 2I, H], "
                            "down_proj [E, H, I]); this baseline handles transformers 5 MoE models")
    gen = torch.Generator().manual_seed(seed)
    for name, old in targets:
        new = GatherExperts.from_fused(old)
        _check_same_output(name, old, new, check_tokens, gen)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    log.info("replaced %d experts modules by GatherExperts", len(targets))
    return len(targets)


def _check_same_output(name: str, old: nn.Module, new: GatherExperts, tokens: int, gen: torch.Generator) -> None:
    n_exp, hidden = old.gate_up_proj.shape[0], old.gate_up_proj.shape[2]
    k = min(2, n_exp)
    h = torch.randn(tokens, hidden, generator=gen, dtype=old.gate_up_proj.dtype)
    index = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen, dtype=h.dtype)
    with torch.no_grad():
        want, got = old(h, index, weights), new(h, index, weights)
    err = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not err <= 1e-4 * scale:
        raise BaselineError(f"{name}: GatherExperts differs from {type(old).__name__} by {err:.3g} (scale "
                            f"{scale:.3g}); its weight layout is not the one this baseline assumes")


# -- export ----------------------------------------------------------------------------------------
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


# -- checking the export ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationInputs:
    """Token ids ``[B, T]``, where the prefill ends, and the unmodified model's logits ``[B, T, V]``."""

    ids: np.ndarray
    prefill: int
    reference: np.ndarray


def validation_inputs(model: nn.Module, seed: int = 1, batch: int = 3, prefill: int = 11,
                      decode: int = 4) -> ValidationInputs:
    """Random ids (different batch, lengths and values from the trace) and the model's logits on them."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, prefill + decode), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return ValidationInputs(ids.numpy(), prefill, logits.float().numpy())


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise BaselineError(f"onnxruntime cannot load {path}: {e}") from e


def _ort_forward(sess: Any, specs: list[KVSpec], ids: np.ndarray,
                 past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    if past is None:
        past = [np.zeros((ids.shape[0], s.num_kv_heads, 0, s.head_dim), np.float32) for s in specs for _ in "kv"]
    feed = {"input_ids": ids.astype(np.int64)}
    for i, s in enumerate(specs):
        feed[s.past_key], feed[s.past_value] = past[2 * i], past[2 * i + 1]
    out = sess.run(None, feed)
    return out[0], out[1:]


def _incremental_logits(sess: Any, specs: list[KVSpec], val: ValidationInputs) -> np.ndarray:
    """Logits of a prefill of ``val.prefill`` tokens followed by one-token decode steps."""
    logits, past = _ort_forward(sess, specs, val.ids[:, :val.prefill])
    steps = [logits]
    for t in range(val.prefill, val.ids.shape[1]):
        logits, past = _ort_forward(sess, specs, val.ids[:, t:t + 1], past)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def compare_logits(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max abs difference, relative L2 error and top-1 agreement of two logits arrays."""
    diff = got.astype(np.float64) - ref
    return {"max_abs": float(np.abs(diff).max()),
            "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def check_onnx_logits(path: str | Path, specs: list[KVSpec], val: ValidationInputs) -> dict[str, dict]:
    """Compare an exported model with the reference, one full pass and prefill + decode."""
    sess = _session(Path(path))
    full, _ = _ort_forward(sess, specs, val.ids)
    return {"full": compare_logits(full, val.reference),
            "incremental": compare_logits(_incremental_logits(sess, specs, val), val.reference)}


def validate_export(path: str | Path, specs: list[KVSpec], val: ValidationInputs,
                    tolerance: float = 1e-4) -> dict[str, dict]:
    """Raise :class:`ExportMismatchError` unless the ONNX logits match the reference.

    The test: ``max |onnx - torch| <= tolerance * max(1, max |torch|)`` for one full pass and
    for prefill + decode.
    """
    result = check_onnx_logits(path, specs, val)
    limit = tolerance * max(1.0, float(np.abs(val.reference).max()))
    for mode, stats in result.items():
        if not stats["max_abs"] <= limit:
            raise ExportMismatchError(
                f"the exported graph {path} does not reproduce the PyTorch model on inputs other than its tracing "
                f"inputs ({mode}: max |diff| {stats['max_abs']:.3g} > {limit:.3g}, top-1 agreement "
                f"{stats['top1_agreement']:.2f}); the export baked in input-dependent behaviour (e.g. a loop over "
                "the experts the tracing input hit)")
    log.info("export check passed: full max|diff| %.2g, incremental %.2g (limit %.2g)",
             result["full"]["max_abs"], result["incremental"]["max_abs"], limit)
    return {**result, "limit": limit}


# -- quantization ----------------------------------------------------------------------------------
def _ort_quantizer_module() -> Any:
    """Import ``onnxruntime.quantization.matmul_nbits_quantizer`` without its side effects on logging.

    The module calls ``logging.basicConfig(level=INFO)`` on import, which would switch the whole
    process's root logger to INFO; a temporary handler makes that call a no-op. Its per-node
    INFO messages are lowered to WARNING unless someone configured that logger.
    """
    import importlib
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name not in sys.modules:
        root, guard = logging.getLogger(), logging.NullHandler()
        root.addHandler(guard)
        try:
            importlib.import_module(name)
        finally:
            root.removeHandler(guard)
        ort_log = logging.getLogger(name)
        if ort_log.level == logging.NOTSET:
            ort_log.setLevel(logging.WARNING)
    return sys.modules[name]


def _algo_config(cfg: OrtQuantizerConfig) -> Any:
    nbits = _ort_quantizer_module()
    if cfg.algo == "hqq":
        if cfg.accuracy_level:
            log.info("ORT's HQQ quantizer writes no accuracy_level; MatMulNBits runs with its default (0)")
        return nbits.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=cfg.bits)
    return nbits.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.is_symmetric,
                                        accuracy_level=cfg.accuracy_level or None, bits=cfg.bits)


def _weight_of(node: Any, initializers: set[str]) -> str | None:
    return node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in initializers \
        else None


def _name_nodes(model: Any) -> None:
    """Give unnamed nodes unique names (``nodes_to_exclude`` matches by name)."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"dmpq_node_{i}"


def _excluded_matmuls(model: Any, scope: str) -> list[str]:
    if scope == "all":
        return []
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if (w := _weight_of(n, inits)) is not None and not _EXPERT_WEIGHT.match(w)]


def quantize_onnx(src: str | Path, cfg: OrtQuantizerConfig) -> tuple[Any, dict[str, Any]]:
    """Run ``MatMulNBitsQuantizer`` on the model at ``src`` (with its external data).

    Returns:
        ``(quantized ModelProto, stats)``; stats count the MatMuls quantized (experts / other),
        those kept in fp32, and the expert weights that were quantized (``experts`` list).
    """
    import onnx

    model = onnx.load(str(src))
    _name_nodes(model)
    inits = {t.name for t in model.graph.initializer}
    weights = {n.name: w for n in model.graph.node if (w := _weight_of(n, inits)) is not None}
    exclude = _excluded_matmuls(model, cfg.scope)
    t0 = time.perf_counter()
    quantizer = _ort_quantizer_module().MatMulNBitsQuantizer(model, nodes_to_exclude=exclude,
                                                             algo_config=_algo_config(cfg))
    quantizer.process()
    out = quantizer.model.model
    quantized = [weights[n.name.rsplit(f"_Q{cfg.bits}", 1)[0]] for n in out.graph.node
                 if n.op_type == "MatMulNBits" and n.name.rsplit(f"_Q{cfg.bits}", 1)[0] in weights]
    experts = sorted(w for w in quantized if _EXPERT_WEIGHT.match(w))
    stats = {"seconds": round(time.perf_counter() - t0, 3), "matmuls_with_constant_weight": len(weights),
             "quantized_expert_matmuls": len(experts), "quantized_other_matmuls": len(quantized) - len(experts),
             "fp32_matmuls": len(weights) - len(quantized), "quantized_expert_weights": experts}
    if not quantized:
        raise BaselineError("MatMulNBitsQuantizer quantized no MatMul; the export has no MatMul with a constant "
                            "2-D weight")
    log.info("quantized %d expert and %d other MatMuls to %d bits (%d kept fp32)", len(experts),
             stats["quantized_other_matmuls"], cfg.bits, stats["fp32_matmuls"])
    return out, stats


def save_onnx(model: Any, folder: Path) -> int:
    """Save ``model`` as ``folder/model.onnx`` (weights in ``model.onnx.data`` above 100 MB); returns weight bytes."""
    size = initializer_bytes(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder, external=use_external(None, size))
    return size


# -- the artifact ----------------------------------------------------------------------------------
class _StagedOnnx(Backend):
    """Moves an already written ONNX model into the artifact folder (``write_artifact``'s emit step).

    Named ``ort-cpu`` because that is the runtime that runs it (CPU execution provider); the
    manifest's ``target.producer`` says it was made by torch.onnx + MatMulNBitsQuantizer.
    """

    name: ClassVar[str] = "ort-cpu"
    supported_bits: ClassVar[tuple[int, ...]] = QUANT_BITS + (EXPORT_ONLY,)
    description: ClassVar[str] = "torch.onnx export quantized by onnxruntime's MatMulNBitsQuantizer"

    def __init__(self, folder: Path, fields: dict[str, Any]) -> None:
        self.folder, self.fields = folder, fields

    def emit(self, graph: Any, out_dir: Path, **options: Any) -> dict[str, Any]:
        import onnx

        for f in (MODEL_FILE, DATA_FILE):
            if (self.folder / f).is_file():
                shutil.move(str(self.folder / f), str(Path(out_dir) / f))
        model = onnx.load(str(Path(out_dir) / MODEL_FILE), load_external_data=False)
        external = (Path(out_dir) / DATA_FILE).is_file()
        return {"format": "onnx", "model_file": MODEL_FILE, "external_data_file": DATA_FILE if external else None,
                "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                "custom_domains": {o.domain: o.version for o in model.opset_import if o.domain not in ("", "ai.onnx")},
                "execution_provider": "CPUExecutionProvider", **self.fields}


def _annotate(graph: Any, cfg: OrtQuantizerConfig, expert_weights: list[str]) -> None:
    """Bits and quant spec on every expert node: quantized only if both its MatMuls were."""
    done: dict[str, int] = {}
    for w in expert_weights:
        m = _EXPERT_WEIGHT.match(w)
        key = f"L{m.group(1)}.E{m.group(2)}"
        done[key] = done.get(key, 0) + 1
    graph.meta["group_size"] = cfg.block_size
    spec = {"bits": cfg.bits, "group_size": cfg.block_size, "method": f"ort-{cfg.algo}",
            "scheme": "ort-sym" if cfg.is_symmetric else "ort-asym", "tool": "MatMulNBitsQuantizer"}
    for node in graph.experts():
        key = f"L{node.attrs['layer']}.E{node.attrs['expert']}"
        if done.get(key) == 2:
            graph.annotate(node.id, "bits", cfg.bits)
            graph.annotate(node.id, "quant", {"spec": spec})
        else:
            graph.annotate(node.id, "bits", EXPORT_ONLY)


def _profile(graph: Any, model_dir: Path, cfg: OrtQuantizerConfig, progress: bool) -> dict[str, Any]:
    """Routing frequencies on calibration text (as the ``profile`` pass computes them), or a uniform
    ``top_k / E`` assumption without a corpus; bench uses them for bytes read per token."""
    if cfg.calib_corpus is None:
        freq = graph.meta["top_k"] / graph.meta["num_experts"]
        for node in graph.experts():
            graph.annotate(node.id, "freq", freq)
        return {"source": "uniform assumption top_k / num_experts (no calibration corpus)"}
    from ..compiler import calibration_ids
    from ..passes.profile import route_statistics

    ids = calibration_ids(model_dir, cfg.calib_corpus, cfg.calib_sequences, cfg.seq_len)
    counts, mass, total = route_statistics(graph, ids, progress=progress)
    for node in graph.experts():
        layer, e = node.attrs["layer"], node.attrs["expert"]
        graph.annotate(node.id, "tokens", int(counts[layer][e]))
        graph.annotate(node.id, "freq", float(counts[layer][e]) / total)
        graph.annotate(node.id, "mass", float(mass[layer][e]) / total)
    return {"source": f"routing counts on {cfg.calib_corpus!r} calib split", "tokens": total}


def _target_fields(cfg: OrtQuantizerConfig, specs: list[KVSpec], stats: dict[str, Any], size: int) -> dict:
    import onnxruntime
    import torch as _torch

    return {
        "dispatch": "nonzero-gather (torch.export of GatherExperts; every expert runs, on its routed tokens only)",
        "accuracy_level": cfg.accuracy_level if cfg.bits != EXPORT_ONLY and cfg.algo == "default" else None,
        "weight_bytes": size,
        "io": {"input_ids": "input_ids", "logits": "logits", "kv_cache": [asdict(s) for s in specs]},
        "requires": {"onnxruntime": ">=1.20", "numpy": ">=1.24", "tokenizers": ">=0.19"},
        "producer": {"baseline": "ort-quantizer", "exporter": f"torch.onnx dynamo (torch {_torch.__version__})",
                     "quantizer": None if cfg.bits == EXPORT_ONLY else
                     f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer ({cfg.algo})",
                     "bits": cfg.bits, "block_size": cfg.block_size, "is_symmetric": cfg.is_symmetric,
                     "scope": cfg.scope, "quantized": {k: v for k, v in stats.items()
                                                       if k != "quantized_expert_weights"}},
    }


@dataclass(frozen=True)
class CheckedExport:
    """An fp32 torch.onnx export that passed :func:`validate_export`, ready to quantize."""

    path: Path  # model.onnx (weights in model.onnx.data next to it)
    specs: list[KVSpec]
    validation: ValidationInputs
    check: dict[str, Any]
    seconds: float
    opset: int


def export_checked(model_dir: str | Path, folder: str | Path, opset: int = 21, seed: int = 0,
                   tolerance: float = 1e-4) -> CheckedExport:
    """Load ``model_dir``, make its experts exportable, export into ``folder`` and check the graph.

    Raises:
        BaselineError: unsupported model or failed export.
        ExportMismatchError: the exported logits differ from the unmodified PyTorch model's.
    """
    model = load_export_model(model_dir)
    val = validation_inputs(model, seed=seed + 1)
    make_experts_exportable(model, seed=seed)
    path = Path(folder) / MODEL_FILE
    t0 = time.perf_counter()
    specs = export_cached_lm(model, path, opset, seed)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    check = validate_export(path, specs, val, tolerance)
    return CheckedExport(path, specs, val, check, round(seconds, 3), opset)


def write_baseline(export: CheckedExport, model_dir: str | Path, out: str | Path,
                   cfg: OrtQuantizerConfig = OrtQuantizerConfig(), overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Quantize a checked export with ``cfg`` and write the artifact ``out`` (atomically).

    One export can be written several times with different bits, block sizes or scopes.
    """
    from ..artifact import write_artifact
    from ..compiler import expert_table
    from ..frontend import load as load_ir
    from ..runtime.manifest import ArtifactError

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output path or pass --overwrite")
    if export.opset != cfg.opset:
        raise BaselineError(f"the export uses opset {export.opset} but the config asks for {cfg.opset}; re-export")
    t0 = time.perf_counter()
    graph = load_ir(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".work", dir=out.parent) as work:
        final, stats, size = _final_model(export.path, Path(work), cfg)
        quality = check_onnx_logits(final / MODEL_FILE, export.specs, export.validation)
        _annotate(graph, cfg, stats.pop("quantized_expert_weights", []))
        profile = _profile(graph, model_dir, cfg, progress)
        report = {"baseline": "ort-quantizer", "config": asdict(cfg), "export_seconds": export.seconds,
                  "export_check": export.check, "quantization": stats, "vs_pytorch": quality, "profile": profile,
                  "experts": expert_table(graph),
                  "compile_seconds": round(export.seconds + time.perf_counter() - t0, 3)}
        emitter = _StagedOnnx(final, _target_fields(cfg, export.specs, stats, size))
        return write_artifact(graph, emitter, out, report=report, overwrite=overwrite)


def build_ort_quantizer_baseline(model_dir: str | Path, out: str | Path,
                                 cfg: OrtQuantizerConfig = OrtQuantizerConfig(), overwrite: bool = False,
                                 progress: bool = True) -> Path:
    """Export ``model_dir`` with torch.onnx, check it, quantize it with ORT, write an artifact at ``out``.

    Memory: holds the transformers model and then the IR graph (metadata, routing profile)
    and the ONNX model; meant for models of a few GB at most.

    Raises:
        BaselineError: unsupported model or settings, a failed export, or an ONNX graph
            whose logits differ from the PyTorch model's (:class:`ExportMismatchError`).
        ArtifactError: ``out`` exists (without ``overwrite``).
    """
    from ..runtime.manifest import ArtifactError

    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".export", dir=out.parent) as work:
        export = export_checked(model_dir, work, cfg.opset, cfg.seed, cfg.tolerance)
        return write_baseline(export, model_dir, out, cfg, overwrite, progress)


def _final_model(fp32: Path, folder: Path, cfg: OrtQuantizerConfig) -> tuple[Path, dict[str, Any], int]:
    """Quantize (or copy) the exported model into ``folder``; returns it, quantization stats and weight bytes."""
    import onnx

    if cfg.bits == EXPORT_ONLY:
        model = onnx.load(str(fp32))
        stats: dict[str, Any] = {"quantized_expert_matmuls": 0, "quantized_other_matmuls": 0,
                                 "quantized_expert_weights": []}
    else:
        model, stats = quantize_onnx(fp32, cfg)
    stats["stripped_node_metadata_bytes"] = strip_node_metadata(model)
    size = save_onnx(model, folder)
    return folder, stats, size


def strip_node_metadata(model: Any) -> int:
    """Drop the debugging ``metadata_props`` torch.onnx puts on every node (module path, FX node,
    stack); they are not needed to run and made up ~5 MB of a 12 MB tiny model. Returns the bytes."""
    removed = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            removed += sum(len(p.key) + len(p.value) for p in node.metadata_props)
            del node.metadata_props[:]
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(g for a in node.attribute for g in a.graphs)
    return removed

"""Checking an exported (or quantized) ONNX model against the PyTorch model's logits in onnxruntime."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...backends.onnx_lowering import KVSpec
from .config import BaselineError, ExportMismatchError

log = logging.getLogger(__name__)


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


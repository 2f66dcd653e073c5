"""Measurement callbacks that put the RL allocator's rewards on real numbers.

* :func:`interpreter_accuracy_fn`: the loss (NLL) increase of a whole allocation, measured by
  running the reference interpreter on calibration sequences with every expert fake-quantized
  at its proposed bits (the additive sensitivity proxy is calibrated against these values).
* :func:`artifact_hardware_fn`: hardware in the loop: quantize, emit a real artifact for the
  target into a temporary folder, load it with the runtime and time decoding. The measured
  decode time is expressed in the cost table's units (``latency_ms`` = table latency of the
  all-16-bit model × measured(allocation) / measured(all-16-bit)), so that the environment's
  normalisation stays consistent; ``bytes`` is the artifact's exact expert weight size.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..ir.graph import Graph
from ..ir.interpreter import Interpreter, RunOptions

log = logging.getLogger(__name__)
Allocation = Mapping[str, int]


def interpreter_accuracy_fn(graph: Graph, calibration: torch.Tensor, sequences: int = 8, metric: str = "kl"
                            ) -> Callable[[Allocation], float]:
    """``allocation -> accuracy loss`` on ``sequences`` calibration sequences, cached per allocation.

    ``metric`` "kl": mean per-token KL(FP || quantized); "nll": mean NLL increase. It matches the
    per-expert annotation the allocator's additive proxy sums, so the proxy can be calibrated.
    """
    ids = calibration[:sequences]
    interp = Interpreter(graph, quantize=False)
    cache: dict[tuple, float] = {}

    def logp(opts: RunOptions) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(interp.run(ids, opts)["lm_head"][:, :-1].float(), dim=-1)

    ref = logp(RunOptions(quantize=False))
    ref_nll = -ref.gather(-1, ids[:, 1:, None]).mean()

    def fn(allocation: Allocation) -> float:
        key = tuple(sorted(allocation.items()))
        if key not in cache:
            lp = logp(RunOptions(quantize=False, bits_override=dict(allocation)))
            if metric == "kl":
                cache[key] = float((ref.exp() * (ref - lp)).sum(-1).mean())
            else:
                cache[key] = float(-lp.gather(-1, ids[:, 1:, None]).mean() - ref_nll)
        return cache[key]

    return fn


def artifact_hardware_fn(graph: Graph, backend: Any, decode_tokens: int = 16, repeats: int = 3
                         ) -> Callable[[Allocation], dict[str, float]]:
    """``allocation -> {"latency_ms", "bytes"}`` measured on an emitted artifact (see module doc)."""
    table = backend.cost_table(graph, progress=False)
    freq = {n.id: float(n.ann.get("freq", 0.0)) for n in graph.experts()}
    ref_table_ms = sum(freq[k] * rows[16].decode_ms for k, rows in table.items())
    baseline = _measure(graph, backend, {k: 16 for k in freq}, decode_tokens, repeats)

    def fn(allocation: Allocation) -> dict[str, float]:
        m = _measure(graph, backend, allocation, decode_tokens, repeats)
        return {"latency_ms": ref_table_ms * m["decode_ms"] / baseline["decode_ms"], "bytes": m["expert_bytes"]}

    return fn


def _measure(graph: Graph, backend: Any, allocation: Allocation, decode_tokens: int, repeats: int) -> dict:
    from ..artifact import write_artifact
    from ..runtime import load
    from .base import PassContext
    from .quantize import QuantizePass

    g = graph.copy()
    for node_id, bits in allocation.items():
        g.annotate(node_id, "bits", int(bits))
    g = QuantizePass(group_size=int(g.meta.get("group_size", 64))).call(g, PassContext(progress=False)).graph
    expert_bytes = sum(g.weights[e["q"]].numel() + g.weights[e["scale"]].numel() * 4 + g.weights[e["zero"]].numel()
                       for n in g.experts() for e in n.ann["quant"]["tensors"].values())
    expert_bytes += sum(g.weights[n.params[r]].numel() * 4 for n in g.experts() if n.ann["bits"] == 16
                        for r in ("gate", "up", "down"))
    with tempfile.TemporaryDirectory(prefix="dmpq-hw-") as tmp:
        path = write_artifact(g, backend, Path(tmp) / "a")
        session = load(path, verify=False)
        times = []
        for _ in range(repeats):
            logits, past = session.forward(np.zeros((1, 8), dtype=np.int64))
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                logits, past = session.forward(np.array([[int(logits[0, -1].argmax())]], dtype=np.int64), past)
                times.append(time.perf_counter() - t0)
    return {"decode_ms": statistics.median(times) * 1e3, "expert_bytes": float(expert_bytes)}

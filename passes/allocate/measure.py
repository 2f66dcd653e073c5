"""Measurement callbacks that put the RL allocator's rewards on real numbers.

* :func:`interpreter_accuracy_fn`: the loss (NLL) increase of a whole allocation, measured by
  running the reference interpreter on calibration sequences with every expert fake-quantized
  at its proposed bits (the additive sensitivity proxy is calibrated against these values).
* :func:`artifact_hardware_fn`: hardware in the loop: quantize, emit a real artifact for the
  target into a temporary folder, load it with the runtime and time decoding. The measured
  decode time is expressed in the cost table's units (``latency_ms`` = table latency of the
  all-16-bit model × measured(allocation) / measured(all-16-bit)), so that the environment's
  normalisation stays consistent; ``bytes`` is the artifact's expert weight size on disk, as its
  manifest records it.
* :func:`energy_source`: where energy figures can come from on this machine (a measured
  counter, Linux RAPL or NVML, or only the cost table's analytical model), for labelling.

Both callbacks run the whole model, so the allocate pass only builds them for models of at most
:data:`MEASURE_MAX_PARAMS` parameters (it logs when it falls back to the proxy objective).
Caches: :func:`interpreter_accuracy_fn` keeps at most :data:`CACHE_ENTRIES` results (least
recently used first out), keyed by a 20-byte digest of the allocation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...eval.metrics import next_token_logprobs, token_kl, token_nll
from ...ir.graph import Graph
from ...ir.interpreter import Interpreter, RunOptions
from ...quant.spec import DEFAULT_GROUP_SIZE

log = logging.getLogger(__name__)
Allocation = Mapping[str, int]
OpenArtifact = Callable[[Graph, Any, Path], Any]  # (quantized graph, backend, folder) -> runtime session

MEASURE_MAX_PARAMS = 100_000_000
"""Largest model (all parameters) whose allocations are measured through the interpreter: an fp32
forward pass of 8 x 128 tokens at this size takes about 10 s on 2 cores, and one is run every
``measure_every`` episodes; a 7B model would not even fit in memory in fp32 next to the IR."""
CACHE_ENTRIES = 256
"""Most allocations whose measured accuracy loss is remembered."""

RAPL_ROOT = "/sys/class/powercap"


def energy_source() -> str:
    """Where energy can be measured here: ``"rapl"``, ``"nvml"`` or ``"analytical"``.

    RAPL: a readable ``energy_uj`` counter under ``/sys/class/powercap/intel-rapl*``. NVML: the
    ``pynvml`` module importable and at least one GPU. Otherwise only the cost table's
    analytical model (:class:`dmpq_compile.backends.cost.EnergyModel`) is available, and every
    printed energy figure must say so.
    """
    try:
        zones = [z for z in os.listdir(RAPL_ROOT) if z.startswith("intel-rapl")]
    except OSError:
        zones = []
    if any(os.access(os.path.join(RAPL_ROOT, z, "energy_uj"), os.R_OK) for z in zones):
        return "rapl"
    try:
        import pynvml
    except ImportError:
        return "analytical"
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            return "nvml"
    except pynvml.NVMLError as e:
        log.debug("no NVML energy counter: %s", e)
    return "analytical"


def interpreter_accuracy_fn(graph: Graph, calibration: torch.Tensor, sequences: int = 8, metric: str = "kl"
                            ) -> Callable[[Allocation], float]:
    """``allocation -> accuracy loss`` on ``sequences`` calibration sequences, cached per allocation.

    ``metric`` "kl": mean per-token KL(FP || quantized); "nll": mean NLL increase. It matches the
    per-expert annotation the allocator's additive proxy sums, so the proxy can be calibrated.
    At most :data:`CACHE_ENTRIES` results are cached.
    """
    ids = calibration[:sequences]
    interp = Interpreter(graph, quantize=False)
    cache: OrderedDict[bytes, float] = OrderedDict()

    def logp(opts: RunOptions) -> torch.Tensor:
        with torch.no_grad():
            return next_token_logprobs(interp.run(ids, opts)["lm_head"])

    ref = logp(RunOptions(quantize=False))
    ref_nll = token_nll(ref, ids).mean()

    def fn(allocation: Allocation) -> float:
        key = hashlib.sha1(repr(sorted(allocation.items())).encode()).digest()
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        lp = logp(RunOptions(quantize=False, bits_override=dict(allocation)))
        if metric == "kl":
            value = float(token_kl(ref, lp).mean())
        else:
            value = float(token_nll(lp, ids).mean() - ref_nll)
        cache[key] = value
        if len(cache) > CACHE_ENTRIES:  # least recently used out
            cache.popitem(last=False)
        return value

    return fn


def artifact_hardware_fn(graph: Graph, backend: Any, open_artifact: OpenArtifact, decode_tokens: int = 16,
                         repeats: int = 3) -> Callable[[Allocation], dict[str, float]]:
    """``allocation -> {"latency_ms", "bytes"}`` measured on an emitted artifact (see module doc).

    ``open_artifact`` writes and loads an artifact (``PassContext.open_artifact``, given by the
    driver: the artifact writer and the runtime sit above the passes); the session it returns has
    the artifact's ``manifest``, whose per-expert ``bytes`` are the measured bytes.
    """
    table = backend.cost_table(graph, progress=False)
    freq = {n.id: float(n.ann.get("freq", 0.0)) for n in graph.experts()}
    ref_table_ms = sum(freq[k] * rows[16].decode_ms for k, rows in table.items())
    baseline = _measure(graph, backend, open_artifact, {k: 16 for k in freq}, decode_tokens, repeats)

    def fn(allocation: Allocation) -> dict[str, float]:
        m = _measure(graph, backend, open_artifact, allocation, decode_tokens, repeats)
        return {"latency_ms": ref_table_ms * m["decode_ms"] / baseline["decode_ms"], "bytes": m["expert_bytes"]}

    return fn


def _measure(graph: Graph, backend: Any, open_artifact: OpenArtifact, allocation: Allocation, decode_tokens: int,
             repeats: int) -> dict:
    from ..infra.base import PassContext
    from ..quantize import QuantizePass

    g = graph.copy()
    for node_id, bits in allocation.items():
        g.annotate(node_id, "bits", int(bits))
    ctx = PassContext(progress=False, backend=backend)  # quantized in the target's formats
    g = QuantizePass(group_size=int(g.meta.get("group_size", DEFAULT_GROUP_SIZE))).call(g, ctx).graph
    with tempfile.TemporaryDirectory(prefix="dmpq-hw-") as tmp:
        session = open_artifact(g, backend, Path(tmp) / "a")
        expert_bytes = sum(e["bytes"] for e in session.manifest["experts"].values())  # as emitted, on disk
        times = []
        for _ in range(repeats):
            logits, past = session.forward(np.zeros((1, 8), dtype=np.int64))
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                logits, past = session.forward(np.array([[int(logits[0, -1].argmax())]], dtype=np.int64), past)
                times.append(time.perf_counter() - t0)
    return {"decode_ms": statistics.median(times) * 1e3, "expert_bytes": float(expert_bytes)}

"""Shared pieces of the allocator benchmarks (ablation, hardware in the loop, reward weights).

* :func:`analysed_graph`: the budget-independent analysis (profile, sensitivity, cost) of a
  sample, run once and kept as an IR folder under the work directory for later runs.
* :func:`emit_allocation`: quantize a copy of the graph at a given allocation and emit an
  ort-cpu artifact.
* :class:`ArtifactScorer`: test perplexity of an artifact and KL(FP32 artifact || artifact),
  cached per allocation so identical allocations are scored once.
* :func:`machine`: commit, dirty files, load average and CPU, recorded with every result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from dmpq_compile.passes import make_pass
from dmpq_compile.passes.precision import PrecisionOptions

from dmpq_compile.compiler import (
    CompileConfig,
    analysis_passes,
    calibration_ids,
    emit,
    eos_token,
    get_backend,
    load_tokenizer,
    run_passes,
)
from dmpq_compile.eval import kl_divergence, load_corpus, perplexity, tokenize_corpus
from dmpq_compile.frontend import load
from dmpq_compile.ir.serialize import load_graph, save_graph
from dmpq_compile.runtime import load as load_artifact

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
BASE = CompileConfig(target="ort-cpu", calib_sequences=32, sensitivity_sequences=16)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def machine() -> dict[str, Any]:
    """Commit, uncommitted files, load average, CPU and time (recorded next to every result)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    from dmpq_compile.sysinfo import cpu_model

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "--short", "-uno").splitlines(),
            "loadavg": loadavg(), "cpu": cpu_model(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def analysed_graph(model: str, work: Path, reuse: bool, calib: torch.Tensor, cfg: CompileConfig = BASE):
    """The analysed graph of ``model`` (profile, sensitivity with the gradvar features, ort-cpu
    cost), cached in ``work``: every allocator the benchmarks compare can run on it.

    Returns:
        ``(graph, seconds)``; seconds is 0.0 when the cached analysis was reused.
    """
    path = work / "analysed-ir"
    if reuse and (path / "graph.json").is_file():
        return load_graph(path), 0.0
    backend = get_backend(cfg.target)
    t0 = time.perf_counter()
    graph = load(model)
    graph.meta["group_size"] = cfg.group_size
    passes = analysis_passes(dataclasses.replace(cfg, allocator="gradvar", sensitivity=True), backend)
    graph, _ = run_passes(graph, passes, model, cfg, backend, progress=False,
                          calibration=calib)
    seconds = time.perf_counter() - t0
    save_graph(graph, path)
    return graph, seconds


def calibration(model: str, cfg: CompileConfig = BASE) -> torch.Tensor:
    return calibration_ids(model, cfg.calib_corpus, cfg.calib_sequences, cfg.seq_len)


def digest(allocation: Mapping[str, int]) -> str:
    return hashlib.sha1(repr(sorted(allocation.items())).encode()).hexdigest()[:16]


def emit_allocation(graph, model: str, allocation: Mapping[str, int], out: Path, label: str,
                    cfg: CompileConfig = BASE) -> Path:
    """Quantize (RTN, the config's group size) a copy of ``graph`` at ``allocation`` and emit it;
    the weights outside the experts at the config's non-expert policy (the ``precision`` pass)."""
    g = graph.copy()
    for node_id, bits in allocation.items():
        g.annotate(node_id, "bits", int(bits))
    passes = [make_pass("quantize", method=cfg.quant_method, group_size=cfg.group_size)]
    policy = PrecisionOptions(cfg.nonexpert_bits, dict(cfg.nonexpert_kinds))
    if policy.active:
        passes.insert(0, make_pass("precision", nonexpert_bits=policy.nonexpert_bits, kinds=policy.kinds))
    g, recs = run_passes(g, passes, model,
                         CompileConfig.from_dict({**cfg.__dict__, "allocator": "uniform"}), get_backend(cfg.target),
                         progress=False)
    return emit(g, cfg, out / label, recs, 0.0, overwrite=True)


def average_bits(graph, allocation: Mapping[str, int]) -> float:
    sizes = {n.id: sum(graph.weights[n.params[r]].numel() for r in ("gate", "up", "down")) for n in graph.experts()}
    return sum(allocation[k] * s for k, s in sizes.items()) / sum(sizes.values())


class ArtifactScorer:
    """Test perplexity and KL(FP32 || artifact) on the first ``tokens`` test tokens, one thread."""

    def __init__(self, model: str, fp_path: Path, tokens: int, cfg: CompileConfig = BASE) -> None:
        tok = load_tokenizer(model)
        self.ids = tokenize_corpus(load_corpus(cfg.calib_corpus, "test"), tok, separator=eos_token(tok),
                                   max_tokens=tokens)
        self.fp_fn = self._fn(fp_path)
        self.fp_ppl = perplexity(self.fp_fn, self.ids, progress=False).ppl
        self._cache: dict[str, dict[str, float]] = {}

    @staticmethod
    def _fn(path: Path):
        session = load_artifact(path, verify=False, threads=1)
        return lambda ids: torch.from_numpy(session.logits(ids.numpy()))

    def score(self, path: Path, key: str) -> dict[str, float]:
        """``{"ppl", "dppl_pct", "kl"}`` of the artifact at ``path`` (cached under ``key``)."""
        if key not in self._cache:
            fn = self._fn(path)
            ppl = perplexity(fn, self.ids, progress=False).ppl
            kl = kl_divergence(self.fp_fn, fn, self.ids, progress=False).kl
            self._cache[key] = {"ppl": ppl, "dppl_pct": 100 * (ppl / self.fp_ppl - 1), "kl": kl}
        return self._cache[key]

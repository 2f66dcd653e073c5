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

import hashlib
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dmpq_compile.passes import make_pass
from dmpq_compile.passes.precision import PrecisionOptions

from dmpq_compile.compiler import (
    CompileConfig,
    analysis_passes,
    calibration_ids,
    emit,
    get_backend,
    load_tokenizer,
    run_passes,
)
from dmpq_compile.eval import DOMAINS, NumpyLogits, eval_windows, score, summarize, window_logprobs
from dmpq_compile.eval.protocol import DEFAULT_CONTEXT
from dmpq_compile.frontend import load
from dmpq_compile.ir.serialize import load_graph, save_graph
from dmpq_compile.runtime import load as load_artifact

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
BASE = CompileConfig.from_dict({"target": "ort-cpu", "calibration": {"sequences": 32}, "sensitivity": {"sequences": 16}})


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def machine() -> dict[str, Any]:
    """Commit, uncommitted files, load average, CPU and time (recorded next to every result)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    from dmpq_compile.sysinfo import cpu_flags, cpu_model

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "--short", "-uno").splitlines(),
            "loadavg": loadavg(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "python": platform.python_version(),
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
    graph.meta["group_size"] = cfg.quantize.group_size
    passes = analysis_passes(cfg.replace(allocate={"allocator": "gradvar"}, sensitivity={"enabled": True}), backend)
    graph, _ = run_passes(graph, passes, model, cfg, backend, progress=False,
                          calibration=calib)
    seconds = time.perf_counter() - t0
    save_graph(graph, path)
    return graph, seconds


def calibration(model: str, cfg: CompileConfig = BASE) -> torch.Tensor:
    c = cfg.calibration
    return calibration_ids(model, c.corpus, c.sequences, c.seq_len)


def digest(allocation: Mapping[str, int]) -> str:
    return hashlib.sha1(repr(sorted(allocation.items())).encode()).hexdigest()[:16]


def emit_allocation(graph, model: str, allocation: Mapping[str, int], out: Path, label: str,
                    cfg: CompileConfig = BASE) -> Path:
    """Quantize (RTN, the config's group size) a copy of ``graph`` at ``allocation`` and emit it;
    the weights outside the experts at the config's non-expert policy (the ``precision`` pass)."""
    g = graph.copy()
    for node_id, bits in allocation.items():
        g.annotate(node_id, "bits", int(bits))
    passes = [make_pass("quantize", method=cfg.quantize.method, group_size=cfg.quantize.group_size)]
    policy = PrecisionOptions(cfg.allocate.nonexpert_bits, dict(cfg.allocate.nonexpert_kinds))
    if policy.active:
        passes.insert(0, make_pass("precision", nonexpert_bits=policy.nonexpert_bits, kinds=policy.kinds))
    g, recs = run_passes(g, passes, model,
                         cfg.replace(allocate={"allocator": "uniform"}), get_backend(cfg.target),
                         progress=False)
    return emit(g, cfg, out / label, recs, 0.0, overwrite=True)


def average_bits(graph, allocation: Mapping[str, int]) -> float:
    sizes = {n.id: sum(graph.weights[n.params[r]].numel() for r in ("gate", "up", "down")) for n in graph.experts()}
    return sum(allocation[k] * s for k, s in sizes.items()) / sum(sizes.values())


class ArtifactScorer:
    """Perplexity and KL(FP32 || artifact) under the evaluation protocol (docs/evaluation.md), one thread.

    Scores every set of ``domains`` (default: pydoc and pystdlib) on ``split`` (default test; pass dev when the
    figures decide something) with at most ``tokens // 256`` windows each. :meth:`score` gives the first
    domain's figures as ``ppl`` / ``dppl_pct`` / ``kl``, the others' as ``ppl_<domain>`` / ``kl_<domain>``, and
    every set's with 95% bootstrap intervals (and the paired ratio to FP32's perplexity) under ``quality``.
    """

    def __init__(self, model: str, fp_path: Path, tokens: int, cfg: CompileConfig = BASE, split: str = "test",
                 domains: tuple[str, ...] = DOMAINS) -> None:
        tok = load_tokenizer(model)
        self.windows = [eval_windows(d, split, tok, max_windows=max(1, tokens // DEFAULT_CONTEXT)) for d in domains]
        self.n_scored = sum(w.n_scored for w in self.windows)
        fp = self._fn(fp_path)
        self.fp_logprobs = [window_logprobs(fp, w) for w in self.windows]
        self.fp_scores = [score(fp, w) for w in self.windows]
        self.fp_ppl = float(np.exp(self.fp_scores[0].nll.mean()))
        self._cache: dict[str, dict] = {}

    @staticmethod
    def _fn(path: Path) -> NumpyLogits:
        return NumpyLogits(load_artifact(path, verify=False, threads=1).logits)

    def score(self, path: Path, key: str) -> dict:
        """``{"ppl", "dppl_pct", "kl", "ppl_<domain>", "kl_<domain>", "quality"}`` of the artifact at ``path``
        (cached under ``key``)."""
        if key not in self._cache:
            fn = self._fn(path)
            out: dict = {"quality": {}}
            for i, (w, ref, fp) in enumerate(zip(self.windows, self.fp_logprobs, self.fp_scores)):
                s = score(fn, w, reference=ref)
                q = summarize(w, {"fp32": fp, "artifact": s}, baseline="fp32")["artifact"]
                out["quality"][w.name] = {**q, "windows": w.record()["windows"], "documents": len(w.doc_keys)}
                suffix = "" if i == 0 else "_" + w.name.split("/")[0]
                out["ppl" + suffix], out["kl" + suffix] = q["ppl"]["value"], q["kl"]["value"]
            out["dppl_pct"] = 100 * (out["ppl"] / self.fp_ppl - 1)
            self._cache[key] = out
        return self._cache[key]

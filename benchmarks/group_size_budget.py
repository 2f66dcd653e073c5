"""Group 64 or 128 on ort-cpu? Quality of the default compile at each group size, at equal stored bits.

For each model and group size G (``--groups``, default 64,128) compile for ort-cpu

* ``default-gG``: no budget flags (the target's default ``--budget-bits``, non-expert weights
  placed by the default allocator with the default sensitivity), ``--group-size G``. The budget is
  stored bits per weight, so a larger group (fewer scales and zero points per weight) leaves the
  allocator room for more bits: this is the comparison at the same stored-bits budget;
* ``uniform4-gG``: the control without allocation, every quantizable weight at 4 bits
  (``--allocator uniform --budget-code-bits 4 --nonexpert-bits 4``): what the group size alone costs.

Every artifact is scored under the evaluation protocol (docs/evaluation.md) on both built-in domains
(pydoc, pystdlib) of ``--split`` (dev for choosing, test for reporting once after the choice), against
the float checkpoint's log-probabilities (reference interpreter, scored once per set): perplexity, KL,
top-1 agreement, each with a 95 % bootstrap interval over documents. The comparison is paired: KL ratio
``KL(gB) / KL(gA)`` and perplexity ratio ``ppl(gB) / ppl(gA)`` for each later group B against the first
group A, on the same windows with the same resampled documents. Since all bundled samples share one
tokenizer, every model scores the same windows, and the pooled row is the geometric mean of the models'
ratios, each bootstrap replicate drawing the same documents for every model.

    python benchmarks/group_size_budget.py --models samples/mixtral-tiny samples/olmoe-tiny \\
        /tmp/samples/mixtral-h256 /tmp/samples/qwen3-moe-fine --split dev \\
        --json benchmarks/results/group-size-budget-dev.json

(``mixtral-h256`` and ``qwen3-moe-fine`` are rebuilt by ``samples/rebuild.py``, samples/README.md.)
One thread for torch and onnxruntime: the figures are quality, not speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmpq_compile.commands.eval import model_logits_fn
from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.eval import NumpyLogits
from dmpq_compile.eval.protocol import DocBootstrap, eval_windows, format_interval, score, summarize, window_logprobs
from dmpq_compile.eval.tokens import load_tokenizer
from dmpq_compile.runtime import load as load_artifact
from dmpq_compile.sysinfo import cpu_model, git_commit, load_average

CORPORA = ("pydoc", "pystdlib")


def variants(group: int) -> dict[str, CompileConfig]:
    """The default compile and the uniform 4-bit control at ``group``, for ort-cpu."""
    q = {"group_size": group}
    return {f"default-g{group}": CompileConfig.from_dict({"target": "ort-cpu", "quantize": q}),
            f"uniform4-g{group}": CompileConfig.from_dict({
                "target": "ort-cpu", "quantize": q,
                "allocate": {"allocator": "uniform", "budget_kind": "bits", "budget": 4.0, "nonexpert_bits": 4,
                             "nonexpert_allocate": False}})}


def compile_row(model: str, name: str, cfg: CompileConfig, folder: Path) -> tuple[Path, dict]:
    art = folder / f"{Path(model).name}-{name}"
    t0 = time.perf_counter()
    compile_model(model, art, cfg, progress=False, overwrite=True)
    report = json.loads((art / "report.json").read_text())
    s = report["storage"]
    bits = [r["bits"] for r in report["experts"]]
    a = report["config"]["allocate"]
    return art, {"variant": name, "group_size": report["config"]["quantize"]["group_size"],
                 "budget": f"{a['budget']:g} {a['budget_kind']}",
                 "stored_bpw": s["bits_per_weight"], "weights_bpw": s["weights"]["bits_per_weight"],
                 "experts_by_bits": {b: bits.count(b) for b in sorted(set(bits))},
                 "nonexpert_bits": {r["id"]: r["bits"] for r in report["nonexpert"]},
                 "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    p.add_argument("--groups", default="64,128", help="group sizes; ratios are each later one over the first")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA, help="built-in domains to score")
    p.add_argument("--windows", type=int, default=64, help="at most this many windows per set")
    p.add_argument("--work", help="folder for the artifacts (default: a temporary one, removed)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    groups = [int(g) for g in a.groups.split(",")]
    if len(groups) < 2:
        p.error("--groups needs at least two group sizes to compare")
    args = sys.argv[1:] if argv is None else argv
    meta = {"command": "python benchmarks/group_size_budget.py " + " ".join(args), "commit": git_commit(), "cpu": cpu_model(),
            "load_start": load_average(), "split": a.split, "groups": groups, "threads": 1}
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="dmpq-gs-"))
    models, pooled_logs = [], {}
    try:
        for model in a.models:
            tok = load_tokenizer(model)
            arts, rows = {}, {}
            for g in groups:
                for name, cfg in variants(g).items():
                    arts[name], rows[name] = compile_row(model, name, cfg, work)
                    print(json.dumps({"model": model, **rows[name]}), flush=True)
            ref_fn = model_logits_fn(model)[0]
            sets = {}
            for corpus in a.corpora:
                w = eval_windows(corpus, a.split, tok, max_windows=a.windows)
                ref = window_logprobs(ref_fn, w)
                scores = {name: score(NumpyLogits(load_artifact(art, threads=1).logits), w, reference=ref)
                          for name, art in arts.items()}
                boot = DocBootstrap(w)
                summary = summarize(w, scores, boot=boot)
                pairs = {}
                for kind in ("default", "uniform4"):
                    base = f"{kind}-g{groups[0]}"
                    for g in groups[1:]:
                        other = f"{kind}-g{g}"
                        key = f"{other}/{base}"
                        pairs[key] = {"kl_ratio": boot.ratio(scores[other].kl, scores[base].kl).as_dict(),
                                      "ppl_ratio": boot.ppl_ratio(scores[other].nll, scores[base].nll).as_dict()}
                        # pooled across models: per-model log ratios on the same windows and replicates
                        lr = {}
                        for label, fld in (("kl", "kl"), ("nll", "nll")):
                            mo, ro = boot.replicates(getattr(scores[other], fld))
                            mb, rb = boot.replicates(getattr(scores[base], fld))
                            lr[label] = (math.log(mo / mb), np.log(ro / rb)) if label == "kl" else (mo - mb, ro - rb)
                        pooled_logs.setdefault((w.name, key), []).append((w.record()["ids_sha256"], lr))
                fp_ppl = boot.ppl(next(iter(scores.values())).ref_nll).as_dict()
                sets[w.name] = {**w.record(), "bootstrap": boot.record(), "fp32_ppl": fp_ppl, "models": summary,
                                "pairs": pairs}
                for key, r in pairs.items():
                    print(f"{Path(model).name} {w.name} {key}: KL ratio {format_interval(r['kl_ratio'], '{:.3f}')} "
                          f"ppl ratio {format_interval(r['ppl_ratio'], '{:.4f}')}", flush=True)
                for name, s in summary.items():
                    print(f"  {name}: KL {format_interval(s['kl'], '{:.3e}')} ppl {format_interval(s['ppl'], '{:.3f}')} "
                          f"({rows[name]['stored_bpw']:.2f} stored bpw)", flush=True)
            models.append({"model": model, "artifacts": rows, "sets": sets})
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    pooled = {}
    for (set_name, key), items in pooled_logs.items():
        if len(items) != len(a.models) or len({h for h, _ in items}) != 1:
            continue  # not every model scored the same windows: no pooled figure
        row = {"models": len(items)}
        for label in ("kl", "nll"):
            point = sum(lr[label][0] for _, lr in items) / len(items)
            reps = sum(lr[label][1] for _, lr in items) / len(items)
            lo, hi = np.quantile(reps, [0.025, 0.975])
            row["kl_ratio_geomean" if label == "kl" else "ppl_ratio_geomean"] = {
                "value": math.exp(point), "lo": float(np.exp(lo)), "hi": float(np.exp(hi))}
        pooled[f"{set_name} {key}"] = row
    print(f"\npooled over {len(a.models)} models (geometric mean of the paired ratios, 95 % bootstrap over documents):")
    for k, r in pooled.items():
        print(f"  {k}: KL ratio {format_interval(r['kl_ratio_geomean'], '{:.3f}')} "
              f"ppl ratio {format_interval(r['ppl_ratio_geomean'], '{:.4f}')}")
    print("\n| model | set | variant | stored bpw | experts by bits | KL [95 %] | ppl [95 %] |")
    print("|---|---|---|---:|---|---|---|")
    for m in models:
        for set_name, s in m["sets"].items():
            for name, q in s["models"].items():
                r = m["artifacts"][name]
                print(f"| {Path(m['model']).name} | {set_name} | {name} | {r['stored_bpw']:.2f} | "
                      f"{r['experts_by_bits']} | {format_interval(q['kl'], '{:.3e}')} | "
                      f"{format_interval(q['ppl'], '{:.3f}')} |")
    meta["load_end"] = load_average()
    if a.json:
        Path(a.json).write_text(json.dumps({**meta, "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                                            "models": models, "pooled": pooled}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ablation: RTN vs strong PTQ (GPTQ, HQQ) vs QAT at the same allocation, measured on artifacts.

For one sample: the exact-optimum allocation at each budget (default 3 and 4 average bits) is
fixed, then the experts are quantized with each method and emitted for ort-cpu. Every artifact
is scored on the test split (perplexity measured on the artifact) and compared with the FP32
artifact (KL(FP || variant) per token over the same windows).

    python benchmarks/ablation_quant.py --model samples/mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from alloc_common import RESULTS, ArtifactScorer, calibration
from dmpq_compile.passes import make_pass

from dmpq_compile.compiler import CompileConfig, analysis_passes, emit, get_backend, run_passes
from dmpq_compile.eval.protocol import format_quality
from dmpq_compile.frontend import load

VARIANTS = {  # name -> (qat, quantize method)
    "rtn": (False, "rtn"),
    "hqq": (False, "hqq"),
    "gptq": (False, "gptq"),
    "qat+rtn": (True, "rtn"),
    "qat+gptq": (True, "gptq"),
}


def variant_graph(graph, model, cfg, calib, qat_calib, budget, qat, method, qat_steps):
    backend = get_backend(cfg.target)
    g, recs = run_passes(graph.copy(), [make_pass("allocate", allocator="optimal", budget=budget)], model, cfg,
                         backend, progress=False, calibration=calib)
    stats = {}
    if qat:
        g, r = run_passes(g, [make_pass("qat", steps=qat_steps, group_size=cfg.quantize.group_size, time_budget_s=900)],
                          model, cfg, backend, progress=True, calibration=qat_calib)
        stats = r[0].stats
        recs += r
    g, r = run_passes(g, [make_pass("quantize", method=method, group_size=cfg.quantize.group_size)], model, cfg, backend,
                      progress=False, calibration=calib)
    return g, recs + r, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--budgets", default="3,4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--qat-sequences", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--work", default="/tmp/dmpq-ablation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = Path(args.model).name
    cfg = CompileConfig.from_dict({"target": "ort-cpu", "allocate": {"allocator": "optimal"}})
    calib = calibration(args.model, cfg)
    qat_calib = calibration(args.model, cfg.replace(calibration={"sequences": args.qat_sequences}))
    graph = load(args.model)
    graph.meta["group_size"] = cfg.quantize.group_size
    graph, _ = run_passes(graph, analysis_passes(cfg, get_backend(cfg.target)), args.model, cfg,
                          get_backend(cfg.target), progress=True, calibration=calib)
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    fp_graph, _, _ = variant_graph(graph, args.model, cfg, calib, qat_calib, 16.0, False, "rtn", 0)
    scorer = ArtifactScorer(args.model, emit(fp_graph, cfg, work / "fp32", [], 0.0), args.eval_tokens, cfg)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for variant in args.variants.split(","):
            qat, method = VARIANTS[variant]
            t0 = time.perf_counter()
            g, recs, qat_stats = variant_graph(graph, args.model, cfg, calib, qat_calib, budget, qat, method,
                                               args.qat_steps)
            seconds = time.perf_counter() - t0
            label = f"{variant}-{budget:g}"
            score = scorer.score(emit(g, cfg, work / label, recs, seconds), label)
            rows.append({"budget": budget, "variant": variant, **score, "seconds": seconds, "qat": qat_stats})
            print(f"{budget:>4g} {variant:>9}: {format_quality(score['quality'])}  ({seconds:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ablation-{name}.json").write_text(json.dumps(
        {"model": args.model, "fp32_ppl": scorer.fp_ppl, "eval_tokens": scorer.n_scored, "eval_sets": [w.record() for w in scorer.windows], "rows": rows,  # noqa: E501
         "command": "python benchmarks/ablation_quant.py " + " ".join(
             f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}, indent=1))


if __name__ == "__main__":
    main()

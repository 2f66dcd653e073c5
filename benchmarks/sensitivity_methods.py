"""Sensitivity methods side by side: layer-local Fisher estimate (default) vs the whole-model run.

For one sample: the analysis (profile, cost) runs once; sensitivity runs with each method
(``whole``: measured KL of the whole model with one expert quantized, quadratic in depth;
``local``: Fisher-weighted layer-local error, linear in depth, with 1 and 4 label samples);
each one's exact-optimum allocation at every budget is emitted for ort-cpu and scored on the
test split on the artifact: perplexity and KL to the FP32 artifact over the same windows. The
control is the ``frequency`` allocator, which uses no sensitivity at all: a method is only
useful where it beats it. Wall time of each sensitivity run is printed next to it.

    python benchmarks/sensitivity_methods.py --model samples/mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from alloc_common import BASE, RESULTS, ArtifactScorer, calibration, emit_allocation, machine
from dmpq_compile.passes import make_pass

from dmpq_compile.compiler import get_backend, run_passes
from dmpq_compile.eval.protocol import format_quality
from dmpq_compile.frontend import load

METHODS = {"whole": {"method": "whole"}, "local": {"method": "local", "label_samples": 1},
           "local-4": {"method": "local", "label_samples": 4}}


def allocation(graph, model, calib, allocator: str, budget: float) -> dict[str, int]:
    g, _ = run_passes(graph.copy(), [make_pass("allocate", allocator=allocator, budget=budget)], model, BASE,
                      get_backend(BASE.target), False, calibration=calib)
    return {n.id: int(n.ann["bits"]) for n in g.experts()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--budgets", default="3,3.5")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--work", default="/tmp/dmpq-sens-methods")
    args = ap.parse_args()
    name = Path(args.model).name
    calib = calibration(args.model)
    base = load(args.model)
    base.meta["group_size"] = BASE.quantize.group_size
    base, _ = run_passes(base, [make_pass("profile"), make_pass("cost")], args.model, BASE, get_backend(BASE.target),
                         False, calibration=calib)
    analysed, seconds = {}, {}
    for label, opts in METHODS.items():
        t0 = time.perf_counter()
        sens = make_pass("sensitivity", gradvar=False, max_sequences=BASE.sensitivity.sequences, **opts)
        analysed[label], _ = run_passes(base.copy(), [sens], args.model, BASE, get_backend(BASE.target), False,
                                        calibration=calib)
        seconds[label] = time.perf_counter() - t0
        print(f"sensitivity {label:>8}: {seconds[label]:.1f} s", flush=True)
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    fp = emit_allocation(base, args.model, {n.id: 16 for n in base.experts()}, work, "fp32")
    scorer = ArtifactScorer(args.model, fp, args.eval_tokens)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        variants = [(label, g, "optimal") for label, g in analysed.items()] + [("frequency", base, "frequency")]
        for label, g, allocator in variants:
            bits = allocation(g, args.model, calib, allocator, budget)
            path = emit_allocation(base, args.model, bits, work, f"{label}-{budget:g}")
            rows.append({"budget": budget, "sensitivity": label, "allocator": allocator,
                         **scorer.score(path, f"{label}-{budget:g}")})
            print(f"{budget:>4g} {label:>9}: {format_quality(rows[-1]['quality'])}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sensitivity-methods-{name}.json").write_text(json.dumps(
        {"model": args.model, "fp32_ppl": scorer.fp_ppl, "eval_tokens": scorer.n_scored, "eval_sets": [w.record() for w in scorer.windows],  # noqa: E501
         "sensitivity_seconds": seconds, "rows": rows, "machine": machine(),
         "command": f"python benchmarks/sensitivity_methods.py --model {args.model} --budgets {args.budgets}"},
        indent=1))


if __name__ == "__main__":
    main()

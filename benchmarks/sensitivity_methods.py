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
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from dmpq_compile.passes import make_pass

from dmpq_compile.compiler import (
    CompileConfig,
    calibration_ids,
    emit,
    eos_token,
    get_backend,
    load_tokenizer,
    run_passes,
)
from dmpq_compile.eval import kl_divergence, load_corpus, perplexity, tokenize_corpus
from dmpq_compile.frontend import load
from dmpq_compile.runtime import load as load_artifact

RESULTS = Path(__file__).parent / "results"
METHODS = {"whole": {"method": "whole"}, "local": {"method": "local", "label_samples": 1},
           "local-4": {"method": "local", "label_samples": 4}}


def logits_fn(path):
    session = load_artifact(path, verify=False)
    return lambda ids: torch.from_numpy(session.logits(ids.numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--budgets", default="3,3.5")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--work", default="/tmp/dmpq-sens-methods")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = Path(args.model).name
    cfg = CompileConfig(target="ort-cpu", allocator="optimal")
    backend = get_backend(cfg.target)
    calib = calibration_ids(args.model, cfg.calib_corpus, cfg.calib_sequences, cfg.seq_len)
    base = load(args.model)
    base.meta["group_size"] = cfg.group_size
    base, _ = run_passes(base, [make_pass("profile"), make_pass("cost")], args.model, cfg, backend, False,
                         calibration=calib)
    analysed, seconds = {}, {}
    for label, opts in METHODS.items():
        t0 = time.perf_counter()
        g, _ = run_passes(base.copy(), [make_pass("sensitivity", gradvar=False, max_sequences=cfg.sensitivity_sequences,
                                                   **opts)], args.model, cfg, backend, False, calibration=calib)
        seconds[label] = time.perf_counter() - t0
        analysed[label] = g
        print(f"sensitivity {label:>8}: {seconds[label]:.1f} s", flush=True)
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)

    def artifact(graph, allocator, budget, tag):
        g, _ = run_passes(graph.copy(), [make_pass("allocate", allocator=allocator, budget=budget),
                                         make_pass("quantize", group_size=cfg.group_size)],
                          args.model, cfg, backend, False, calibration=calib)
        return emit(g, cfg, work / tag, [], 0.0)

    fp_fn = logits_fn(artifact(base, "uniform", 16.0, "fp32"))
    tok = load_tokenizer(args.model)
    ids = tokenize_corpus(load_corpus(cfg.calib_corpus, "test"), tok, separator=eos_token(tok),
                          max_tokens=args.eval_tokens)
    fp_ppl = perplexity(fp_fn, ids, progress=False).ppl
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        variants = [(label, g, "optimal") for label, g in analysed.items()] + [("frequency", base, "frequency")]
        for label, g, allocator in variants:
            fn = logits_fn(artifact(g, allocator, budget, f"{label}-{budget:g}"))
            ppl = perplexity(fn, ids, progress=False).ppl
            kl = kl_divergence(fp_fn, fn, ids, progress=False).kl
            rows.append({"budget": budget, "sensitivity": label, "allocator": allocator, "ppl": ppl,
                         "dppl_pct": 100 * (ppl / fp_ppl - 1), "kl": kl})
            print(f"{budget:>4g} {label:>9}: ppl {ppl:.4f} ({rows[-1]['dppl_pct']:+.3f} % vs FP {fp_ppl:.4f})  "
                  f"KL {kl:.5f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sensitivity-methods-{name}.json").write_text(json.dumps(
        {"model": args.model, "fp32_ppl": fp_ppl, "eval_tokens": len(ids), "sensitivity_seconds": seconds,
         "rows": rows, "commit": commit, "loadavg": os.getloadavg(),
         "command": f"python benchmarks/sensitivity_methods.py --model {args.model} --budgets {args.budgets}"},
        indent=1))


if __name__ == "__main__":
    main()

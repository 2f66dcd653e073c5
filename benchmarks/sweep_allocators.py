"""Sweep every allocator over average-bit budgets and measure the emitted artifacts.

For one sample model: the budget-independent analysis (profile, sensitivity, cost table) runs
once; then for each allocator and budget the allocation + quantization passes run on a copy,
an ort-cpu artifact is emitted, and all artifacts are benchmarked together in one interleaved
run (decode ms/token, weight bytes, perplexity measured on the artifact itself).

Writes ``benchmarks/results/sweep-<sample>.json`` and ``.png`` (perplexity vs decode latency and
vs weight MB, one line per allocator) and prints a table plus, per budget, how the RL policy's
measured perplexity compares with the exact optimum's.

    python benchmarks/sweep_allocators.py --model samples/mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from dmpq_compile.passes.allocate import InfeasibleBudgetError

from dmpq_compile.bench import BenchConfig, bench
from dmpq_compile.compiler import (
    CompileConfig,
    allocation_passes,
    analysis_passes,
    calibration_ids,
    emit,
    get_backend,
    run_passes,
)
from dmpq_compile.eval.protocol import format_quality
from dmpq_compile.frontend import load

ALLOCATORS = ("uniform", "frequency", "gradvar", "optimal", "rl")
RESULTS = Path(__file__).parent / "results"


def analyse(model: str, cfg: CompileConfig, calib: torch.Tensor):
    backend = get_backend(cfg.target)
    graph = load(model)
    graph.meta["group_size"] = cfg.quantize.group_size
    graph, _ = run_passes(graph, analysis_passes(cfg, backend), model, cfg, backend, progress=True,
                          calibration=calib)
    return graph


def build(graph, model: str, base: CompileConfig, calib, out_root: Path, budgets, allocators) -> list[dict]:
    backend = get_backend(base.target)
    built = []
    for alloc in allocators:
        for budget in budgets:
            cfg = base.replace(allocate={"allocator": alloc, "budget": budget})
            t0 = time.perf_counter()
            try:
                g, recs = run_passes(graph.copy(), allocation_passes(cfg), model, cfg, backend, progress=False,
                                     calibration=calib)
            except Exception as e:  # infeasible budgets are part of the sweep, not failures
                if isinstance(e.__cause__, InfeasibleBudgetError) or isinstance(e, InfeasibleBudgetError):
                    print(f"skip {alloc} @ {budget}: {e}")
                    continue
                raise
            out = emit(g, cfg, out_root / f"{alloc}-{budget:g}", recs, time.perf_counter() - t0, overwrite=True)
            bits = [n.ann["bits"] for n in g.experts()]
            sizes = [sum(g.weights[n.params[r]].numel() for r in ("gate", "up", "down")) for n in g.experts()]
            avg = sum(b * s for b, s in zip(bits, sizes)) / sum(sizes)
            built.append({"allocator": alloc, "budget": budget, "avg_bits": avg, "artifact": str(out),
                          "allocate_seconds": next(r.seconds for r in recs if r.name == "allocate")})
            print(f"built {alloc:>9} @ {budget:<4g} avg bits {avg:.3f}")
    return built


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for alloc in ALLOCATORS:
        pts = sorted((r for r in rows if r["allocator"] == alloc), key=lambda r: r["budget"])
        if not pts:
            continue
        for ax, key, label in ((axes[0], "decode_ms", "decode ms / token (measured)"),
                               (axes[1], "weight_bytes", "artifact weight MB")):
            xs = [p[key] / (2**20 if key == "weight_bytes" else 1) for p in pts]
            ax.plot(xs, [p["ppl"] for p in pts], marker="o", label=alloc)
            ax.set_xlabel(label)
            ax.set_ylabel("test perplexity (measured on the artifact)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,5,6")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS))
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per set (docs/evaluation.md)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/dmpq-sweep", help="where the artifacts are written")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = Path(args.model).name
    base = CompileConfig.from_dict({"target": "ort-cpu", "calibration": {"sequences": 32}, "sensitivity": {"sequences": 16}})
    c = base.calibration
    calib = calibration_ids(args.model, c.corpus, c.sequences, c.seq_len)
    t0 = time.perf_counter()
    graph = analyse(args.model, base, calib)
    analysis_s = time.perf_counter() - t0
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    built = build(graph, args.model, base, calib, work, budgets, args.allocators.split(","))
    fp = emit(analyse_fp(graph, args.model, base, calib), base, work / "fp32", [], 0.0, overwrite=True)
    results = bench([fp] + [b["artifact"] for b in built], BenchConfig(
        rounds=args.rounds, decode_tokens=16, threads=args.threads, windows=args.windows, rss=False))
    fp_row, rows = results[0], []
    for b, r in zip(built, results[1:]):
        rows.append({**b, **{k: r[k] for k in ("decode_ms", "weight_bytes", "ppl", "prefill_tok_s", "quality")}})
    RESULTS.mkdir(exist_ok=True)
    out = {"model": args.model, "analysis_seconds": analysis_s, "fp32": fp_row, "rows": rows,
           "command": "python benchmarks/sweep_allocators.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    (RESULTS / f"sweep-{name}.json").write_text(json.dumps(out, indent=1))
    plot(rows, RESULTS / f"sweep-{name}.png", f"{name}: allocators vs budget (ort-cpu, FP32 ppl "
                                               f"{fp_row['ppl']:.3f})")
    report(rows, fp_row)


def analyse_fp(graph, model, base, calib):
    """The FP32 reference: every expert at 16 bits, through the same passes."""
    cfg = base.replace(allocate={"allocator": "uniform", "budget": 16.0})
    g, _ = run_passes(graph.copy(), allocation_passes(cfg), model, cfg, get_backend(cfg.target), progress=False,
                      calibration=calib)
    return g


def report(rows: list[dict], fp: dict) -> None:
    print(f"FP32: ppl {fp['ppl']:.4f}  decode {fp['decode_ms']:.3f} ms  weights {fp['weight_bytes'] / 2**20:.2f} MB")
    print(f"{'allocator':>10} {'budget':>6} {'avg bits':>8} {'ppl':>9} {'dppl%':>7} {'decode ms':>9} {'MB':>7}")
    for r in sorted(rows, key=lambda r: (r["budget"], r["allocator"])):
        print(f"{r['allocator']:>10} {r['budget']:>6g} {r['avg_bits']:>8.3f} {r['ppl']:>9.4f} "
              f"{100 * (r['ppl'] / fp['ppl'] - 1):>7.2f} {r['decode_ms']:>9.3f} {r['weight_bytes'] / 2**20:>7.2f}  "
              f"{format_quality(r['quality'])}")
    by = {(r["allocator"], r["budget"]): r for r in rows}
    for budget in sorted({r["budget"] for r in rows}):
        rl, opt = by.get(("rl", budget)), by.get(("optimal", budget))
        if rl and opt:
            verdict = "at least as good" if rl["ppl"] <= opt["ppl"] * (1 + 1e-9) else "worse"
            print(f"budget {budget:g}: rl ppl {rl['ppl']:.4f} vs optimal {opt['ppl']:.4f} -> {verdict} "
                  f"({100 * (rl['ppl'] / opt['ppl'] - 1):+.3f} %)")


if __name__ == "__main__":
    main()

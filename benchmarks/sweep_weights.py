"""Reward weights: sweep w_lat and w_mem at w_acc = 1 and measure the Pareto front of the artifacts.

For one sample, the analysed IR (profile, KL sensitivity, ort-cpu cost table measured on this
machine) is reused from the allocator ablation's work folder when present. With no budget
constraint (16 average bits), the exact optimum of ``KL + w_lat * L + w_mem * M`` (``L``, ``M``:
expected expert decode time and expert bytes from the ort-cpu table, each relative to all
16-bit; energy is not swept: on this machine it would come from the analytical model only) is
emitted for every (w_lat, w_mem) on the grid. Every distinct artifact is then measured: decode
ms/token (interleaved, 1 thread), artifact weight bytes, test perplexity and KL to the FP32
artifact. Points that no other point beats on all three of decode ms, bytes and perplexity form
the Pareto front. JSON and PNG go to ``results/weights-<sample>.{json,png}``.

    python benchmarks/sweep_weights.py --model samples/mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from alloc_common import (
    RESULTS,
    ArtifactScorer,
    analysed_graph,
    average_bits,
    calibration,
    digest,
    emit_allocation,
    machine,
)
from dmpq_compile.passes.allocate import solve
from dmpq_compile.passes.allocate.base import AllocateOptions, build_problem
from dmpq_compile.passes.allocate.measure import energy_source
from dmpq_compile.passes.infra.base import PassContext

from dmpq_compile.bench import BenchConfig, bench
from dmpq_compile.eval.protocol import format_quality


def pareto(points: list[dict], keys=("decode_ms", "weight_bytes", "ppl")) -> list[bool]:
    """Whether each point is on the front (no other point is <= on every key and < on one)."""
    def beats(a: dict, b: dict) -> bool:
        return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)

    return [not any(beats(q, p) for q in points if q is not p) for p in points]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    pairs = (("decode_ms", "ppl", "decode ms / token (measured)", "test perplexity (artifact)"),
             ("weight_mb", "ppl", "artifact weight MB", "test perplexity (artifact)"),
             ("decode_ms", "weight_mb", "decode ms / token (measured)", "artifact weight MB"))
    for ax, (x, y, xl, yl) in zip(axes, pairs):
        for front, style in ((False, {"c": "0.7", "marker": "o", "label": "dominated"}),
                             (True, {"c": "C3", "marker": "*", "s": 120, "label": "Pareto front"})):
            pts = [r for r in rows if r["pareto"] == front]
            ax.scatter([p[x] for p in pts], [p[y] for p in pts], **style)
        for r in rows:
            if r["pareto"]:
                ax.annotate(f"{r['w_lat']:g}/{r['w_mem']:g}", (r[x], r[y]), fontsize=7)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    axes[0].legend()
    fig.suptitle(title + "  (labels: w_lat / w_mem at w_acc = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--grid", default="0,0.0003,0.001,0.003,0.01,0.03", help="values of w_lat and of w_mem")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/dmpq-ablation-alloc")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = Path(args.model).name
    work = Path(args.work) / name
    calib = calibration(args.model)
    graph, _ = analysed_graph(args.model, work, True, calib)
    from dmpq_compile.backends import get_backend

    ctx = PassContext(calibration=calib, target="ort-cpu", backend=get_backend("ort-cpu"), progress=False)
    meta = machine()
    grid = [float(w) for w in args.grid.split(",")]
    rows, paths = [], {}
    for w_lat in grid:
        for w_mem in grid:
            opts = AllocateOptions(allocator="optimal", budget=16.0, w_lat=w_lat, w_mem=w_mem)
            alloc = solve(build_problem(graph, opts, ctx)).allocation
            key = digest(alloc)
            if key not in paths:
                paths[key] = emit_allocation(graph, args.model, alloc, work / "weights", key)
            rows.append({"w_lat": w_lat, "w_mem": w_mem, "digest": key, "avg_bits": average_bits(graph, alloc),
                         "bits_histogram": {b: list(alloc.values()).count(b) for b in (2, 4, 8, 16)}})
    fp = emit_allocation(graph, args.model, {n.id: 16 for n in graph.experts()}, work / "weights", "fp32")
    scorer = ArtifactScorer(args.model, fp, args.eval_tokens)
    keys = list(paths)
    measured = bench([paths[k] for k in keys], BenchConfig(rounds=args.rounds, decode_tokens=16, threads=1,
                                                           quality=(), rss=False), progress=False)
    by = {k: {"decode_ms": m["decode_ms"], "decode_ms_iqr": m["decode_ms_iqr"], "weight_bytes": m["weight_bytes"],
              "weight_mb": m["weight_bytes"] / 2**20, **scorer.score(paths[k], k)} for k, m in zip(keys, measured)}
    for r in rows:
        r.update(by[r["digest"]])
    distinct = [dict(by[k], digest=k, **{f: next(r[f] for r in rows if r["digest"] == k)
                                         for f in ("w_lat", "w_mem", "avg_bits", "bits_histogram")}) for k in keys]
    for d, front in zip(distinct, pareto(distinct)):
        d["pareto"] = front
    for r in rows:
        r["pareto"] = next(d["pareto"] for d in distinct if d["digest"] == r["digest"])
    for d in sorted(distinct, key=lambda d: d["decode_ms"]):
        print(f"w_lat {d['w_lat']:<6g} w_mem {d['w_mem']:<6g} bits {d['avg_bits']:5.2f} decode {d['decode_ms']:.3f} ms "
              f"MB {d['weight_mb']:.2f} {format_quality(d['quality'])} {'*' if d['pareto'] else ''}")
    out = {"model": args.model, "fp32_ppl": scorer.fp_ppl, "eval_tokens": scorer.n_scored, "eval_sets": [w.record() for w in scorer.windows],  # noqa: E501
           "energy": f"{energy_source()}: not swept", "machine_start": meta, "machine_end": machine(),
           "rows": rows, "distinct": distinct, "command": "python benchmarks/sweep_weights.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"weights-{name}.json").write_text(json.dumps(out, indent=1))
    plot(distinct, RESULTS / f"weights-{name}.png", f"{name}: reward weights, measured on ort-cpu artifacts")
    print(f"wrote {RESULTS / f'weights-{name}.json'}")


if __name__ == "__main__":
    main()

"""Time and memory of the exact allocator (``optimal``) at real model shapes, and what the grid DP it replaced gave.

Problems: :func:`dmpq_compile.passes.allocate.synthetic.stored_bits_problem`, whole-model stored-bits
budgets with the non-expert items of ``--nonexpert-bits auto`` among the routed experts, stored bytes from
the ort-cpu backend's ``weight_bytes`` (group 64), widths 2/4/8/16 (the embedding 4/8/16); frequencies and
sensitivities synthetic (no trained model of these sizes runs here). Shapes:

* OLMoE-1B-7B: 16 x 64 experts (2048 x 1024) + 16 attention items + embedding + lm_head = 1042 items;
* Qwen3-30B-A3B: 48 x 128 experts (2048 x 768) + 48 x 2 attention items (q/k/v, o) + 2 = 6242 items;
* DeepSeek-V3 (approximate): 58 x 256 experts (7168 x 2048) + 58 x 2 attention items, MLA drawn as
  dense q (16384) / kv (2048) / o projections, the 3 dense layers left out, + 2 = 14966 items.

Per shape and budget (3.0, 4.0, 5.5 stored bits per weight): the median of ``--repeat`` solve times, the
peak memory the solve allocates (tracemalloc, numpy included), whether it is proven optimal, the longest
Pareto list of the core DP, and for OLMoE the grid DP (``max_states=1`` forces it; the old default route,
plus the incumbent comparison) side by side: its time, memory, objective and proven gap. The grid DP is
not run at the larger shapes: its choice table alone would be 0.6 GB (Qwen3) and 1.5 GB (DeepSeek-V3).

Fused dispatch (``--fused``): the OLMoE experts (no non-expert items: they have no cost table) under a
``--budget-ms`` budget at 25/50/75 % of the way from the cheapest allocation to all 16 bits, with 4- and
8-bit groups that can fuse (proxy costs, not measured: fused routed cost 0.6 x the per-expert one, a
fixed part of 0.02 ms per layer and width): the fused core DP and, side by side, the grid DP (its
objective and the proven gap it reports).

Command: ``python benchmarks/bench_exact_alloc.py --fused`` (writes ``results/exact-alloc-<time>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

from dmpq_compile.backends import get_backend
from dmpq_compile.passes.allocate import Budget
from dmpq_compile.passes.allocate.optimal import solve
from dmpq_compile.passes.allocate.problem import budget_usage, min_feasible_budget
from dmpq_compile.passes.allocate.synthetic import bytes_proxy_cost, stored_bits_problem, synthetic_problem

from dmpq_compile.sysinfo import cpu_flags, git_commit, machine

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "olmoe-1b-7b": {},
    "qwen3-30b-a3b": {"n_layers": 48, "n_experts": 128, "intermediate": 768, "q_dim": 4096, "kv_dim": 512,
                      "vocab": 151936, "attn_items": 2},
    "deepseek-v3": {"n_layers": 58, "n_experts": 256, "hidden": 7168, "intermediate": 2048, "q_dim": 16384,
                    "kv_dim": 2048, "vocab": 129280, "attn_items": 2},
}


def measure(problem, repeat: int, **kw) -> dict:
    """Median solve time over ``repeat`` runs, then one traced run for the peak allocation."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sol = solve(problem, **kw)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    solve(problem, **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": statistics.median(times), "times": times, "peak_mb": peak / 2**20, "exact": sol.exact,
            "objective": sol.objective, "lower_bound": sol.lower_bound, "gap": sol.gap,
            "longest_list_or_cells": sol.cells}


def fused_rows(repeat: int) -> list[dict]:
    """The fused-dispatch latency budgets (module docstring)."""
    n_params = 3 * 2048 * 1024
    cost = {}
    for b in (2, 4, 8, 16):
        c = bytes_proxy_cost(n_params, b)
        fused = (0.6 * c.decode_ms, 0.6 * c.prefill_ms, 0.02, 0.02) if b in (4, 8) else (None, None, 0.0, 0.0)
        cost[b] = dataclasses.replace(c, idle_decode_ms=0.002, fused_decode_ms=fused[0], fused_prefill_ms=fused[1],
                                      group_decode_ms=fused[2], group_prefill_ms=fused[3])
    p0 = synthetic_problem(budget=Budget("latency", 1e9), cost=cost)
    lo, hi = min_feasible_budget(p0), budget_usage(p0, {e.key: 16 for e in p0.experts})
    rows = []
    for frac in (0.25, 0.5, 0.75):
        problem = dataclasses.replace(p0, budget=Budget("latency", lo + frac * (hi - lo)))
        row = {"shape": "olmoe-1b-7b-fused", "items": len(problem.experts), "budget_ms": problem.budget.value,
               "budget_frac": frac, "core": measure(problem, repeat), "grid": measure(problem, repeat, max_states=1)}
        c, g = row["core"], row["grid"]
        row["time_ratio_grid_over_core"] = g["seconds"] / c["seconds"]
        row["objective_grid_minus_core"] = g["objective"] - c["objective"]
        print(f"olmoe fused    {len(problem.experts):6d} items  {frac:.2f} of the way  core {c['seconds']:.3f}s "
              f"{c['peak_mb']:.1f} MB exact={c['exact']} list={c['longest_list_or_cells']} | grid {g['seconds']:.3f}s "
              f"{g['peak_mb']:.1f} MB exact={g['exact']} gap={g['gap']:.3g} ({100 * g['gap'] / g['objective']:.3g} %) "
              f"obj+{row['objective_grid_minus_core']:.3g} ({100 * row['objective_grid_minus_core'] / c['objective']:.3g} %)",
              flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budgets", default="3.0,4.0,5.5")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--fused", action="store_true", help="also the fused-dispatch latency budgets")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    wb = get_backend("ort-cpu").weight_bytes
    rows = []
    for shape in args.shapes.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            problem = stored_bits_problem(weight_bytes=wb, budget_bits=budget, **SHAPES[shape])
            row = {"shape": shape, "items": len(problem.experts), "budget_bits": budget,
                   "core": measure(problem, args.repeat)}
            if shape == "olmoe-1b-7b":
                row["grid"] = measure(problem, args.repeat, max_states=1)
                row["time_ratio_grid_over_core"] = row["grid"]["seconds"] / row["core"]["seconds"]
                row["objective_grid_minus_core"] = row["grid"]["objective"] - row["core"]["objective"]
            rows.append(row)
            c = row["core"]
            print(f"{shape:14s} {len(problem.experts):6d} items  {budget:.1f} bits  core {c['seconds']:.3f}s "
                  f"{c['peak_mb']:.1f} MB exact={c['exact']} list={c['longest_list_or_cells']}"
                  + (f" | grid {row['grid']['seconds']:.3f}s {row['grid']['peak_mb']:.1f} MB exact="
                     f"{row['grid']['exact']} gap={row['grid']['gap']:.3g} x{row['time_ratio_grid_over_core']:.1f} "
                     f"obj+{row['objective_grid_minus_core']:.3g}" if "grid" in row else ""), flush=True)
    if args.fused:
        rows += fused_rows(args.repeat)
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": git_commit(),
           "machine": machine(), "cpu_flags": [f for f in cpu_flags() if f.startswith(("avx", "sse4", "fma"))],
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"exact-alloc-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

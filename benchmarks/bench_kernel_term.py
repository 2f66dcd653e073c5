"""Does pricing ``--dispatch kernel``'s layout change allocations? (issue 25, item 3)

With ``--dispatch kernel`` ort-cpu runs all of a layer's 2/4/8-bit experts in one ``ai.dmpq.MixedMoE``
node: each at its routed cost inside the node, plus the node's fixed part once per layer, 16-bit experts
per expert (:func:`dmpq_compile.passes.allocate.fusion.kernel_tables`). The allocate pass prices the
dispatch the compile emits (``AllocateOptions.dispatch``). This script solves the same problems with the
exact allocator (``optimal``) three ways and prices every answer as the kernel dispatch ships it:

* ``kernel``: the kernel layout (what a ``--dispatch kernel`` compile now optimises);
* ``fused``: the portable dispatch's layout (one QMoE per layer and 4/8-bit width; what a kernel compile
  optimised before the allocator knew the dispatch);
* ``per-expert``: every expert alone (``gather-if``), the control.

Problems: the bundled samples (profile, sensitivity and the ort-cpu cost table measured here, as a
compile would; both samples' experts are whole groups of 64, so the kernel takes them) and the
OLMoE-1B-7B shape (16 x 64 experts of 2048 x 1024, top-8: cost rows measured here at that shape,
frequencies and sensitivities synthetic, :mod:`dmpq_compile.passes.allocate.synthetic`). Settings: latency
budgets (``--budget-ms``) at 25/50/75 % of the way from the cheapest kernel-layout allocation to every
expert at 16 bits, and an average-bits budget of 4 with a latency weight.

Command: ``python benchmarks/bench_kernel_term.py --work /tmp/bkt`` (writes
``results/kernel-term-<time>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from alloc_common import BASE, RESULTS, ROOT, analysed_graph, calibration, machine
from bench_group_term import olmoe_problem
from dmpq_compile.passes.allocate import AllocationProblem, Budget, ObjectiveWeights
from dmpq_compile.passes.allocate.optimal import solve
from dmpq_compile.passes.allocate.problem import build_tables, min_feasible_budget

DISPATCHES = {"kernel": "kernel", "fused": "fused", "per-expert": "gather-if"}


def sample_problem(model: str, work: Path) -> AllocationProblem:
    """A bundled sample analysed as a ``--dispatch kernel`` compile analyses it (its cost table has the kernel
    rows)."""
    from dmpq_compile.passes.allocate.base import AllocateOptions, build_problem
    from dmpq_compile.passes.infra.base import PassContext

    from dmpq_compile.compiler import get_backend

    cfg = BASE.replace(calibration={"sequences": 16}, sensitivity={"sequences": 8}, emit={"dispatch": "kernel"})
    graph, _ = analysed_graph(model, work / Path(model).name, True, calibration(model, cfg), cfg)
    opts = AllocateOptions(allocator="optimal", budget_kind="latency", budget=1e12, metric="kl", dispatch="kernel")
    return build_problem(graph, opts, PassContext(backend=get_backend("ort-cpu"), progress=False))


def priced(problem: AllocationProblem, dispatch: str, budget: Budget | None = None,
           weights: ObjectiveWeights | None = None) -> AllocationProblem:
    return dataclasses.replace(problem, dispatch=dispatch, budget=budget or problem.budget,
                               weights=weights or problem.weights)


def shipped(problem: AllocationProblem, allocation: dict[str, int]) -> dict[str, float]:
    """Latency (ms/token) of ``allocation`` as the kernel dispatch ships it, its summed sensitivity, the experts
    in the kernel nodes and the layers that hold one."""
    t = build_tables(priced(problem, "kernel", Budget("latency", 1e12), ObjectiveWeights(1.0, 0.0)))
    idx = t.index(allocation)
    joined = [e for e in problem.experts if e.cost[allocation[e.key]].kernel_decode_ms is not None]
    return {"latency_ms": t.used(idx), "sensitivity": float(t.sens[np.arange(len(idx)), idx].sum()),
            "in_kernel": len(joined), "layers_with_node": len({e.layer for e in joined})}


def compare(problem: AllocationProblem, budget: Budget, weights: ObjectiveWeights) -> dict:
    out, ref = {}, None
    truth = priced(problem, "kernel", budget, weights)
    tt = build_tables(truth)
    for label, dispatch in DISPATCHES.items():
        p = priced(problem, dispatch, budget, weights)
        t0 = time.perf_counter()
        try:
            sol = solve(p)
        except ValueError as e:  # this pricing says the budget is infeasible
            out[label] = {"error": str(e)}
            continue
        alloc = sol.allocation
        idx = tt.index(alloc)
        row = {"objective_kernel": tt.value(idx), "feasible_kernel": bool(tt.used(idx) <= truth.capacity * (1 + 1e-9)),
               "exact": sol.exact, "solve_s": time.perf_counter() - t0,
               "bits": {str(b): sum(v == b for v in alloc.values()) for b in problem.bits_choices},
               **shipped(problem, alloc)}
        if ref is None:
            ref = alloc
        row["differs_from_kernel"] = sum(alloc[k] != ref[k] for k in ref)
        out[label] = row
    return out


def settings(problem: AllocationProblem) -> list[tuple[str, Budget, ObjectiveWeights]]:
    lat = priced(problem, "kernel", Budget("latency", 1e12))
    lo = min_feasible_budget(lat)
    t = build_tables(lat, with_objective=False)
    hi = t.used(np.full(len(t.keys), len(t.bits) - 1))
    out = [(f"budget-ms {q:.0%}", Budget("latency", float(lo + q * (hi - lo))), ObjectiveWeights(1.0, 0.0))
           for q in (0.25, 0.5, 0.75)]
    scale = float(np.mean([max(e.sensitivity.values()) for e in problem.experts])) * len(problem.experts)
    out += [(f"bits 4, w_lat {w:g}", Budget("bits", 4.0), ObjectiveWeights(1.0, w * scale)) for w in (0.1, 1.0)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for analysed sample graphs (reused)")
    ap.add_argument("--samples", nargs="*", default=["samples/olmoe-tiny", "samples/mixtral-tiny"])
    ap.add_argument("--no-olmoe-shape", action="store_true", help="skip the OLMoE-1B-7B-shape problem")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the cost measurements")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    problems = {Path(s).name: (lambda s=s: sample_problem(str(ROOT / s), args.work)) for s in args.samples}
    if not args.no_olmoe_shape:
        problems["olmoe-1b-7b-shape (synthetic sensitivities)"] = lambda: olmoe_problem(args.threads)
    result = {"command": " ".join(sys.argv), "machine": machine(), "problems": {}}
    for name, make in problems.items():
        problem = make()
        if not any(c.kernel_decode_ms is not None for e in problem.experts for c in e.cost.values()):
            raise SystemExit(f"{name}: the cost table has no kernel rows (is dmpq's kernel library buildable here?)")
        rows = {}
        for label, budget, weights in settings(problem):
            rows[label] = compare(problem, budget, weights)
            k, f, p = (rows[label].get(m, {}) for m in DISPATCHES)
            print(f"{name:>44} | {label:<18} | kernel {k.get('latency_ms', float('nan')):.4f} ms "
                  f"obj {k.get('objective_kernel', float('nan')):.5g} | fused: differs {f.get('differs_from_kernel')} "
                  f"{f.get('latency_ms', float('nan')):.4f} ms obj {f.get('objective_kernel', float('nan')):.5g} "
                  f"feasible {f.get('feasible_kernel')} | per-expert: differs {p.get('differs_from_kernel')} "
                  f"obj {p.get('objective_kernel', float('nan')):.5g} feasible {p.get('feasible_kernel')}", flush=True)
        result["problems"][name] = {"experts": len(problem.experts), "settings": rows}
    out = args.out or RESULTS / f"kernel-term-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

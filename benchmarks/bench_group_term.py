"""Does the allocator's fused-dispatch term change allocations? (issue 25, item 3)

The ort-cpu cost table prices each expert under per-expert dispatch (routed and idle) and inside the
fused QMoE op (routed, plus the op's fixed part once per layer and width):
:mod:`dmpq_compile.passes.allocate.fusion`. The exact allocator (``optimal``) optimises that true cost.
This script solves the same problems three ways and prices every answer under the true cost:

* ``group-term``: the true cost (what ``optimal`` does now);
* ``per-expert``: the same rows with the fused layout ignored (every expert priced alone; the
  control that shows what the group term adds);
* ``one-expert-qmoe``: the previous table's model (BENCH_VERSION 5): a 4/8-bit expert priced as a
  one-expert QMoE, fixed part included, times its routing frequency, and no idle cost.

Problems: the bundled samples (profile, sensitivity and ort-cpu cost measured here, as a compile
would) and the OLMoE-1B-7B shape (16 x 64 experts of 2048 x 1024, top-8: cost rows measured here at
that shape; frequencies and sensitivities synthetic, :mod:`dmpq_compile.passes.allocate.synthetic`,
since no trained model of that size runs here). Settings: latency budgets at 25/50/75 % of the way
from the cheapest allocation to every expert at 16 bits, and an average-bits budget of 4 with a latency weight.

Command: ``python benchmarks/bench_group_term.py --work /tmp/bgt`` (writes
``results/group-term-<time>.json``).
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
from dmpq_compile.passes.allocate import AllocationProblem, Budget, ExpertCost, ObjectiveWeights
from dmpq_compile.passes.allocate.optimal import solve
from dmpq_compile.passes.allocate.problem import build_tables, min_feasible_budget
from dmpq_compile.passes.allocate.synthetic import synthetic_problem

MODELS = ("group-term", "per-expert", "one-expert-qmoe")


def variant(problem: AllocationProblem, model: str, budget: Budget | None = None,
            weights: ObjectiveWeights | None = None) -> AllocationProblem:
    """``problem`` with its cost rows as ``model`` prices them (and another budget or weights)."""
    def row(c: ExpertCost) -> ExpertCost:
        if model == "group-term" or c.fused_decode_ms is None:
            return c if model != "one-expert-qmoe" else dataclasses.replace(c, idle_decode_ms=0.0)
        if model == "per-expert":
            return dataclasses.replace(c, fused_decode_ms=None, fused_prefill_ms=None)
        return dataclasses.replace(c, decode_ms=c.fused_decode_ms + c.group_decode_ms, idle_decode_ms=0.0,
                                   fused_decode_ms=None, fused_prefill_ms=None)

    experts = tuple(dataclasses.replace(e, cost={b: row(c) for b, c in e.cost.items()}) for e in problem.experts)
    return dataclasses.replace(problem, experts=experts, budget=budget or problem.budget,
                               weights=weights or problem.weights)


def true_cost(problem: AllocationProblem, allocation: dict[str, int]) -> dict[str, float]:
    """Latency (ms/token, the shipped layout), summed sensitivity and widths per layer of ``allocation``."""
    lat = variant(problem, "group-term", Budget("latency", 1e12), ObjectiveWeights(1.0, 0.0))
    t = build_tables(lat)
    idx = t.index(allocation)
    widths = {}
    for e in problem.experts:
        widths.setdefault(e.layer, set()).add(allocation[e.key])
    return {"latency_ms": t.used(idx), "sensitivity": float(t.sens[np.arange(len(idx)), idx].sum()),
            "widths_per_layer": float(np.mean([len(w) for w in widths.values()]))}


def compare(problem: AllocationProblem, budget: Budget, weights: ObjectiveWeights) -> dict:
    """Solve under each model; price each answer under the true cost."""
    out, ref = {}, None
    for model in MODELS:
        p = variant(problem, model, budget, weights)
        t0 = time.perf_counter()
        try:
            alloc = solve(p).allocation
        except ValueError as e:  # the model says infeasible
            out[model] = {"error": str(e)}
            continue
        seconds = time.perf_counter() - t0
        truth = variant(problem, "group-term", budget, weights)
        tt = build_tables(truth)
        idx = tt.index(alloc)
        row = {"objective": tt.value(idx), "feasible": bool(tt.used(idx) <= truth.capacity * (1 + 1e-9)),
               "solve_s": seconds, "bits": {str(b): sum(v == b for v in alloc.values()) for b in problem.bits_choices},
               **true_cost(problem, alloc)}
        if ref is None:
            ref = alloc
        row["differs_from_group_term"] = sum(alloc[k] != ref[k] for k in ref)
        out[model] = row
    return out


def settings(problem: AllocationProblem) -> list[tuple[str, Budget, ObjectiveWeights]]:
    lat = variant(problem, "group-term", Budget("latency", 1e12))
    lo = min_feasible_budget(lat)
    t = build_tables(lat, with_objective=False)
    hi = t.used(np.full(len(t.keys), len(t.bits) - 1))  # every expert at the highest bits
    out = [(f"latency {q:.0%}", Budget("latency", float(lo + q * (hi - lo))), ObjectiveWeights(1.0, 0.0))
           for q in (0.25, 0.5, 0.75)]
    scale = float(np.mean([max(e.sensitivity.values()) for e in problem.experts])) * len(problem.experts)
    out += [(f"bits 4, w_lat {w:g}", Budget("bits", 4.0), ObjectiveWeights(1.0, w * scale)) for w in (0.1, 1.0)]
    return out


def sample_problem(model: str, work: Path) -> AllocationProblem:
    from dmpq_compile.passes.allocate.base import AllocateOptions, build_problem
    from dmpq_compile.passes.infra.base import PassContext

    from dmpq_compile.compiler import get_backend

    cfg = BASE.replace(calibration={"sequences": 16}, sensitivity={"sequences": 8})
    calib = calibration(model, cfg)
    graph, _ = analysed_graph(model, work / Path(model).name, True, calib, cfg)
    opts = AllocateOptions(allocator="optimal", budget_kind="latency", budget=1e12, metric="kl")
    return build_problem(graph, opts, PassContext(backend=get_backend("ort-cpu"), progress=False))


def olmoe_problem(threads: int) -> AllocationProblem:
    from dmpq_compile.backends.ort_cpu.cost import measure_shapes

    rows = measure_shapes([(2048, 1024)], threads=threads, progress=False)[(2048, 1024)]
    cost = {b: ExpertCost(**dataclasses.asdict(m.row())) for b, m in rows.items()}
    return synthetic_problem(cost=cost, budget=Budget("latency", 1e12), seed=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for analysed sample graphs (reused)")
    ap.add_argument("--samples", nargs="*", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
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
        rows = {}
        for label, budget, weights in settings(problem):
            rows[label] = compare(problem, budget, weights)
            g, p, o = (rows[label].get(m, {}) for m in MODELS)
            print(f"{name:>44} | {label:<18} | group-term {g.get('latency_ms', float('nan')):.4f} ms "
                  f"obj {g.get('objective', float('nan')):.4g} | per-expert differs {p.get('differs_from_group_term')} "
                  f"obj {p.get('objective', float('nan')):.4g} | one-expert-qmoe differs "
                  f"{o.get('differs_from_group_term')} obj {o.get('objective', float('nan')):.4g} "
                  f"feasible {o.get('feasible')}", flush=True)
        result["problems"][name] = {"experts": len(problem.experts), "settings": rows}
    out = args.out or RESULTS / f"group-term-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ablation: does the RL policy add anything over random proposals + the same local search?

Variants, each allocating the same analysed problem:

* ``rl``: PPO proposals + refinement (the ``rl`` allocator with its defaults);
* ``search-matched``: random proposals + the same refinement with the same number of evaluated
  proposals, refinements per round and measurements as ``rl`` (``SearchAllocator(proposals=
  episodes + rounds, per_round=n_envs + 1, refine_top=refine_top + 1)``: ``rl`` evaluates
  ``n_envs`` sampled and one greedy proposal per round and refines the best ``refine_top``
  sampled ones and the greedy one);
* ``rl-norefine``: PPO proposals, projection only (``refine_top=0``);
* ``search-norefine``: the random proposals of ``search-matched``, projection only (against
  ``rl-norefine`` this isolates what the policy learned);
* ``search``: the ``search`` allocator with its defaults (32 random proposals);
* ``optimal`` (exact DP optimum of the additive model), ``gradvar``, ``frequency``, ``uniform``.

On the samples the measuring variants get the interpreter accuracy callback the allocate pass
gives them (8 calibration sequences, KL, every 16th proposal), a fresh one per run. Every
final allocation is scored on the additive table objective (what ``optimal`` minimises exactly),
on the whole-model KL the interpreter measures on the calibration sequences, and on the emitted
artifact (test perplexity, KL to the FP32 artifact). Runs are interleaved: within each (budget,
seed) block the variant order rotates.

On the full-size OLMoE-1B-7B shape (16 x 64 = 1024 experts) nothing can be profiled here, so the
problem is synthetic (:mod:`dmpq_compile.passes.allocate.synthetic`, sensitivities drawn from
a distribution fitted to samples/olmoe-tiny) with the ort-cpu cost rows measured on this machine
at the real expert shape (2048 x 1024); objective = proxy only.

    python benchmarks/ablation_allocators.py --part samples --model samples/mixtral-tiny
    python benchmarks/ablation_allocators.py --part full
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
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
    loadavg,
    machine,
)
from dmpq_compile.backends import get_backend
from dmpq_compile.passes.allocate import (
    AllocationProblem,
    Budget,
    ExpertCost,
    RLAllocator,
    SearchAllocator,
    get_allocator,
    objective_value,
    solve,
)
from dmpq_compile.passes.allocate.base import AllocateOptions, build_problem
from dmpq_compile.passes.allocate.measure import interpreter_accuracy_fn
from dmpq_compile.passes.allocate.synthetic import synthetic_problem
from dmpq_compile.passes.infra.base import PassContext

from dmpq_compile.eval.protocol import format_quality

STOCHASTIC = ("rl", "search-matched", "rl-norefine", "search-norefine", "search")
DETERMINISTIC = ("optimal", "gradvar", "frequency", "uniform")


def make_allocator(variant: str, seed: int, episodes: int, accuracy_fn=None):
    """The allocator of ``variant`` (module docstring); ``episodes`` sets rl's training length."""
    rl = RLAllocator(episodes=episodes, seed=seed, progress=False, accuracy_fn=accuracy_fn)
    rounds = -(-episodes // rl.n_envs)
    if variant == "rl":
        return rl
    if variant == "rl-norefine":
        return RLAllocator(episodes=episodes, seed=seed, progress=False, accuracy_fn=accuracy_fn, refine_top=0)
    if variant == "search-matched":
        return SearchAllocator(proposals=episodes + rounds, per_round=rl.n_envs + 1, refine_top=rl.refine_top + 1,
                               seed=seed, accuracy_fn=accuracy_fn, measure_every=rl.measure_every)
    if variant == "search-norefine":
        return SearchAllocator(proposals=episodes + rounds, per_round=rl.n_envs + 1, refine_top=0, seed=seed,
                               accuracy_fn=accuracy_fn, measure_every=rl.measure_every)
    if variant == "search":
        return SearchAllocator(seed=seed, accuracy_fn=accuracy_fn)
    return get_allocator(variant)


def run_variant(variant: str, problem: AllocationProblem, seed: int, episodes: int, accuracy_fn=None) -> dict:
    """Allocate with ``variant`` and return the allocation with time and evaluation counts."""
    allocator = make_allocator(variant, seed, episodes, accuracy_fn)
    load_before = loadavg()
    t0 = time.perf_counter()
    if isinstance(allocator, RLAllocator):
        res = allocator.train(problem)
    elif isinstance(allocator, SearchAllocator):
        res = allocator.search(problem)
    else:
        res = None
        allocation = allocator.allocate(problem)
    seconds = time.perf_counter() - t0
    row = {"variant": variant, "seed": seed, "seconds": seconds, "loadavg": load_before}
    if res is not None:
        allocation = res.allocation
        row.update(proposals=res.proposals, refinements=res.refinements, measurements=res.measurements,
                   stopped_early=res.stopped_early)
    row["allocation"] = allocation
    row["table_objective"] = objective_value(problem, allocation)
    return row


def blocks(budgets, seeds):
    """(budget, seed, rotation) in run order; deterministic variants join the seed-0 blocks only."""
    return [(b, s, k) for k, (b, s) in enumerate((b, s) for b in budgets for s in seeds)]


def run_samples(args) -> None:
    torch.set_num_threads(1)
    name = Path(args.model).name
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration(args.model)
    graph, analysis_s = analysed_graph(args.model, work, args.reuse_analysis, calib)
    backend = get_backend("ort-cpu")
    ctx = PassContext(calibration=calib, target="ort-cpu", backend=backend, seed=0, progress=False)
    fp_path = emit_allocation(graph, args.model, {n.id: 16 for n in graph.experts()}, work, "fp32")
    scorer = ArtifactScorer(args.model, fp_path, args.eval_tokens)
    calib_kl = interpreter_accuracy_fn(graph, calib, 8, "kl")
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    rows, meta = [], machine()
    print(f"{name}: analysis {analysis_s:.0f} s, FP32 ppl {scorer.fp_ppl:.4f}; {meta}", flush=True)
    for budget, seed, k in blocks(budgets, seeds):
        problem = build_problem(graph, AllocateOptions(allocator="optimal", budget=budget), ctx)
        variants = list(STOCHASTIC) + (list(DETERMINISTIC) if seed == seeds[0] else [])
        variants = variants[k % len(variants):] + variants[: k % len(variants)]
        for variant in variants:
            fn = interpreter_accuracy_fn(graph, calib, 8, "kl") if variant in STOCHASTIC else None
            row = run_variant(variant, problem, seed, args.episodes, fn)
            key = digest(row["allocation"])
            path = emit_allocation(graph, args.model, row["allocation"], work / "artifacts", key)
            row.update(budget=budget, avg_bits=average_bits(graph, row["allocation"]), digest=key,
                       calib_kl=calib_kl(row["allocation"]), **scorer.score(path, key))
            row["allocation"] = None if variant in STOCHASTIC else row["allocation"]
            rows.append(row)
            print(f"{budget:>4g} s{seed} {variant:>15}: obj {row['table_objective']:.6g} calibKL "
                  f"{row['calib_kl']:.5f} {format_quality(row['quality'])} {row['seconds']:.1f}s "
                  f"[{row['loadavg']}]", flush=True)
        shutil.rmtree(work / "artifacts", ignore_errors=True)
        write({"model": args.model, "part": "samples", "machine_start": meta, "rows": rows, "partial": True,
               "fp32_ppl": scorer.fp_ppl, "command": command(args)}, f"ablation-allocators-{name}{args.tag}.json",
              quiet=True)
    out = {"model": args.model, "part": "samples", "analysis_seconds": analysis_s, "fp32_ppl": scorer.fp_ppl,
           "eval_tokens": scorer.n_scored, "eval_sets": [w.record() for w in scorer.windows], "episodes": args.episodes, "machine_start": meta,  # noqa: E501
           "machine_end": machine(), "rows": rows, "command": command(args)}
    write(out, f"ablation-allocators-{name}{args.tag}.json")


def full_problem(budget: float, seed: int) -> AllocationProblem:
    """The synthetic 1024-expert OLMoE-1B-7B problem with the measured ort-cpu rows at 2048 x 1024."""
    from dmpq_compile.backends.ort_cpu.cost import measure_shapes

    rows = measure_shapes([(2048, 1024)], (2, 4, 8, 16), progress=False)[(2048, 1024)]
    cost = {b: ExpertCost(**dataclasses.asdict(m.row())) for b, m in rows.items()}
    return synthetic_problem(budget=Budget("bits", budget), seed=seed, cost=cost)


def run_full(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    rows, meta = [], machine()
    filename = f"ablation-allocators-olmoe-1b-7b-shape{args.tag}.json"
    header = {"part": "full", "machine_start": meta, "command": command(args)}
    for budget, seed, k in blocks(budgets, seeds):
        problem = full_problem(budget, args.problem_seed)
        best = solve(problem).objective
        variants = list(STOCHASTIC) + (list(DETERMINISTIC) if seed == seeds[0] else [])
        variants = variants[k % len(variants):] + variants[: k % len(variants)]
        for variant in variants:
            row = run_variant(variant, problem, seed, args.full_episodes)
            row.update(budget=budget, ratio_to_optimal=row["table_objective"] / best, allocation=None)
            rows.append(row)
            print(f"{budget:>4g} s{seed} {variant:>15}: obj {row['table_objective']:.6g} "
                  f"({row['ratio_to_optimal']:.5f}x optimal) {row['seconds']:.1f}s [{row['loadavg']}]", flush=True)
        write({**header, "rows": rows, "partial": True}, filename, quiet=True)
    defaults = []
    if args.defaults_budget:
        problem = full_problem(args.defaults_budget, args.problem_seed)
        best = solve(problem).objective
        for variant in ("optimal", "search", "rl"):
            row = run_variant(variant, problem, 0, RLAllocator().episodes)
            row.update(budget=args.defaults_budget, ratio_to_optimal=row["table_objective"] / best, allocation=None)
            defaults.append(row)
            print(f"defaults {variant}: {row['seconds']:.1f}s ratio {row['ratio_to_optimal']:.5f}", flush=True)
    out = {"part": "full", "shape": "OLMoE-1B-7B: 16 layers x 64 experts (1024), top-8, hidden 2048, "
           "expert intermediate 1024", "sensitivities": "synthetic (passes/allocate/synthetic.py, fitted to "
           "samples/olmoe-tiny)", "costs": "ort-cpu rows measured on this machine at 2048 x 1024",
           "problem_seed": args.problem_seed, "episodes": args.full_episodes, "machine_start": meta,
           "machine_end": machine(), "rows": rows, "defaults": defaults, "command": command(args)}
    write(out, filename)


def summary(rows: list[dict], keys=("table_objective", "seconds")) -> None:
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["budget"], r["variant"]), []).append(r)
    for (budget, variant), rs in sorted(by.items()):
        parts = []
        for key in keys:
            vals = [r[key] for r in rs if key in r]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                parts.append(f"{key} {statistics.mean(vals):.6g}±{sd:.2g}")
        print(f"{budget:>4g} {variant:>15} n={len(rs)} " + "  ".join(parts))


def command(args) -> str:
    return "python benchmarks/ablation_allocators.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool) or v)


def write(out: dict, filename: str, quiet: bool = False) -> None:
    """Write ``out`` to ``results/filename``; unless ``quiet``, print the per-variant summary."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / filename).write_text(json.dumps(out, indent=1))
    if quiet:
        return
    keys = ("table_objective", "calib_kl", "ppl", "kl", "seconds") if out["part"] == "samples" else \
        ("ratio_to_optimal", "seconds", "proposals", "refinements")
    summary(out["rows"], keys)
    print(f"wrote {RESULTS / filename}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("samples", "full"), default="samples")
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--episodes", type=int, default=RLAllocator().episodes, help="rl episodes on the samples")
    ap.add_argument("--full-episodes", type=int, default=32, help="rl episodes on the 1024-expert shape")
    ap.add_argument("--problem-seed", type=int, default=0, help="seed of the synthetic 1024-expert problem")
    ap.add_argument("--defaults-budget", type=float, default=3.5,
                    help="also time optimal/search/rl with their default settings at this budget (0: skip)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--reuse-analysis", action="store_true", help="reuse the analysed IR kept in --work")
    ap.add_argument("--work", default="/tmp/dmpq-ablation-alloc")
    ap.add_argument("--tag", default="", help="suffix of the results file name (e.g. for a split run)")
    args = ap.parse_args()
    run_samples(args) if args.part == "samples" else run_full(args)


if __name__ == "__main__":
    main()

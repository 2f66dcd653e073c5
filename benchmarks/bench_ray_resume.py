"""What resuming an interrupted ``compile --ray`` saves: the sensitivity and quantize passes with their
per-layer tasks on a local Ray cluster, uninterrupted and resumed after an interruption at half.

On a random OLMoE-style checkpoint of ``--layers`` layers (``make_tiny_checkpoint`` at the widths
given), after the profile pass, this runs each pass through ``run_cached`` as a compile does, with
the executor ``--ray local:N`` starts (one cluster for the whole run, warmed by one unmeasured run
of each pass), in ``--rounds`` rounds (``clean`` first in even rounds, last in odd ones):

- ``clean``: without the cache (no partial state: what ``--no-cache`` does);
- ``interrupted``: with the cache, stopped once half the layers are kept (sensitivity: their
  records written as their remote scores came, ``PartialState.deliver``; quantize rtn: their task
  files moved into the state folder, ``QuantizeState.keep``);
- ``resumed``: the same call again, which submits only the layers not kept.

Before each measured call the cluster is idle (the tasks an interruption abandoned have ended).
Each variant's result (annotations; for quantize also the weight store, keys in order and bytes)
is compared with ``clean``'s (``identical``), and the tasks each call submitted are counted.
Prints medians and the ratio ``resumed / clean`` per pass.

    python benchmarks/bench_ray_resume.py --layers 8 --rounds 6

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from dmpq_compile.backends import get_backend
from dmpq_compile.passes import PassContext, make_pass, quantize_resume
from dmpq_compile.passes.infra.cache import PassCache, _annotations, run_cached
from dmpq_compile.passes.sensitivity import resume

from dmpq_compile.distributed import RayExecutor
from dmpq_compile.frontend import load
from dmpq_compile.ir.graph import NONEXPERT_QUANTIZABLE_KINDS
from dmpq_compile.sysinfo import git_commit, load_average, machine
from dmpq_compile.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("clean", "interrupted", "resumed")
PASSES = ("sensitivity", "quantize")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=512, help="each expert's width (default 512)")
    p.add_argument("--sequences", type=int, default=8, help="calibration sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster (default 2)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the driver and each task (default 1)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/ray-resume-TIME.json)")
    return p.parse_args(argv)


class Stop(Exception):
    """Raised once ``after`` layers are kept (an interruption: the run leaves its state behind)."""


class Counting:
    """The executor, counting the tasks submitted."""

    def __init__(self, executor: RayExecutor) -> None:
        self.executor, self.submitted = executor, 0

    def submit(self, fn, *args):
        self.submitted += 1
        return self.executor.submit(fn, *args)

    def __getattr__(self, name):
        return getattr(self.executor, name)


def _idle(executor: RayExecutor, timeout: float = 600.0) -> None:
    """Wait until no task holds a CPU of the cluster (those an interruption abandoned have ended)."""
    ray, t0 = executor.ray, time.perf_counter()
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total and time.perf_counter() - t0 < timeout:
        time.sleep(0.2)


def _fingerprint(graph, weights: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(_annotations(graph), sort_keys=True).encode())
    for key in graph.weights if weights else ():
        h.update(key.encode())
        h.update(graph.weights[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run(name: str, graph, ctx: PassContext, executor: RayExecutor, cache: PassCache | None,
         stop_after: int | None = None) -> dict:
    """One call of pass ``name`` on a copy of ``graph``; stopped once ``stop_after`` layers are kept."""
    owner, method = (resume.PartialState, "deliver") if name == "sensitivity" else (quantize_resume.QuantizeState, "keep")
    original, kept = getattr(owner, method), []

    def counted(state, *args):
        out = original(state, *args)
        kept.append(args[0])
        if len(kept) == stop_after:
            raise Stop
        return out

    counting = Counting(executor)
    ctx.executor = counting
    work = Path(tempfile.mkdtemp(prefix="w-", dir=ctx.work_dir))
    _idle(executor)
    setattr(owner, method, counted)
    t0 = time.perf_counter()
    try:
        result = run_cached(make_pass(name, **({"method": "rtn"} if name == "quantize" else {})), graph.copy(),
                            _with_work(ctx, work), cache)
    except Stop:
        result = None
    finally:
        seconds = time.perf_counter() - t0
        setattr(owner, method, original)
    row = {"seconds": seconds, "tasks": counting.submitted, "kept_layers": len(kept)}
    if result is not None:  # the codes are read from the scratch folder
        row["fingerprint"] = _fingerprint(result.graph, name == "quantize")
        row["resumed"] = result.stats.get("resumed_layers" if name == "sensitivity" else "resumed_units", 0)
    shutil.rmtree(work, ignore_errors=True)
    return row


def _with_work(ctx: PassContext, work: Path) -> PassContext:
    return dataclasses.replace(ctx, work_dir=work)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python", *sys.argv]), "commit": git_commit(ROOT), "machine": machine(),
              "start": load_average(), "args": {k: str(v) for k, v in vars(args).items()}, "rounds": []}
    print(f"commit {result['commit']}; {result['start']}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-resume-"))
    executor = RayExecutor(f"local:{args.workers}", args.threads)
    try:
        model = make_tiny_checkpoint("olmoe", tmp / "model", num_hidden_layers=args.layers, hidden_size=args.hidden,
                                     num_experts=args.experts, intermediate_size=args.intermediate,
                                     num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
        ids = torch.randint(0, 512, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
        graph = load(model)
        graph.meta["group_size"] = 64
        ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=0, progress=False,
                          work_dir=tmp)
        graphs = {"sensitivity": run_cached(make_pass("profile"), graph, ctx, None).graph}
        quantize = graph.copy()
        for i, n in enumerate(quantize.experts()):
            quantize.annotate(n.id, "bits", (2, 3, 4, 8)[i % 4])
        for n in quantize.nodes():
            if n.kind in NONEXPERT_QUANTIZABLE_KINDS:
                quantize.annotate(n.id, "bits", 8)
        graphs["quantize"] = quantize
        for name in PASSES:  # warm the workers (their first task imports the package)
            _run(name, graphs[name], ctx, executor, None)
        for r in range(args.rounds):
            for name in PASSES:
                row: dict = {"round": r, "pass": name}
                if r % 2 == 0:  # clean first in even rounds, last in odd ones: no order bias
                    row["clean"] = _run(name, graphs[name], ctx, executor, None)
                cache = PassCache(tmp / "cache")
                row["interrupted"] = _run(name, graphs[name], ctx, executor, cache, stop_after=args.layers // 2)
                row["resumed"] = _run(name, graphs[name], ctx, executor, cache)
                if r % 2 == 1:
                    row["clean"] = _run(name, graphs[name], ctx, executor, None)
                row["identical"] = row["resumed"]["fingerprint"] == row["clean"]["fingerprint"]
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                print(json.dumps(row), flush=True)
                result["rounds"].append(row)
    finally:
        executor.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for name in PASSES:
        rows = [r for r in result["rounds"] if r["pass"] == name]
        med = {v: statistics.median(r[v]["seconds"] for r in rows) for v in VARIANTS}
        summary[name] = {
            "median_seconds": {v: round(s, 3) for v, s in med.items()},
            "resumed_over_clean": round(med["resumed"] / med["clean"], 3),
            "resumed_over_clean_per_round": [round(r["resumed"]["seconds"] / r["clean"]["seconds"], 3) for r in rows],
            "tasks": {v: [r[v]["tasks"] for r in rows] for v in VARIANTS},
            "identical": all(r["identical"] for r in rows),
        }
        s = summary[name]
        print(f"{name}: clean {med['clean']:.2f} s ({s['tasks']['clean'][0]} tasks), interrupted at "
              f"{args.layers // 2}/{args.layers} layers {med['interrupted']:.2f} s, resumed {med['resumed']:.2f} s "
              f"({s['tasks']['resumed'][0]} tasks; {s['resumed_over_clean']}x clean); identical {s['identical']}",
              flush=True)
    result["summary"], result["end"] = summary, load_average()
    out = args.out or ROOT / "benchmarks" / "results" / f"ray-resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

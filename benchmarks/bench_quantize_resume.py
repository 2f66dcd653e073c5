"""What resuming an interrupted quantize pass saves, and what keeping its partial state costs.

On a random OLMoE-style checkpoint of ``--layers`` layers (``make_tiny_checkpoint`` at the widths
given), with mixed expert bits (2/3/4/8) and 8-bit attention, lm_head and embedding, this times
the quantize pass (``passes/quantize.py``, through ``run_cached`` as a compile runs it) per method,
interleaved in ``--rounds`` rounds:

- ``clean``: without the cache (no partial state: what ``--no-cache`` does);
- ``kept``: with the cache, uninterrupted (each finished unit written to the partial state,
  hashed, then moved to the scratch folder at the end): the cost of keeping state;
- ``interrupted``: with the cache, stopped (KeyboardInterrupt) once half the layers are kept;
  the state folder's size on disk is measured there;
- ``resumed``: the same command again, which loads (and checks) the kept half and quantizes the
  rest.

``clean`` and ``kept`` run in alternating order. Each variant's weight store (keys in order,
bytes) and annotations are compared with ``clean``'s (``identical``); its memory is the process's
high-water mark, reset (free heap released) before the call, less the resident size it started
from (Linux). Prints medians and the ratios ``resumed / clean`` and ``kept / clean``.

    python benchmarks/bench_quantize_resume.py --layers 12 --rounds 3

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import gc
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

from dmpq_compile.frontend import load
from dmpq_compile.ir.graph import NONEXPERT_QUANTIZABLE_KINDS
from dmpq_compile.sysinfo import git_commit, load_average, machine, peak_rss_mb, proc_status, reset_peak_rss
from dmpq_compile.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("clean", "kept", "interrupted", "resumed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=512, help="each expert's width (default 512)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "hqq", "gptq"])
    p.add_argument("--sequences", type=int, default=8, help="gptq calibration sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/quantize-resume-TIME.json)")
    return p.parse_args(argv)


def _graph(model: Path):
    graph = load(model)
    graph.meta["group_size"] = 64
    for i, n in enumerate(graph.experts()):
        graph.annotate(n.id, "bits", (2, 3, 4, 8)[i % 4])
    for n in graph.nodes():
        if n.kind in NONEXPERT_QUANTIZABLE_KINDS:
            graph.annotate(n.id, "bits", 8)
    return graph


def _fingerprint(graph) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(_annotations(graph), sort_keys=True).encode())
    for key in graph.weights:
        h.update(key.encode())
        h.update(graph.weights[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Stop(Exception):
    """Raised once ``after`` units are kept (an interruption: the run leaves its state behind)."""


def _run(model: Path, method: str, ids: torch.Tensor, work: Path, cache: PassCache | None,
         stop_after: int | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=0, progress=False,
                      work_dir=work)
    graph = _graph(model)
    save, kept = quantize_resume.QuantizeState.save, []

    def counted(state, name, g, keys):
        ok = save(state, name, g, keys)
        kept.append(name)
        if len(kept) == stop_after:
            raise Stop
        return ok

    quantize_resume.QuantizeState.save = counted
    gc.collect()
    reset_peak_rss()
    start = proc_status().get("VmRSS", 0) / 1024
    t0 = time.perf_counter()
    try:
        result = run_cached(make_pass("quantize", method=method, group_size=64), graph, ctx, cache)
    except Stop:
        seconds, result = time.perf_counter() - t0, None
    finally:
        quantize_resume.QuantizeState.save = save
    seconds = time.perf_counter() - t0 if result is not None else seconds
    row = {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_start_mb": start,
           "peak_above_start_mb": peak_rss_mb() - start, "kept_units": len(kept)}
    if result is not None:
        row.update(fingerprint=_fingerprint(result.graph), resumed_units=result.stats.get("resumed_units", 0))
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python", *sys.argv]), "commit": git_commit(ROOT), "machine": machine(),
              "start": load_average(), "args": {k: str(v) for k, v in vars(args).items()}, "rounds": []}
    print(f"commit {result['commit']}; {result['start']}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-resume-"))
    try:
        model = make_tiny_checkpoint("olmoe", tmp / "model", num_hidden_layers=args.layers, hidden_size=args.hidden,
                                     num_experts=args.experts, intermediate_size=args.intermediate,
                                     num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
        ids = torch.randint(0, 512, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
        for r in range(args.rounds):
            for method in args.methods:
                row: dict = {"round": r, "method": method}
                for v in (("clean", "kept") if r % 2 == 0 else ("kept", "clean")):  # alternated: no order bias
                    row[v] = _run(model, method, ids, tmp / f"w-{v}", PassCache(tmp / "cache-kept") if v == "kept"
                                  else None)
                cache = PassCache(tmp / "cache")
                row["interrupted"] = _run(model, method, ids, tmp / "w-int", cache, stop_after=args.layers // 2)
                (folder,) = (tmp / "cache").glob("quantize-*.partial")
                files = [f for f in folder.iterdir() if f.is_file()]
                row["state_bytes"] = sum(f.stat().st_size for f in files)
                row["state_files"] = sorted(f.name for f in files if not f.name.startswith("."))
                row["resumed"] = _run(model, method, ids, tmp / "w-res", cache)
                row["state_left"] = folder.exists()
                row["identical"] = {v: row[v]["fingerprint"] == row["clean"]["fingerprint"] for v in ("kept", "resumed")}
                for d in ("w-clean", "w-kept", "w-int", "w-res", "cache", "cache-kept"):
                    shutil.rmtree(tmp / d, ignore_errors=True)
                print(json.dumps({k: v for k, v in row.items() if k != "state_files"}), flush=True)
                result["rounds"].append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for method in args.methods:
        rows = [r for r in result["rounds"] if r["method"] == method]
        med = {v: statistics.median(r[v]["seconds"] for r in rows) for v in VARIANTS}
        summary[method] = {
            "median_seconds": {v: round(s, 3) for v, s in med.items()},
            "resumed_over_clean": round(med["resumed"] / med["clean"], 3),
            "kept_over_clean": round(med["kept"] / med["clean"], 3),
            "resumed_over_clean_per_round": [round(r["resumed"]["seconds"] / r["clean"]["seconds"], 3) for r in rows],
            "kept_over_clean_per_round": [round(r["kept"]["seconds"] / r["clean"]["seconds"], 3) for r in rows],
            "state_mb_at_half": round(statistics.median(r["state_bytes"] for r in rows) / 1e6, 2),
            "peak_rss_mb_max": {v: round(max(r[v]["peak_rss_mb"] for r in rows), 1) for v in VARIANTS},
            "peak_above_start_mb_median": {v: round(statistics.median(r[v]["peak_above_start_mb"] for r in rows), 1)
                                           for v in VARIANTS},
            "identical": all(all(r["identical"].values()) for r in rows),
        }
        s = summary[method]
        print(f"{method}: clean {med['clean']:.2f} s, kept {med['kept']:.2f} s ({s['kept_over_clean']}x), interrupted "
              f"at {args.layers // 2}/{args.layers} layers {med['interrupted']:.2f} s, resumed {med['resumed']:.2f} s "
              f"({s['resumed_over_clean']}x); state at half {s['state_mb_at_half']} MB; identical {s['identical']}; "
              f"peak RSS above the call's start, MB (median) {s['peak_above_start_mb_median']}", flush=True)
    result["summary"], result["end"] = summary, load_average()
    out = args.out or ROOT / "benchmarks" / "results" / f"quantize-resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

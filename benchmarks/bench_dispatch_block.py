"""Expert dispatch patterns on one MoE block (formerly the test ``test_dispatch_timing``, which asserted nothing).

One MoE layer with random weights (4-bit RTN, group 32) between an embedding and a 256-token head
(:func:`moe_block_graph`, also the graph of ``tests/test_ort_lowering.py``'s dispatch test), emitted once per dispatch pattern of
``onnx_lowering.DISPATCHES`` and run by onnxruntime directly, interleaved run by run so that load
changes hit every pattern alike. Statistic, the same for every pattern: the median over ``--reps``
runs of M=1 (decode-sized) and ``--reps-prefill`` runs of M=128, measured two ways: 2-thread wall
clock (``time.perf_counter``) and 1-thread CPU time (``time.process_time``, robust to other
processes on a shared machine). Ratios are to ``gather-if``. docs/ort-cpu.md quotes these figures.

    python benchmarks/bench_dispatch_block.py                       # olmoe + mixtral-quarter shapes
    python benchmarks/bench_dispatch_block.py --shapes olmoe --reps 50

Results: ``benchmarks/results/dispatch-block-TIME.json`` (command, commit, CPU model and flags, load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"olmoe": (2048, 1024, 64, 8), "mixtral-quarter": (1024, 3584, 8, 2)}  # hidden, inter, experts, top-k
STATISTIC = "median over runs (interleaved across patterns); wall clock at 2 threads, CPU time at 1 thread"


def moe_block_graph(hidden: int, inter: int, experts: int, top_k: int, bits: int = 4, vocab: int = 256,
                    seed: int = 0) -> Any:
    """embed -> norm -> one MoE layer (random weights, RTN-quantized to ``bits``, group 32) -> lm_head."""
    import torch
    from dmpq_compile.passes.infra.base import PassContext
    from dmpq_compile.passes.quantize import QuantizePass

    from dmpq_compile.ir.graph import Graph
    from dmpq_compile.ir.weights import WeightStore

    gen = torch.Generator().manual_seed(seed)
    store = WeightStore()

    def w(key, *shape, std=0.02):
        store.add(key, torch.randn(*shape, generator=gen) * std)
        return key

    g = Graph({"family": "bench", "hidden_size": hidden, "vocab_size": vocab, "num_layers": 1,
               "num_experts": experts, "top_k": top_k}, store)
    g.add("tokens", "input")
    g.add("embed", "embed", ["tokens"], {"weight": w("emb", vocab, hidden, std=1.0)})
    g.add("norm", "norm", ["embed"], {"weight": w("norm", hidden)}, eps=1e-6)
    g.add("router", "router", ["norm"], {"weight": w("router", experts, hidden, std=0.1)}, layer=0,
          num_experts=experts, top_k=top_k, norm_topk_prob=False)
    for e in range(experts):
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        g.add(f"E{e}", "expert", ["norm", "router"], {r: w(f"E{e}.{r}", *s) for r, s in shapes.items()},
              layer=0, expert=e)
    g.add("combine", "combine", ["router"] + [f"E{e}" for e in range(experts)], layer=0)
    g.add("res", "add", ["embed", "combine"])
    g.add("lm_head", "lm_head", ["res"], {"weight": w("head", vocab, hidden)})
    for n in g.experts():
        g.annotate(n.id, "bits", bits)
    QuantizePass(group_size=32).call(g, PassContext(progress=False))
    return g


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=200, help="runs at M=1 (default 200)")
    p.add_argument("--reps-prefill", type=int, default=8, help="runs at M=128 (default 8)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/dispatch-block-TIME.json)")
    return p.parse_args(argv)


def timing_session(path: Path, threads: int):
    import onnxruntime as ort
    from dmpq_compile.backends.onnx_io import decoder_feed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads == 1 else "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for m in (1, 128):  # warm-up
        sess.run(None, decoder_feed(sess, np.zeros((1, m), dtype=np.int64)))
    return sess


def bench_shape(shape: tuple[int, int, int, int], work: Path, args: argparse.Namespace) -> dict:
    from dmpq_compile.backends.onnx_io import decoder_feed
    from dmpq_compile.backends.onnx_lowering import DISPATCHES
    from dmpq_compile.backends.ort_cpu import MODEL_FILE, OrtCpuBackend


    graph = moe_block_graph(*shape)
    for dispatch in DISPATCHES:
        (work / dispatch).mkdir(parents=True, exist_ok=True)
        OrtCpuBackend().emit(graph, work / dispatch, dispatch=dispatch)
    out = {}
    for threads, clock, clock_name in ((2, time.perf_counter, "wall"), (1, time.process_time, "cpu")):
        sessions = {d: timing_session(work / d / MODEL_FILE, threads) for d in DISPATCHES}
        for m, reps in ((1, args.reps), (128, args.reps_prefill)):
            feed = decoder_feed(next(iter(sessions.values())), (np.arange(m, dtype=np.int64)[None, :] * 7) % 256)
            times: dict[str, list[float]] = {d: [] for d in DISPATCHES}
            for _ in range(reps):
                for d, sess in sessions.items():
                    t0 = clock()
                    sess.run(None, feed)
                    times[d].append(clock() - t0)
            med = {d: 1e3 * float(np.median(t)) for d, t in times.items()}
            out[f"threads{threads}_{clock_name}_M{m}"] = {
                "median_ms": med, "ratio_to_gather_if": {d: v / med["gather-if"] for d, v in med.items()},
                "runs": reps}
    return out


def main(argv: list[str] | None = None) -> int:
    from dmpq_compile.bench import machine

    args = parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    start = machine()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            rows[name] = bench_shape(SHAPES[name], Path(tmp) / name, args)
            for key, r in rows[name].items():
                print(f"{name} {key}: " + ", ".join(f"{d} {v:.2f} ms ({r['ratio_to_gather_if'][d]:.2f}x)"
                                                   for d, v in r["median_ms"].items()), flush=True)
    out = args.out or RESULTS / f"dispatch-block-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_dispatch_block.py",
                                                    *(argv if argv is not None else sys.argv[1:])]),
                               "commit": commit, "statistic": STATISTIC, "machine_start": start,
                               "machine_end": machine(), "shapes": {k: SHAPES[k] for k in rows}, "rows": rows},
                              indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

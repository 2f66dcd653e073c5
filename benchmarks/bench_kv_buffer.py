"""Decode steps on a growing KV cache against a shared KV buffer (``Session.empty_cache(capacity=...)``).

A growing :class:`~dmpq_compile.runtime.KVCache` returns a new ``present`` holding every cached
position on each call, so a decode step copies the whole cache; a
:class:`~dmpq_compile.runtime.KVBuffer` is bound as both past and present (onnxruntime's I/O
binding, onnxruntime-genai's ``past_present_share_buffer``) and the kernel writes the new row in
place. For each artifact and depth this script prefills the same random prompt, then times
``--decode-tokens`` greedy steps both ways, interleaved (order alternating each round), and prints
the median over rounds of each round's mean step and their ratio. It also checks that both ways
pick the same tokens.

    python benchmarks/bench_kv_buffer.py ARTIFACT [ARTIFACT ...] --depths 128 512 --rounds 4 --threads 2

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dmpq_compile.bench import machine, write_results
from dmpq_compile.runtime import load
from dmpq_compile.sysinfo import git_commit
from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="ort-cpu artifact folders")
    p.add_argument("--depths", type=int, nargs="+", default=[128, 512], help="prompt lengths before the decode steps")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/kv-buffer-TIME.json)")
    return p.parse_args(argv)


def decode(session, prompt: np.ndarray, steps: int, buffer: bool) -> tuple[float, list[int]]:
    """Mean ms of ``steps`` greedy decode steps after ``prompt``, and the tokens they picked."""
    past = session.empty_cache(1, capacity=prompt.shape[1] + steps) if buffer else None
    logits, past = session.forward(prompt, past, logits_to_keep=1)
    times, tokens = [], []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        t0 = time.perf_counter()
        logits, past = session.forward(np.array([[token]], np.int64), past)
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e3, tokens


def measure(path: Path, args: argparse.Namespace) -> list[dict]:
    session = load(path, threads=args.threads)
    if not session.takes_mask:
        sys.exit(f"{path} takes no attention_mask (compiled before the genai contract): its buffer steps copy like "
                 "a growing cache; compile it again")
    rows = []
    for depth in args.depths:
        prompt = np.random.default_rng(0).integers(2, min(256, session.vocab_size), (1, depth)).astype(np.int64)
        times: dict[str, list[float]] = {"cache": [], "buffer": []}
        picked = {}
        for r in range(args.rounds):
            for way in (("cache", "buffer") if r % 2 == 0 else ("buffer", "cache")):
                ms, picked[way] = decode(session, prompt, args.decode_tokens, way == "buffer")
                times[way].append(ms)
        cache_ms, buffer_ms = (statistics.median(times[k]) for k in ("cache", "buffer"))
        row = {"artifact": str(path), "depth": depth, "decode_tokens": args.decode_tokens,
               "cache_ms": cache_ms, "buffer_ms": buffer_ms, "buffer_over_cache": buffer_ms / cache_ms,
               "same_tokens": picked["cache"] == picked["buffer"], "rounds_ms": times}
        print(f"{path.name} depth {depth}: growing cache {cache_ms:.1f} ms, buffer {buffer_ms:.1f} ms, "
              f"{row['buffer_over_cache']:.2f}x (same tokens: {row['same_tokens']})", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in args.artifacts:
        if not (path / "manifest.json").is_file():
            sys.exit(f"{path} is not an artifact folder (no manifest.json)")
    commit = git_commit(ROOT)
    start = uptime()
    rows = [row for p in args.artifacts for row in measure(p, args)]
    write_results(args.out, ROOT / "benchmarks" / "results", "kv-buffer", "benchmarks/bench_kv_buffer.py", args, rows,
                  commit=commit, machine=machine(), uptime_start=start, uptime_end=uptime())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill with every position's logits against the last position's only (``logits_to_keep``).

A generating prefill needs the next token's logits only; before the ``logits_to_keep`` input an
ort-cpu artifact projected every prompt position onto the vocabulary. For each artifact this
script times, interleaved in one run (order alternating each round, each call after its own
warm-up), ``Session.forward(prompt, logits_to_keep=0)`` and ``...=1`` on the same random prompt
from an empty cache, and prints the median times and their ratio. It also checks that the kept
row equals the last row of the full logits.

    python benchmarks/bench_prefill_logits.py ARTIFACT [ARTIFACT ...] --tokens 128 --rounds 7 --threads 2

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dmpq_compile.bench import write_results
from dmpq_compile.runtime import load
from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="ort-cpu artifact folders")
    p.add_argument("--tokens", type=int, default=128, help="prompt length (default 128, as llama-bench -p)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/prefill-logits-TIME.json)")
    return p.parse_args(argv)


def measure(path: Path, args: argparse.Namespace) -> dict:
    session = load(path, threads=args.threads)
    if not session.keeps_logits:
        sys.exit(f"{path} has no logits_to_keep input (compiled before it existed): compile it again")
    prompt = np.random.default_rng(0).integers(0, session.vocab_size, (1, args.tokens))
    full, _ = session.forward(prompt)
    last, _ = session.forward(prompt, logits_to_keep=1)
    diff = float(np.abs(full[:, -1:] - last).max())
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(args.rounds):
        for keep in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            session.forward(prompt, logits_to_keep=keep)
            times[keep].append(time.perf_counter() - t0)
    all_ms, last_ms = (statistics.median(times[k]) * 1e3 for k in (0, 1))
    row = {"artifact": str(path), "vocab": session.vocab_size, "tokens": args.tokens,
           "all_ms": all_ms, "last_ms": last_ms, "all_over_last": all_ms / last_ms,
           "prefill_tok_s_all": args.tokens / all_ms * 1e3, "prefill_tok_s_last": args.tokens / last_ms * 1e3,
           "max_abs_diff_last_row": diff, "rounds_ms": {str(k): [t * 1e3 for t in v] for k, v in times.items()}}
    print(f"{path.name}: all positions {all_ms:.1f} ms, last only {last_ms:.1f} ms, "
          f"{row['all_over_last']:.2f}x (last row differs by {diff:.1e})", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in args.artifacts:
        if not (path / "manifest.json").is_file():
            sys.exit(f"{path} is not an artifact folder (no manifest.json)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    start = uptime()
    rows = [measure(p, args) for p in args.artifacts]
    write_results(args.out, ROOT / "benchmarks" / "results", "prefill-logits", "benchmarks/bench_prefill_logits.py", args,
                  rows, commit=commit, uptime_start=start, uptime_end=uptime())
    return 0


if __name__ == "__main__":
    sys.exit(main())

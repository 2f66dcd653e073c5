"""dmpq-compile bench ART1 ART2 ...: interleaved side-by-side measurement, ratios to the first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "benchmark artifacts side by side (prefill, decode, memory, energy, perplexity) as ratios"
DESCRIPTION = """Loads every artifact once and measures them in interleaved rounds, so drift on a shared
machine hits all alike; prints absolute figures with ratios to the first artifact and can write JSON.
Perplexity is measured on each artifact itself."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact folders; the first is the baseline")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--corpus", default="pydoc", help="text for prompts and perplexity; 'none' for random ids")
    p.add_argument("--split", default="test")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens scored for perplexity (default 8192)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess probes")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, bench, format_results, to_json

    for a in args.artifacts:
        if not (Path(a) / "manifest.json").is_file():
            raise FileNotFoundError(f"{a} is not an artifact folder (no manifest.json); compile one first")
    cfg = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, rounds=args.rounds,
                      threads=args.threads, corpus=None if args.corpus == "none" else args.corpus,
                      split=args.split, ppl_tokens=args.ppl_tokens, rss=not args.no_rss)
    results = bench(args.artifacts, cfg, progress=not args.no_progress)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, cfg), indent=1))
        print(f"wrote {args.json}")
    return 0

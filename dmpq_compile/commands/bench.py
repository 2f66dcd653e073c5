"""dmpq-compile bench ART1 ART2 ...: interleaved side-by-side measurement, ratios to the first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "benchmark artifacts side by side (prefill, decode, memory, energy, perplexity) as ratios"
DESCRIPTION = """Loads every artifact once and measures them in interleaved rounds, so drift on a shared
machine hits all alike; prints absolute figures with ratios to the first artifact and can write JSON
(with the CPU model and its SIMD flags). Decode ms/token is the mean time per token over all rounds'
steps, the statistic llama-bench reports (the median step is in the JSON too). Perplexity is measured
on each artifact itself under the evaluation protocol (docs/evaluation.md): for --corpus pydoc on the
test split of both built-in domains (pydoc and pystdlib), each with a 95% bootstrap interval over
documents and the paired ratio to the first artifact."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact folders; the first is the baseline")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--corpus", default="pydoc",
                   help="text for prompts and perplexity: pydoc (default; perplexity on pydoc and pystdlib), "
                   "pystdlib, your own file or folder, or 'none' for random ids and no perplexity")
    p.add_argument("--split", default="auto", choices=("auto", "dev", "test", "train", "calib"),
                   help="auto (default): test of a built-in domain, all of your own corpus")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows per set (default 64)")
    p.add_argument("--context", type=int, default=256, help="evaluation window length (default 256)")
    p.add_argument("--max-doc-share", type=float, default=0.15,
                   help="largest share of a set's scored tokens one document may hold (default 0.15)")
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
                      split=args.split, windows=args.windows, context=args.context,
                      max_doc_share=args.max_doc_share, rss=not args.no_rss)
    results = bench(args.artifacts, cfg, progress=not args.no_progress)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, cfg), indent=1))
        print(f"wrote {args.json}")
    return 0

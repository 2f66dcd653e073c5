"""dmpq-compile run ARTIFACT PROMPT: generate text from a compiled artifact, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

NAME = "run"
HELP = "generate text from a compiled artifact (streams to stdout)"
DESCRIPTION = """Load an artifact folder (verifying its manifest and every file's sha256) and continue PROMPT.
Greedy with --temperature 0 (the default); nucleus sampling with --temperature > 0 and --top-p.
The prompt plus --max-new-tokens must fit in the model's max_position_embeddings: a longer prompt is
an error, unless --truncate drops its oldest tokens (a warning on stderr says how many).
Needs only onnxruntime, numpy and tokenizers."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder written by `dmpq-compile compile`")
    p.add_argument("prompt", metavar="PROMPT", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    p.add_argument("--truncate", action="store_true", help="if the prompt plus --max-new-tokens is longer than the "
                   "model's max_position_embeddings, drop the oldest prompt tokens (with a warning) instead of "
                   "failing")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")


def main(args: argparse.Namespace) -> int:
    from ..runtime import load

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model = load(args.artifact, verify=not args.no_verify, threads=args.threads)
    pieces = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stream=True, truncate=args.truncate)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

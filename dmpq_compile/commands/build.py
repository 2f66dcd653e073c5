"""dmpq-compile build ARTIFACT: build the TensorRT engine of a trt-a100 artifact (on a GPU machine)."""

from __future__ import annotations

import argparse

NAME = "build"
HELP = "build the TensorRT engine (engine.plan) of a trt-a100 artifact; needs a GPU and TensorRT 10.x"
DESCRIPTION = """Parse ARTIFACT/model.onnx with TensorRT's ONNX parser into a strongly typed network, build it with
one optimization profile (batch 1, 1..--max-sequence new tokens, up to --max-context cached ones) and a
timing cache, write ARTIFACT/engine.plan and record it (TensorRT version, GPU, sha256) in manifest.json.
Needs an NVIDIA GPU and `pip install 'dmpq-compile[trt]'` (TensorRT 10.x from NVIDIA's pip index)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder written by `compile --target trt-a100`")
    p.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace limit in GiB (default 8)")
    p.add_argument("--timing-cache", help="timing cache file (default ARTIFACT/timing.cache)")
    p.add_argument("--no-timing-cache", action="store_true", help="build without a timing cache")
    p.add_argument("--max-sequence", type=int, help="most new tokens per call (default min(512, max context))")
    p.add_argument("--max-context", type=int, help="most tokens in the context (default min(4096, model limit))")
    p.add_argument("--weakly-typed", action="store_true", help="let TensorRT choose precisions (FP16 allowed) "
                   "instead of a strongly typed network")
    p.add_argument("--verbose-trt", action="store_true", help="TensorRT builder log at VERBOSE")


def main(args: argparse.Namespace) -> int:
    from ..engine import build_engine

    timing = False if args.no_timing_cache else args.timing_cache
    path = build_engine(args.artifact, workspace_gb=args.workspace_gb, timing_cache=timing,
                        strongly_typed=not args.weakly_typed, max_sequence=args.max_sequence,
                        max_context=args.max_context, verbose=args.verbose_trt)
    print(path)
    return 0

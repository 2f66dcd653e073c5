"""Which quantization group size? Uniform 4-bit and 2-bit experts at group 32 / 64 / 128, side by side.

Compiles each variant for ort-cpu and benchmarks all of them in one interleaved run against the
FP32 artifact: perplexity on the artifact, weight MB, decode ms/token.

    python benchmarks/group_size.py --model samples/mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dmpq_compile.bench import BenchConfig, bench, format_results
from dmpq_compile.compiler import CompileConfig, compile_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per set (docs/evaluation.md)")
    ap.add_argument("--work", default="/tmp/dmpq-groups")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    base = CompileConfig.from_dict({"target": "ort-cpu", "allocate": {"allocator": "uniform"},
                                    "sensitivity": {"enabled": False}})
    paths = [compile_model(args.model, work / "fp32", base.replace(allocate={"budget": 16.0}), progress=False)]
    for bits in (int(b) for b in args.bits.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            cfg = base.replace(allocate={"budget": float(bits)}, quantize={"group_size": group})
            paths.append(compile_model(args.model, work / f"b{bits}-g{group}", cfg, progress=False))
    results = bench(paths, BenchConfig(rounds=2, decode_tokens=16, threads=1, windows=args.windows,
                                       rss=False))
    print(format_results(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"group-size-{Path(args.model).name}.json").write_text(json.dumps(
        {"results": results, "command": "python benchmarks/group_size.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}, indent=1))


if __name__ == "__main__":
    main()

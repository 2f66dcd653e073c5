"""MatMulNBits with float16 scales (as ort-cpu emits them) against float32 scales, per expert.

ort-cpu stores the scales of its 2/4/8-bit weights as float16. MatMulNBits takes scales in its
activations' type, so each quantized product runs on a float16 copy of its input and its output
is cast back to fp32. This script measures what that costs or saves: for each expert shape and
bit-width it builds the one-expert model of the cost table (``backends.ort_cpu.cost``) twice,
with float16 scales and the Casts and with float32 scales and none, and times both interleaved
in one run with the cost table's method (decode M=1 and prefill M=128 per token, cold: the last-level
cache flushed before every timed call; ``--rounds`` alternating rounds of ``--repeats`` calls).
It prints the medians, the ratio float16 / float32 and each variant's stored bits per weight.

    python benchmarks/bench_scale_dtype.py --shapes 4096x14336 2048x1024 --bits 2 4 8 --threads 2

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dmpq_compile.backends.ort_cpu.cost import CacheEvictor, default_evict_bytes, measure_expert_cost

from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4096x14336", "2048x1024"],
                   help="expert shapes HxI (default: Mixtral-8x7B's and OLMoE-1B-7B's)")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round and variant (default 5)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/scale-dtype-TIME.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    evictor = CacheEvictor(default_evict_bytes())
    result = {"command": " ".join(["python", "benchmarks/" + Path(__file__).name, *(argv or sys.argv[1:])]),
              "commit": commit, "start": uptime(), "rows": []}
    print(f"commit {commit}; {result['start']}", flush=True)
    print(f"{'shape':>11} {'bits':>4} {'bpw f16':>7} {'bpw f32':>7} {'decode f16':>10} {'decode f32':>10} "
          f"{'ratio':>6} {'prefill f16':>11} {'prefill f32':>11} {'ratio':>6}")
    for shape in args.shapes:
        h, i = (int(v) for v in shape.lower().split("x"))
        for bits in args.bits:
            samples = {d: {"decode": [], "prefill": []} for d in DTYPES}
            info = {}
            for r in range(args.rounds):
                for dtype in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
                    m = measure_expert_cost(h, i, bits, args.group_size, args.threads, args.repeats,
                                            evictor=evictor, scale_dtype=dtype)
                    samples[dtype]["decode"] += m.decode_cold
                    samples[dtype]["prefill"] += m.prefill_cold
                    info[dtype] = 8 * m.bytes / (3 * h * i)
            med = {d: {k: statistics.median(v) for k, v in samples[d].items()} for d in DTYPES}
            row = {"h": h, "i": i, "bits": bits, "group_size": args.group_size, "threads": args.threads,
                   "bpw": info, "median_ms": med, "samples_ms": samples,
                   "decode_ratio": med["float16"]["decode"] / med["float32"]["decode"],
                   "prefill_ratio": med["float16"]["prefill"] / med["float32"]["prefill"]}
            result["rows"].append(row)
            print(f"{shape:>11} {bits:>4} {info['float16']:>7.3f} {info['float32']:>7.3f} "
                  f"{med['float16']['decode']:>9.3f}ms {med['float32']['decode']:>9.3f}ms {row['decode_ratio']:>6.3f} "
                  f"{med['float16']['prefill']:>10.4f}ms {med['float32']['prefill']:>10.4f}ms "
                  f"{row['prefill_ratio']:>6.3f}", flush=True)
    result["end"] = uptime()
    out = args.out or ROOT / "benchmarks" / "results" / f"scale-dtype-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['end']}\nwrote {out}")


if __name__ == "__main__":
    main()

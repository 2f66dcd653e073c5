"""Scale benchmark: compile real-width random checkpoints and record time and peak RSS per pass.

Checkpoints (bf16, sharded with an index json, written shard by shard by
``dmpq_compile.testing.scale``): Mixtral-8x7B widths with 2 and 4 layers (memory must not grow
with depth) and OLMoE-1B-7B's exact shape (16 layers x 64 experts). Each compile runs in a child
process sampled from /proc every 0.2 s (peak ``VmHWM`` and anonymous RSS); the per-pass wall
time and peak RSS come from the artifact's report.json (each pass resets the peak).

    python benchmarks/bench_scale.py --shapes olmoe-1b-7b:2,olmoe-1b-7b:4 --targets ort-cpu
    python benchmarks/bench_scale.py --shapes mixtral-8x7b:2,mixtral-8x7b:4,olmoe-1b-7b:16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_shapes import run_measured

from dmpq_compile.testing.scale import SHAPES, write_random_checkpoint

RESULTS = Path(__file__).parent / "results"


def build(name: str, layers: int, work: Path) -> Path:
    out = work / f"{name}-L{layers}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    family, overrides = SHAPES[name]
    print(f"writing {out} ...", flush=True)
    write_random_checkpoint(family, out, **{**overrides, "num_hidden_layers": layers})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="mixtral-8x7b:2,mixtral-8x7b:4,olmoe-1b-7b:16",
                    help="NAME:LAYERS,... with NAME in " + ", ".join(SHAPES))
    ap.add_argument("--targets", default="ort-cpu,trt-a100")
    ap.add_argument("--budget-code-bits", default="3.5", help="experts' code bits of every compile")
    ap.add_argument("--work", default="/tmp/dmpq-scale")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for spec in args.shapes.split(","):
        name, layers = spec.split(":")
        ckpt = build(name, int(layers), work)
        for target in args.targets.split(","):
            out = work / f"out-{name}-L{layers}-{target}"
            cmd = ["dmpq-compile", "compile", str(ckpt), "--target", target, "--budget-code-bits", args.budget_code_bits,
                   "-o", str(out), "--overwrite", "--no-progress", "--no-cache"]  # time every pass
            stats = run_measured(cmd, f"{name} L{layers} {target}")
            report = json.loads((out / "report.json").read_text())
            passes = [{"pass": r["name"], "seconds": round(r["seconds"], 1), "peak_rss_mb": round(r["peak_rss_mb"])}
                      for r in report["passes"]] + [{"pass": "emit", **report.get("emit", {})}]
            rows.append({"shape": name, "layers": int(layers), "target": target, **stats, "passes": passes,
                         "command": " ".join(cmd), "loadavg": os.getloadavg()})
            print(json.dumps(rows[-1]["passes"]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": commit, "rows": rows, "argv": sys.argv}, indent=1))
    print("| shape | layers | target | wall s | peak RSS MB | anon RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['layers']} | {r['target']} | {r['seconds']} | {r['peak_rss_mb']} | "
              f"{r['peak_anon_rss_mb']} |")
    print(f"results: {path}")


if __name__ == "__main__":
    main()

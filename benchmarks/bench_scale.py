"""Scale benchmark: compile real-width random checkpoints and record time and peak RSS per pass.

Checkpoints (bf16, sharded with an index json, written shard by shard by
``dmpq_compile.testing.scale``): Mixtral-8x7B widths with 2 and 4 layers (memory must not grow
with depth) and OLMoE-1B-7B's exact shape (16 layers x 64 experts). Each compile runs in a child
process sampled from /proc every 0.2 s (peak ``VmHWM`` and anonymous RSS); the per-pass wall
time and peak RSS come from the artifact's report.json (each pass resets the peak).

    python benchmarks/bench_scale.py --shapes olmoe-1b-7b:2,olmoe-1b-7b:4 --targets ort-cpu
    python benchmarks/bench_scale.py --shapes mixtral-8x7b:2,mixtral-8x7b:4,olmoe-1b-7b:16
    python benchmarks/bench_scale.py --shapes qwen3-30b-a3b:24,qwen3-30b-a3b:12 --targets ort-cpu \
        --budget default --run --delete-checkpoints --work /work/scale

``--budget default`` compiles with no budget flag (the target's default budget and non-expert
placement, as a user's first compile would); ``--run`` then uses each ort-cpu artifact as an app
would: ``dmpq-compile check`` (checksums, onnx.checker, onnxruntime and onnxruntime-genai load it),
``dmpq-compile run`` (our runtime: load and 16 greedy tokens), onnxruntime-genai (load and 16
greedy tokens) and ``dmpq-compile bench`` (decode of 32 tokens after 128, and a 512-token prefill, 2
threads), each in its own process with its wall time and peak RSS. ``--delete-checkpoints``
removes each checkpoint once its compiles are done (a 24-layer Qwen3-30B-A3B-shape checkpoint is
31 GB). Each pass's CPU seconds are recorded beside its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_shapes import run_measured

from dmpq_compile.sysinfo import cpu_flags, cpu_model
from dmpq_compile.testing.scale import SHAPES, write_random_checkpoint

GENAI = """import sys, time
import onnxruntime_genai as og
t0 = time.perf_counter()
model = og.Model(sys.argv[1])
tok = og.Tokenizer(model)
ids = tok.encode("The for statement")
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + 16)
gen = og.Generator(model, params)
t1 = time.perf_counter()
gen.append_tokens(ids)
while not gen.is_done():
    gen.generate_next_token()
print(repr(tok.decode(gen.get_sequence(0))), f"load {t1 - t0:.1f} s, generate {time.perf_counter() - t1:.1f} s")
"""

RESULTS = Path(__file__).parent / "results"


def build(name: str, layers: int, work: Path) -> Path:
    out = work / f"{name}-L{layers}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    family, overrides = SHAPES[name]
    print(f"writing {out} ...", flush=True)
    write_random_checkpoint(family, out, **{**overrides, "num_hidden_layers": layers})
    return out


def run_artifact(art: Path) -> dict:
    """The artifact used as an app would: our runtime and onnxruntime-genai each load it and generate
    16 greedy tokens, and ``dmpq-compile bench`` times decode and a 512-token prefill (each in its own
    process, with its wall time and peak RSS)."""
    out = {}
    check = ["dmpq-compile", "check", str(art)]
    out["check"] = {**run_measured(check, "check"), "command": " ".join(check)}
    runtime = ["dmpq-compile", "run", str(art), "The for statement", "--max-new-tokens", "16", "--threads", "2"]
    out["runtime_generate"] = {**run_measured(runtime, "runtime"), "command": " ".join(runtime)}
    genai = [sys.executable, "-c", GENAI, str(art)]
    out["genai_generate"] = {**run_measured(genai, "genai"), "command": "onnxruntime-genai: load, 16 greedy tokens"}
    for prefill in (128, 512):
        path = art.parent / f"{art.name}-bench-{prefill}.json"
        bench = ["dmpq-compile", "bench", str(art), "--corpus", "none", "--prefill-tokens", str(prefill),
                 "--decode-tokens", "32", "--rounds", "2", "--threads", "2", "--no-progress", "--json", str(path)]
        stats = run_measured(bench, f"bench prefill {prefill}")
        out[f"bench_{prefill}"] = {**stats, "command": " ".join(bench), "result": json.loads(path.read_text())}
    return out


TUNING_ENV = ("ONEDNN_", "DNNL_", "DMPQ_", "OMP_", "MKL_", "MALLOC_", "GLIBC_TUNABLES", "PYTORCH_")


def tuning_env() -> dict[str, str]:
    """The environment variables that change what a compile takes (threads, oneDNN, allocator, dmpq's own), as set
    for this run: the compiles inherit them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(TUNING_ENV)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="mixtral-8x7b:2,mixtral-8x7b:4,olmoe-1b-7b:16",
                    help="NAME:LAYERS,... with NAME in " + ", ".join(SHAPES))
    ap.add_argument("--targets", default="ort-cpu,trt-a100")
    ap.add_argument("--budget-code-bits", default="3.5", help="experts' code bits of every compile")
    ap.add_argument("--budget", choices=("code-bits", "default"), default="code-bits",
                    help="code-bits: --budget-code-bits; default: no budget flag (the target's default)")
    ap.add_argument("--run", action="store_true", help="run each ort-cpu artifact: runtime, genai, bench")
    ap.add_argument("--delete-checkpoints", action="store_true", help="delete each checkpoint after its compiles")
    ap.add_argument("--work", default="/tmp/dmpq-scale")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for spec in args.shapes.split(","):
        name, layers = spec.split(":")
        ckpt = build(name, int(layers), work)
        for target in args.targets.split(","):
            out = work / f"out-{name}-L{layers}-{target}"
            budget = ["--budget-code-bits", args.budget_code_bits] if args.budget == "code-bits" else []
            cmd = ["dmpq-compile", "compile", str(ckpt), "--target", target, *budget,
                   "-o", str(out), "--overwrite", "--no-progress", "--no-cache"]  # time every pass
            load_before = os.getloadavg()
            stats = run_measured(cmd, f"{name} L{layers} {target}")
            report = json.loads((out / "report.json").read_text())
            passes = [{"pass": r["name"], "seconds": round(r["seconds"], 1), "cpu_seconds": r.get("cpu_seconds"),
                       "peak_rss_mb": round(r["peak_rss_mb"]),
                       **({"compute_dtype": r["stats"]["compute_dtype"]} if "compute_dtype" in r.get("stats", {}) else {})}
                      for r in report["passes"]] + [{"pass": "emit", **report.get("emit", {})}]
            artifact_gb = round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e9, 2)
            rows.append({"shape": name, "layers": int(layers), "target": target, **stats, "passes": passes,
                         "artifact_gb": artifact_gb, "command": " ".join(cmd), "loadavg_before": load_before,
                         "loadavg": os.getloadavg()})
            print(json.dumps(rows[-1]["passes"]), flush=True)
            if args.run and target == "ort-cpu":
                rows[-1]["run"] = run_artifact(out)
        if args.delete_checkpoints:
            shutil.rmtree(ckpt)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": commit, "cpu": cpu_model(), "cpu_flags": cpu_flags(), "rows": rows,
                                "argv": sys.argv, "env": tuning_env()}, indent=1))
    print("| shape | layers | target | wall s | peak RSS MB | anon RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['layers']} | {r['target']} | {r['seconds']} | {r['peak_rss_mb']} | "
              f"{r['peak_anon_rss_mb']} |")
    print(f"results: {path}")


if __name__ == "__main__":
    main()

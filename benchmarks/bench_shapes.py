"""Realistic layer shapes with random weights: achieved decode bandwidth against the machine's.

Two one-layer models with random weights (``dmpq_compile.testing.make_tiny_checkpoint``):

* ``mixtral-8x7b``: Mixtral-8x7B widths: hidden 4096, expert intermediate 14336, 8 experts
  top-2, 32 heads / 8 KV heads. The vocabulary is cut to 8192 (the real one has 32000), so
  the fp32 lm_head is 134 MB instead of 524 MB.
* ``qwen3-30b-a3b``: Qwen3-30B-A3B widths: hidden 2048, expert intermediate 768, 128 experts
  top-8 (renormalized), 32 heads / 4 KV heads of 128 with q/k norm. The vocabulary is cut to 8192
  (the real one has 151936).
* ``olmoe-1b-7b``: OLMoE-1B-7B widths: hidden 2048, expert intermediate 1024, 64 experts
  top-8, 16 heads. The vocabulary is cut to 8192 (the real one has 50304).

Each is compiled for ``ort-cpu`` as fp32 / uniform int8 / uniform int4 / mixed ~3 code bits
(``--allocator frequency``: random weights have no meaningful sensitivity), experts only, and as
two whole-model variants: ``int8-all`` (every matrix and the embedding table at 8 bits) and
``mixed-3bpw`` (3 stored bits per weight over the whole model, the weights outside the experts at
4 bits). Each compile runs
in its own process, one after the other, so a variant's memory is released before the next
one starts. The routing profile runs on random-word text. All variants of one shape are then
benchmarked in one interleaved ``bench`` run with random token ids (no perplexity). Peak RSS
is probed afterwards, one fresh process per artifact (``VmHWM``, see ``bench_samples.py``).

The achieved bandwidth is the bytes read per decoded token (every non-expert weight, plus each
expert's bytes weighted by its routing frequency, plus one embedding row) divided by the decode
time. It is compared with a numpy streaming read measured by this script on 1 and 2 threads.

    python benchmarks/bench_shapes.py                        # both shapes
    python benchmarks/bench_shapes.py --shapes olmoe-1b-7b --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dmpq_compile.sysinfo import available_memory_bytes, cpu_model, proc_status
from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    "mixtral-8x7b": ("mixtral", {"num_hidden_layers": 1, "hidden_size": 4096, "intermediate_size": 14336,
                                 "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "vocab_size": 8192, "max_position_embeddings": 4096}),
    "olmoe-1b-7b": ("olmoe", {"num_hidden_layers": 1, "hidden_size": 2048, "intermediate_size": 1024,
                              "num_experts": 64, "num_experts_per_tok": 8, "num_attention_heads": 16,
                              "num_key_value_heads": 16, "vocab_size": 8192, "max_position_embeddings": 4096}),
    "qwen3-30b-a3b": ("qwen3_moe", {"num_hidden_layers": 1, "hidden_size": 2048, "intermediate_size": 6144,
                                    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                                    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                                    "norm_topk_prob": True, "vocab_size": 8192, "max_position_embeddings": 4096}),
}
# Free memory (GB) a shape needs: the largest peak anonymous RSS measured for its steps (the fp32 compile:
# 17.5 GB at Mixtral widths, 5.4 GB at OLMoE widths, see benchmarks/README.md) plus a margin.
MIN_AVAILABLE_GB = {"mixtral-8x7b": 19.0, "olmoe-1b-7b": 7.0, "qwen3-30b-a3b": 7.0}
VARIANTS = (
    ("fp32", ["--allocator", "uniform", "--budget-code-bits", "16", "--no-sensitivity"]),
    ("int8", ["--allocator", "uniform", "--budget-code-bits", "8", "--no-sensitivity"]),
    ("int4", ["--allocator", "uniform", "--budget-code-bits", "4", "--no-sensitivity"]),
    ("mixed-3", ["--allocator", "frequency", "--budget-code-bits", "3", "--no-sensitivity"]),
    # whole model: every matrix quantized, the embedding table included
    ("int8-all", ["--allocator", "uniform", "--budget-code-bits", "8", "--nonexpert-bits", "8", "--no-sensitivity"]),
    ("mixed-3bpw", ["--allocator", "frequency", "--budget-bits", "3", "--nonexpert-bits", "4", "--no-sensitivity"]),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS], choices=[v for v, _ in VARIANTS],
                   help="variants to compile and bench, in this order; ratios are to the first (default: all)")
    p.add_argument("--work", default=str(ROOT / "out" / "bench-shapes"), help="checkpoints and artifacts go here")
    p.add_argument("--reuse", action="store_true", help="keep checkpoints/artifacts that already exist")
    p.add_argument("--cleanup", action="store_true", help="delete each shape's files after benchmarking it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--calib-sequences", type=int, default=8, help="profile sequences of 128 tokens (default 8)")
    p.add_argument("--stream-mb", type=int, default=1024, help="array size of the bandwidth probe (default 1024)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="build a shape even when less memory is free than its fp32 compile was measured to need")
    return p.parse_args(argv)


# -- machine bandwidth -----------------------------------------------------------------------------
def stream_read_gb_s(array: np.ndarray, threads: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth of summing ``array`` split over ``threads`` threads
    (numpy releases the GIL inside the reduction)."""
    parts = np.array_split(array, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.add.reduce, parts))
            best = min(best, time.perf_counter() - t0)
    return array.nbytes / best / 1e9


def machine_bandwidth(mb: int) -> dict[str, float]:
    array = np.ones(mb * 2**20 // 4, dtype=np.float32)
    out = {f"{t}_thread": round(stream_read_gb_s(array, t), 2) for t in (1, 2)}
    del array
    return out


# -- building --------------------------------------------------------------------------------------
def run_measured(cmd: list[str], what: str) -> dict[str, float]:
    """Run ``cmd``, sampling ``/proc/<pid>/status`` every 0.2 s; returns wall seconds, the peak RSS
    (``VmHWM``: counts file pages the process maps, e.g. the safetensors it reads) and the largest
    anonymous RSS seen (``RssAnon``: the process's own memory), both in MiB."""
    print(f"{what}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        hwm, anon = 0, 0
        while proc.poll() is None:
            status = proc_status(proc.pid)
            hwm, anon = max(hwm, status.get("VmHWM", 0)), max(anon, status.get("RssAnon", 0))
            time.sleep(0.2)
        err.seek(0)
        stderr = err.read()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{stderr[-3000:]}")
    stats = {"seconds": round(seconds, 1), "peak_rss_mb": round(hwm / 1024), "peak_anon_rss_mb": round(anon / 1024)}
    print(f"  {stats}", flush=True)
    return stats


def build_checkpoint(name: str, work: Path, reuse: bool) -> tuple[Path, dict]:
    family, overrides = SHAPES[name]
    out = work / name / "checkpoint"
    if reuse and (out / "config.json").is_file():
        return out, {}
    # save_pretrained in 1 GB shards: safetensors builds a whole shard in memory before writing it, so one
    # 5.9 GB shard would double the peak (the frontend reads sharded checkpoints)
    code = ("import functools, json, sys\nfrom transformers import PreTrainedModel\n"
            "PreTrainedModel.save_pretrained = functools.partialmethod(PreTrainedModel.save_pretrained, "
            "max_shard_size='1GB')\nfrom dmpq_compile.testing import make_tiny_checkpoint\n"
            "make_tiny_checkpoint(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))\n")
    stats = run_measured([sys.executable, "-c", code, family, str(out), json.dumps(overrides)],
                         f"{name}: random checkpoint")
    return out, stats


def selected(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(variant, flags)`` of ``--variants``, in their order."""
    flags = dict(VARIANTS)
    return [(v, flags[v]) for v in args.variants]


def compile_variants(name: str, ckpt: Path, corpus: Path, work: Path, args: argparse.Namespace) -> dict:
    stats = {}
    for variant, flags in selected(args):
        out = work / name / variant
        if args.reuse and (out / "manifest.json").is_file():
            continue
        cmd = ["dmpq-compile", "compile", str(ckpt), "--target", "ort-cpu", *flags, "--calib-corpus", str(corpus),
               "--calib-sequences", str(args.calib_sequences), "--seq-len", "128", "-o", str(out), "--overwrite",
               "--no-progress", "--no-cache"]
        stats[variant] = {**run_measured(cmd, f"{name}: compile {variant}"), "command": " ".join(cmd)}
    return stats


# -- benchmarking ----------------------------------------------------------------------------------
def bench_shape(name: str, work: Path, args: argparse.Namespace) -> list[dict]:
    """One interleaved bench run over the variants (no RSS inside), then RSS probes one at a time."""
    from bench_samples import peak_rss_mb  # same folder: a VmHWM probe (see bench_samples.py)

    from dmpq_compile.bench import BenchConfig, bench

    paths = [work / name / v for v, _ in selected(args)]
    cfg = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, rounds=args.rounds,
                      threads=args.threads, corpus=None, rss=False)
    results = bench(paths, cfg, progress=False)
    prompt = np.random.default_rng(0).integers(0, 64, args.prefill_tokens).tolist()
    for r, path in zip(results, paths):
        r["peak_rss_mb"] = peak_rss_mb(path, prompt, args.decode_tokens, args.threads)
    return results


def table(results: list[dict], machine: dict[str, float]) -> str:
    base = results[0]
    head = f"{'variant':>9} {'prefill tok/s':>20} {'decode ms/tok':>20} {'peak RSS MB':>18} {'weight MB':>18} " \
           f"{'read MB/tok':>12} {'GB/s':>7} {'% of 1T':>8} {'% of 2T':>8}"
    lines = [head]
    for r in results:
        def cell(key: str, fmt: str, scale: float = 1.0, r: dict = r) -> str:
            return f"{fmt.format(r[key] * scale)} ({r[key] / base[key]:.2f}x)"
        lines.append(f"{r['label']:>9} {cell('prefill_tok_s', '{:.1f}'):>20} {cell('decode_ms', '{:.2f}'):>20} "
                     f"{cell('peak_rss_mb', '{:.0f}'):>18} {cell('weight_bytes', '{:.0f}', 2**-20):>18} "
                     f"{r['read_bytes_per_token'] / 2**20:>12.1f} {r['bandwidth_gb_s']:>7.2f} "
                     f"{100 * r['bandwidth_gb_s'] / machine['1_thread']:>7.0f}% "
                     f"{100 * r['bandwidth_gb_s'] / machine['2_thread']:>7.0f}%")
    return "\n".join(lines)


def available_gb() -> float | None:
    free = available_memory_bytes()
    return None if free is None else free / 2**30


def check_memory(name: str, args: argparse.Namespace) -> None:
    """Stop before a shape whose build was measured to need more memory than is free now."""
    free, need = available_gb(), MIN_AVAILABLE_GB[name]
    if free is not None and free < need and not args.skip_memory_check:
        sys.exit(f"{name}: {free:.1f} GB available, but its fp32 compile was measured to need about {need:.0f} GB "
                 "(dmpq-compile keeps the checkpoint tensors while the ONNX model is built); free memory, run "
                 "--shapes olmoe-1b-7b, or pass --skip-memory-check")


def run_shape(name: str, work: Path, corpus: Path, args: argparse.Namespace) -> dict:
    if not (args.reuse and all((work / name / v / "manifest.json").is_file() for v, _ in selected(args))):
        check_memory(name, args)
    ckpt, ckpt_stats = build_checkpoint(name, work, args.reuse)
    compile_stats = compile_variants(name, ckpt, corpus, work, args)
    before = machine_bandwidth(args.stream_mb)
    load_before = uptime()
    results = bench_shape(name, work, args)
    load_after = uptime()
    after = machine_bandwidth(args.stream_mb)
    machine = {k: max(before[k], after[k]) for k in before}
    print(f"\n{name}: machine read bandwidth (numpy, best of 5): before {before}, after {after} GB/s")
    print(table(results, machine))
    if args.cleanup:
        shutil.rmtree(work / name, ignore_errors=True)
    return {"shape": name, "family": SHAPES[name][0], "config": SHAPES[name][1], "checkpoint": ckpt_stats,
            "compile": compile_stats, "machine_gb_s": {"before": before, "after": after},
            "uptime": {"before_bench": load_before, "after_bench": load_after}, "results": results}


def main(argv: list[str] | None = None) -> int:
    from dmpq_compile.testing import write_tiny_corpus

    args = parse_args(argv)
    work = Path(args.work)
    corpus = write_tiny_corpus(work / "corpus")
    print(f"start: {uptime()}  (cpus: {os.cpu_count()}, {cpu_model()})")
    shapes = [run_shape(name, work, corpus, args) for name in args.shapes]
    print(f"end: {uptime()}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"shapes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_shapes.py", *sys.argv[1:]]),
                               "cpu": cpu_model(), "shapes": shapes}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build every variant of a trained sample and benchmark them side by side in one interleaved run.

Variants (all ``--target ort-cpu``, group/block size 64):

* ``fp32``, ``int8``, ``int4``: ``--allocator uniform --budget-bits 16|8|4 --no-sensitivity``;
* ``ortq-all``: the peer baseline, a torch.onnx export quantized to 4 bits by ONNX Runtime's
  ``MatMulNBitsQuantizer`` on every MatMul with a constant weight (attention and lm_head too);
* ``ortq-experts``: the same quantizer restricted to the expert MatMuls (the tensors
  dmpq-compile quantizes);
* ``mixed-3.5``, ``mixed-3``: ``--allocator optimal --budget-bits 3.5|3`` with the sensitivity pass.

Then ``dmpq_compile.bench.bench`` measures all of them in one interleaved run (ratios to fp32)
and the results go to ``benchmarks/results/samples-<sample>-<time>.json``.

    python benchmarks/bench_samples.py                       # samples/mixtral-tiny
    python benchmarks/bench_samples.py --sample olmoe-tiny
    python benchmarks/bench_samples.py --reuse               # keep artifacts already built
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMPILED = (
    ("fp32", {"allocator": "uniform", "budget": 16.0, "sensitivity": False}),
    ("int8", {"allocator": "uniform", "budget": 8.0, "sensitivity": False}),
    ("int4", {"allocator": "uniform", "budget": 4.0, "sensitivity": False}),
    ("mixed-3.5", {"allocator": "optimal", "budget": 3.5, "sensitivity": True}),
    ("mixed-3", {"allocator": "optimal", "budget": 3.0, "sensitivity": True}),
)
PEERS = (("ortq-all", "all"), ("ortq-experts", "experts"))
ORDER = ("fp32", "int8", "int4", "ortq-all", "ortq-experts", "mixed-3.5", "mixed-3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", default="mixtral-tiny", help="folder under samples/ (mixtral-tiny, olmoe-tiny)")
    p.add_argument("--model-dir", help="any checkpoint folder instead of --sample")
    p.add_argument("--work", help="where artifacts go (default out/bench/<sample>)")
    p.add_argument("--reuse", action="store_true", help="keep artifacts that already exist instead of rebuilding")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--corpus", default="pydoc")
    return p.parse_args(argv)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def build_compiled(model_dir: Path, work: Path, reuse: bool) -> dict[str, float | None]:
    """Compile the dmpq variants; returns the compile seconds of each (None: reused)."""
    from dmpq_compile.compiler import CompileConfig, compile_model

    seconds: dict[str, float | None] = {}
    for name, settings in COMPILED:
        out = work / name
        if reuse and (out / "manifest.json").is_file():
            seconds[name] = None
            continue
        cfg = CompileConfig(target="ort-cpu", budget_kind="bits", **settings)
        print(f"compiling {name} ({settings}) ...", flush=True)
        t0 = time.perf_counter()
        compile_model(model_dir, out, cfg, progress=False, overwrite=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return seconds


def build_peers(model_dir: Path, work: Path, reuse: bool) -> dict[str, float | None]:
    """Export the model once with torch.onnx and write both ORT-quantizer peers from it."""
    import tempfile

    from dmpq_compile.baselines import OrtQuantizerConfig, export_checked, write_baseline

    todo = [(n, s) for n, s in PEERS if not (reuse and (work / n / "manifest.json").is_file())]
    seconds: dict[str, float | None] = {n: None for n, _ in PEERS}
    if not todo:
        return seconds
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=".export.") as tmp:
        print("exporting with torch.onnx for the ORT-quantizer peers ...", flush=True)
        export = export_checked(model_dir, tmp)
        for name, scope in todo:
            t0 = time.perf_counter()
            write_baseline(export, model_dir, work / name, OrtQuantizerConfig(scope=scope), overwrite=True,
                           progress=False)
            seconds[name] = round(export.seconds + time.perf_counter() - t0, 1)
    return seconds


def average_bits(path: Path) -> float:
    """Mean expert bits from the manifest's histogram (experts have equal sizes in these models)."""
    hist = json.loads((path / "manifest.json").read_text())["quantization"]["bits_histogram"]
    return sum(int(b) * n for b, n in hist.items()) / sum(hist.values())


def main(argv: list[str] | None = None) -> int:
    from dmpq_compile.bench import BenchConfig, bench, format_results, to_json

    args = parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else ROOT / "samples" / args.sample
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir} is not a checkpoint folder (no config.json); train or download the sample first")
    name = model_dir.name
    work = Path(args.work) if args.work else ROOT / "out" / "bench" / name
    load_before = uptime()
    print(f"before: {load_before}")
    seconds = {**build_compiled(model_dir, work, args.reuse), **build_peers(model_dir, work, args.reuse)}
    paths = [work / n for n in ORDER]
    cfg = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, rounds=args.rounds,
                      threads=args.threads, corpus=None if args.corpus == "none" else args.corpus,
                      ppl_tokens=args.ppl_tokens)
    load_bench = uptime()
    results = bench(paths, cfg, progress=False)
    load_after = uptime()
    for r in results:
        r["average_expert_bits"] = average_bits(Path(r["artifact"]))
        r["build_seconds"] = seconds.get(r["label"])
    print(format_results(results))
    print("average expert bits: " + ", ".join(f"{r['label']} {r['average_expert_bits']:.2f}" for r in results))
    print(f"after: {load_after}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"samples-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    data = {**to_json(results, cfg), "command": " ".join(["python", "benchmarks/bench_samples.py", *sys.argv[1:]]),
            "model_dir": str(model_dir), "uptime": {"before_build": load_before, "before_bench": load_bench,
                                                    "after": load_after}}
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build every variant of a trained sample and benchmark them side by side in one interleaved run.

Variants (all ``--target ort-cpu``, group/block size 64):

* ``fp32``, ``int8``, ``int4``: ``--allocator uniform --budget-code-bits 16|8|4 --no-sensitivity``;
* ``ortq-all``: the peer baseline, a torch.onnx export quantized to 4 bits by ONNX Runtime's
  ``MatMulNBitsQuantizer`` on every MatMul with a constant weight (attention and lm_head too);
* ``ortq-experts``: the same quantizer restricted to the expert MatMuls (the tensors
  dmpq-compile quantizes);
* ``mixed-3.5``, ``mixed-3``: ``--allocator optimal --budget-code-bits 3.5|3`` with the sensitivity pass.

Then ``dmpq_compile.bench.bench`` measures all of them in one interleaved run (ratios to fp32).
Peak RSS is probed here, one fresh process per artifact, from ``VmHWM`` in
``/proc/self/status``: ``bench``'s own probe reads ``ru_maxrss``, which on Linux keeps the
parent's high-water mark across ``exec`` and so reports this (large) process's RSS for every
artifact. Perplexity (under the evaluation protocol, docs/evaluation.md: test split of pydoc and
pystdlib, 95 % intervals over documents) is close for every variant of a small trained model, so
the script also reports the mean KL(fp32 || variant) and top-1 agreement with fp32 on the same
windows, computed with one onnxruntime thread, so that the comparison stays exact even when a
multi-threaded kernel is not: onnxruntime 1.32's ``ScatterND(reduction="add")`` loses updates
when indices repeat, which made the compiled artifacts' logits vary from run to run until
commit 4505894 changed the gather dispatch. Results go to
``benchmarks/results/samples-<sample>-<time>.json``.

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

import numpy as np

from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMPILED = (
    ("fp32", {"allocate": {"allocator": "uniform", "budget": 16.0}, "sensitivity": {"enabled": False}}),
    ("int8", {"allocate": {"allocator": "uniform", "budget": 8.0}, "sensitivity": {"enabled": False}}),
    ("int4", {"allocate": {"allocator": "uniform", "budget": 4.0}, "sensitivity": {"enabled": False}}),
    ("mixed-3.5", {"allocate": {"allocator": "optimal", "budget": 3.5}}),
    ("mixed-3", {"allocate": {"allocator": "optimal", "budget": 3.0}}),
)
PEERS = (("ortq-all", "all"), ("ortq-experts", "experts"))
ORDER = ("fp32", "int8", "int4", "ortq-all", "ortq-experts", "mixed-3.5", "mixed-3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", default="mixtral-tiny", help="folder under samples/ (mixtral-tiny, olmoe-tiny)")
    p.add_argument("--model-dir", help="any checkpoint folder instead of --sample")
    p.add_argument("--work", help="where artifacts go (default out/bench/<sample>)")
    p.add_argument("--reuse", action="store_true", help="keep artifacts that already exist instead of rebuilding")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10: tiny models time fast)")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--windows", type=int, default=64, help="evaluation windows per set (docs/evaluation.md)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--corpus", default="pydoc")
    return p.parse_args(argv)


def build_compiled(model_dir: Path, work: Path, reuse: bool) -> dict[str, float | None]:
    """Compile the dmpq variants; returns the compile seconds of each (None: reused)."""
    from dmpq_compile.compiler import CompileConfig, compile_model

    seconds: dict[str, float | None] = {}
    for name, settings in COMPILED:
        out = work / name
        if reuse and (out / "manifest.json").is_file():
            seconds[name] = None
            continue
        cfg = CompileConfig.from_dict({"target": "ort-cpu", **settings}).replace(allocate={"budget_kind": "bits"})
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


PROBE = """
import json, sys
from dmpq_compile.runtime import load
a = json.loads(sys.argv[2])
m = load(sys.argv[1], threads=a["threads"])
logits, past = m.forward([a["ids"]])
for _ in range(a["decode"]):
    logits, past = m.forward([[int(logits[0, -1].argmax())]], past)
from dmpq_compile.sysinfo import proc_status
print(proc_status()["VmHWM"])
"""


def peak_rss_mb(path: Path, ids: list[int], decode: int, threads: int | None) -> float:
    """Peak RSS (MiB, ``VmHWM``) of a fresh process that loads ``path`` and runs a prefill + decode."""
    arg = json.dumps({"ids": [int(i) for i in ids], "decode": decode, "threads": threads})
    res = subprocess.run([sys.executable, "-c", PROBE, str(path), arg], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"RSS probe of {path} failed: {res.stderr.strip()[-800:]}")
    return int(res.stdout.split()[-1]) / 1024


def agreement_with_fp32(paths: list[Path], corpus: str, windows: int = 64, split: str = "test") -> dict[str, dict]:
    """KL(fp32 || variant) in nats and top-1 agreement with fp32 under the evaluation protocol (docs/evaluation.md),
    on every set of ``corpus`` (pydoc: pydoc and pystdlib), with 95% bootstrap intervals over documents (the first
    path is fp32). Flat keys hold the first set's values; ``agreement`` every set's."""
    from tokenizers import Tokenizer

    from dmpq_compile.eval import DOMAINS, NumpyLogits, eval_windows, score, summarize, window_logprobs
    from dmpq_compile.runtime import load

    tok = Tokenizer.from_file(str(paths[0] / "tokenizer.json"))
    sets = DOMAINS if corpus in DOMAINS else (corpus,)
    out: dict[str, dict] = {p.name: {"agreement": {}} for p in paths}
    for i, spec in enumerate(sets):
        w = eval_windows(spec, split, tok, max_windows=windows)

        def fn(path: Path) -> NumpyLogits:
            return NumpyLogits(load(path, threads=1).logits)  # one thread: deterministic (see the module docstring)

        ref = window_logprobs(fn(paths[0]), w)
        scores = {p.name: score(fn(p), w, reference=ref) for p in paths}
        summary = summarize(w, scores)
        for p in paths:
            q = summary[p.name]
            out[p.name]["agreement"][w.name] = {"kl_vs_fp32": q["kl"], "top1_vs_fp32": q["top1"], "ppl": q["ppl"],
                                                "tokens": w.n_scored, "documents": len(w.doc_keys)}
            if i == 0:
                out[p.name].update({"kl_vs_fp32": q["kl"]["value"], "top1_vs_fp32": q["top1"]["value"],
                                    "tokens": w.n_scored})
    return out


def average_bits(path: Path) -> float:
    """Mean expert bits from the manifest's histogram (experts have equal sizes in these models)."""
    hist = json.loads((path / "manifest.json").read_text())["quantization"]["bits_histogram"]
    return sum(int(b) * n for b, n in hist.items()) / sum(hist.values())


def main(argv: list[str] | None = None) -> int:
    from dmpq_compile.bench import BenchConfig, bench, format_results, to_json
    from dmpq_compile.eval.protocol import format_interval

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
    corpus = None if args.corpus == "none" else args.corpus
    cfg = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, rounds=args.rounds,
                      threads=args.threads, corpus=corpus, windows=args.windows, rss=False)
    load_bench = uptime()
    results = bench(paths, cfg, progress=False)
    load_after = uptime()
    prompt = np.random.default_rng(0).integers(0, 64, args.prefill_tokens).tolist()
    agree = agreement_with_fp32(paths, corpus, args.windows) if corpus else {}
    for r, path in zip(results, paths):
        r["peak_rss_mb"] = peak_rss_mb(path, prompt, args.decode_tokens, args.threads)
        r.update(agree.get(path.name, {}))
        r["average_expert_bits"] = average_bits(path)
        r["build_seconds"] = seconds.get(r["label"])
    print(format_results(results))
    print("\n".join(f"{r['label']:>14}: avg expert bits {r['average_expert_bits']:.2f}"
                    + "".join(f"; {name}: KL vs fp32 {format_interval(a['kl_vs_fp32'], '{:.2e}')} nats, top-1 vs fp32 "
                              f"{format_interval(a['top1_vs_fp32'], '{:.3f}')}"
                              for name, a in r.get("agreement", {}).items()) for r in results))
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

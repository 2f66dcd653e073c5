"""onnxruntime-genai vs our runtime vs the graph before the genai contract, side by side in one run.

For each model the script quantizes one graph (every expert at ``--bits``, RTN, group 64) and emits
it twice from the same codes: the current ort-cpu graph (``attention_mask``, ``GroupQueryAttention``,
a KV buffer past and present may share, ``genai_config.json``, the default ``fused`` expert
dispatch) and the graph before both changes (``emit(genai=False, dispatch="gather-if")``: plain-op
attention, a growing cache, per-expert ``If`` dispatch). It then times, interleaved round by
round (the order rotates each round, each runner warmed up first), with the same random prompt:

* ``genai``: onnxruntime-genai on the current graph (shared KV buffer, its defaults);
* ``ours``: ``dmpq_compile.runtime`` on the current graph;
* ``before``: ``dmpq_compile.runtime`` on the graph before this change.

Prefill is one call on ``--prefill`` tokens that yields the next token's logits (genai:
``append_tokens``; ours: ``forward(..., logits_to_keep=1)``); decode is the median step over
``--decode`` greedy steps after a 128-token prompt. The statistic is the median over rounds of
each runner's time, the same for every runner. Peak memory (``VmHWM``) is probed afterwards in a
fresh process per runner that prefills ``--rss-tokens`` tokens and decodes 8.

Models: the bundled samples and ``olmoe-1b-7b-1layer`` (OLMoE-1B-7B widths, one decoder layer,
its real 50304-token vocabulary; a random bf16 checkpoint written shard by shard).

    python benchmarks/bench_genai.py                                  # everything (~15 min on 2 cores)
    python benchmarks/bench_genai.py --models mixtral-tiny --rounds 3 --prefill 128

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mixtral-tiny", "olmoe-tiny", "olmoe-1b-7b-1layer")
RUNNERS = ("genai", "ours", "before")

PROBE = r"""
import json, sys, numpy as np
kind, path, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ids = np.random.default_rng(0).integers(2, arg["vocab"], arg["tokens"])
if kind == "genai":
    import onnxruntime_genai as og
    model = og.Model(path)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=arg["tokens"] + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids[None, :].astype(np.int32))
    for _ in range(8):
        gen.generate_next_token()
else:
    from dmpq_compile.runtime import load
    s = load(path, threads=arg["threads"], verify=False)
    logits, past = s.forward(ids[None, :], logits_to_keep=1)
    for _ in range(8):
        logits, past = s.forward(np.array([[int(logits[0, -1].argmax())]]), past)
from dmpq_compile.sysinfo import proc_status
print(proc_status()["VmHWM"])
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048], help="prefill lengths")
    p.add_argument("--decode", type=int, default=32, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rss-tokens", type=int, default=2048)
    p.add_argument("--work", type=Path, help="folder for checkpoints and artifacts (default: a temporary one)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/genai-TIME.json)")
    return p.parse_args(argv)


def cpu() -> dict:
    from dmpq_compile.sysinfo import cpu_flags, cpu_model

    model, flags = cpu_model(), cpu_flags()
    return {"model": model, "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                                    if f in flags]}


def checkpoint(name: str, work: Path) -> Path:
    if name in ("mixtral-tiny", "olmoe-tiny"):
        return ROOT / "samples" / name
    out = work / name
    if not (out / "config.json").is_file():
        from dmpq_compile.testing.scale import SHAPES, write_random_checkpoint

        family, overrides = SHAPES["olmoe-1b-7b"]
        write_random_checkpoint(family, out, **{**overrides, "num_hidden_layers": 1})
    return out


def build(name: str, work: Path, bits: int) -> dict[str, Path]:
    """The two artifacts of one model, from one quantized graph."""
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend
    from dmpq_compile.passes.infra.base import PassContext
    from dmpq_compile.passes.quantize import QuantizePass

    from dmpq_compile.artifact import write_artifact
    from dmpq_compile.frontend import load

    arts = {"new": work / f"{name}-genai", "old": work / f"{name}-before"}
    if all((p / "manifest.json").is_file() for p in arts.values()):
        return arts
    graph = load(checkpoint(name, work))
    for node in graph.experts():
        graph.annotate(node.id, "bits", bits)
    QuantizePass(group_size=64).call(graph, PassContext(progress=False))
    for key, options in (("new", {}), ("old", {"genai": False, "dispatch": "gather-if"})):
        write_artifact(graph, OrtCpuBackend(), arts[key], overwrite=True, emit_options=options)
    return arts


class Ours:
    def __init__(self, path: Path, threads: int) -> None:
        from dmpq_compile.runtime import load

        self.session = load(path, threads=threads, verify=False)

    def prefill(self, ids: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.session.forward(ids[None, :], logits_to_keep=1)
        return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, steps: int) -> list[float]:
        logits, past = self.session.forward(ids[None, :], logits_to_keep=1)
        times = []
        for _ in range(steps):
            token = np.array([[int(logits[0, -1].argmax())]])
            t0 = time.perf_counter()
            logits, past = self.session.forward(token, past)
            times.append(time.perf_counter() - t0)
        return times


def with_threads(path: Path, threads: int) -> Path:
    """A folder beside ``path`` that links every file of it but ``genai_config.json``, whose copy sets the
    session's intra-op threads (this onnxruntime-genai build refuses ``og.Config(path)``, and an
    artifact's own files are checksummed, so they are not edited)."""
    folder = path.with_name(f"{path.name}-t{threads}")
    folder.mkdir(exist_ok=True)
    for f in path.iterdir():
        if f.name != "genai_config.json" and not (folder / f.name).exists():
            if f.is_dir():  # the kernel library's folder: onnxruntime-genai loads a custom-op library only from
                shutil.copytree(f, folder / f.name)  # inside the model folder, symlinks resolved
            else:
                (folder / f.name).symlink_to(f.resolve())
    config = json.loads((path / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (folder / "genai_config.json").write_text(json.dumps(config, indent=1))
    return folder


class Genai:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(with_threads(path, threads)))

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray) -> float:
        gen = self._generator(len(ids) + 1)
        t0 = time.perf_counter()
        gen.append_tokens(ids[None, :].astype(np.int32))
        return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, steps: int) -> list[float]:
        gen = self._generator(len(ids) + steps + 1)
        gen.append_tokens(ids[None, :].astype(np.int32))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t0)
        return times


def peak_rss_mb(kind: str, path: Path, vocab: int, tokens: int, threads: int) -> float:
    arg = json.dumps({"vocab": vocab, "tokens": tokens, "threads": threads})
    res = subprocess.run([sys.executable, "-c", PROBE, kind, str(path), arg], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"RSS probe ({kind}, {path}) failed: {res.stderr.strip()[-800:]}")
    return int(res.stdout.split()[-1]) / 1024


def bench_model(name: str, work: Path, args: argparse.Namespace) -> dict:
    arts = build(name, work, args.bits)
    runners = {"genai": Genai(arts["new"], args.threads), "ours": Ours(arts["new"], args.threads),
               "before": Ours(arts["old"], args.threads)}
    vocab = runners["ours"].session.vocab_size
    limit = runners["ours"].session.max_positions or 10 ** 9
    lengths = [n for n in args.prefill if n <= limit]
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(2, vocab, n) for n in lengths}
    decode_prompt = rng.integers(2, vocab, 128)
    for r in runners.values():  # warm-up
        r.prefill(prompts[lengths[0]])
        r.decode(decode_prompt, 2)
    prefill = {k: {n: [] for n in lengths} for k in runners}
    decode = {k: [] for k in runners}
    for rnd in range(args.rounds):
        order = RUNNERS[rnd % 3:] + RUNNERS[:rnd % 3]
        for k in order:
            for n in lengths:
                prefill[k][n].append(runners[k].prefill(prompts[n]))
            decode[k].append(statistics.median(runners[k].decode(decode_prompt, args.decode)))
        print(f"  {name}: round {rnd + 1}/{args.rounds}", flush=True)
    del runners
    row = {"model": name, "artifact_bytes": sum(f.stat().st_size for f in arts["new"].iterdir()),
           "runners": {}}
    for k in RUNNERS:
        art = arts["old" if k == "before" else "new"]
        row["runners"][k] = {
            "decode_ms": statistics.median(decode[k]) * 1e3, "decode_rounds_ms": [t * 1e3 for t in decode[k]],
            "prefill_ms": {str(n): statistics.median(v) * 1e3 for n, v in prefill[k].items()},
            "prefill_tok_s": {str(n): n / statistics.median(v) for n, v in prefill[k].items()},
            "prefill_rounds_ms": {str(n): [t * 1e3 for t in v] for n, v in prefill[k].items()},
            "peak_rss_mb": peak_rss_mb(k if k == "genai" else "ours", with_threads(art, args.threads) if k == "genai"
                                       else art, vocab,
                                       min(args.rss_tokens, limit - 8), args.threads),
        }
    return row


def table(rows: list[dict], rss_tokens: int) -> str:
    lengths = sorted({int(n) for r in rows for n in r["runners"]["ours"]["prefill_ms"]})
    head = f"{'model':>20} {'runner':>7} {'decode ms':>10} " + " ".join(f"{f'p{n} tok/s':>11}" for n in lengths) + \
        f" {f'RSS@{rss_tokens} MB':>13} {'decode/ours':>12}"
    lines = [head]
    for r in rows:
        base = r["runners"]["ours"]["decode_ms"]
        for k in RUNNERS:
            x = r["runners"][k]
            cells = " ".join(f"{x['prefill_tok_s'].get(str(n), float('nan')):>11.1f}" for n in lengths)
            lines.append(f"{r['model']:>20} {k:>7} {x['decode_ms']:>10.2f} {cells} {x['peak_rss_mb']:>13.0f} "
                         f"{x['decode_ms'] / base:>11.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        sys.exit("onnxruntime-genai is not installed: pip install onnxruntime-genai (scripts/setup.sh does)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [bench_model(name, work, args) for name in args.models]
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(table(rows, args.rss_tokens))
    print(f"commit {commit}, CPU {cpu()}, {args.threads} threads, load {load_start} -> {load_end}")
    out = args.out or RESULTS / f"genai-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_genai.py", *(argv or sys.argv[1:])]),
                               "commit": commit, "cpu": cpu(), "threads": args.threads, "bits": args.bits,
                               "statistic": "decode: each round's median step of --decode greedy steps, median over "
                                            "rounds; prefill: median over rounds; the same for every runner",
                               "load_start": load_start, "load_end": load_end, "rows": rows}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Expert dispatch on ort-cpu: per-expert ``gather-if``, fused ``QMoE`` per bit-width group and dmpq's
``kernel`` (one ``ai.dmpq.MixedMoE`` per layer), side by side in one run.

For each shape the script writes a one-decoder-layer random checkpoint at real widths
(``dmpq_compile.testing.scale``; the vocabulary cut to 8192, as in ``bench_shapes.py``, so that the
fp32 head does not hide the experts: Qwen3's real 151936-token head alone reads 1.2 GB a token), quantizes one
graph (RTN, group 64) for each expert
composition (``4bit``: every expert 4-bit; ``mixed``: even experts 4-bit, odd 2-bit; ``mixed3``:
experts cycling 2/4/8 bits) and emits it once per ``--dispatches`` from the same codes (float16 scales,
what ort-cpu ships). It then times the artifacts with ``dmpq_compile.runtime`` interleaved round by round
(order alternating, warmed up): decode (median step of ``--decode`` greedy steps after a 128-token
prompt) and prefill of ``--prefill`` tokens (``logits_to_keep=1``). The statistic is the median
over rounds, the same for every dispatch; each is given as a ratio to the first dispatch (gather-if),
with the min..max of the round-by-round ratios. It also reports KL(gather-if || each) of the next-token
distributions over a 256-token random prompt (every position).

Shapes: ``olmoe`` (OLMoE-1B-7B: hidden 2048, 64 experts x 1024, top-8, 16 heads), ``qwen3``
(Qwen3-30B-A3B: hidden 2048, 128 experts x 768, top-8, 32 / 4 heads of 128, q/k norm), ``mixtral``
(Mixtral-8x7B: hidden 4096, 8 experts x 14336, top-2, 32 / 8 heads).

    python benchmarks/bench_dispatch.py                              # olmoe + qwen3, 4bit + mixed, all three
    python benchmarks/bench_dispatch.py --shapes mixtral --compositions 4bit --rounds 5

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_genai import cpu

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    "olmoe": ("olmoe", {"hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
                        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 8192,
                        "max_position_embeddings": 4096}),
    "qwen3": ("qwen3_moe", {"hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144,
                            "num_experts": 128, "num_experts_per_tok": 8, "num_attention_heads": 32,
                            "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 8192, "norm_topk_prob": True,
                            "max_position_embeddings": 40960}),
    "mixtral": ("mixtral", {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
                            "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
                            "vocab_size": 8192, "max_position_embeddings": 4096}),
}
COMPOSITIONS = {"4bit": (4,), "mixed": (4, 2), "mixed48": (4, 8), "mixed3": (2, 4, 8), "8bit": (8,)}
DISPATCHES = ("gather-if", "fused", "kernel")  # the first is the baseline of the ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["olmoe", "qwen3"], choices=sorted(SHAPES))
    p.add_argument("--compositions", nargs="+", default=["4bit", "mixed"], choices=sorted(COMPOSITIONS))
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dispatches", nargs="+", default=list(DISPATCHES), choices=DISPATCHES,
                   help="the first is the baseline of the ratios (default: gather-if fused kernel)")
    p.add_argument("--work", type=Path, help="folder for checkpoints and artifacts (default: a temporary one)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/dispatch-TIME.json)")
    return p.parse_args(argv)


def build(shape: str, composition: str, work: Path, dispatches: list[str]) -> dict[str, Path]:
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend
    from dmpq_compile.passes.infra.base import PassContext
    from dmpq_compile.passes.quantize import QuantizePass

    from dmpq_compile.artifact import write_artifact
    from dmpq_compile.frontend import load
    from dmpq_compile.testing.scale import write_random_checkpoint

    arts = {d: work / f"{shape}-{composition}-{d}" for d in dispatches}
    if all((p / "manifest.json").is_file() for p in arts.values()):
        return arts
    ckpt = work / f"{shape}-checkpoint"
    if not (ckpt / "config.json").is_file():
        family, overrides = SHAPES[shape]
        write_random_checkpoint(family, ckpt, **{**overrides, "num_hidden_layers": 1})
    graph = load(ckpt)
    cycle = COMPOSITIONS[composition]
    for i, node in enumerate(graph.experts()):
        graph.annotate(node.id, "bits", cycle[i % len(cycle)])
    QuantizePass(group_size=64).call(graph, PassContext(progress=False, backend=OrtCpuBackend()))
    for d, path in arts.items():
        write_artifact(graph, OrtCpuBackend(), path, overwrite=True, emit_options={"dispatch": d})
    return arts


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsoft(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoft(p_logits), logsoft(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def bench_pair(arts: dict[str, Path], args: argparse.Namespace) -> dict:
    from dmpq_compile.runtime import load

    names = list(arts)
    base = names[0]
    sessions = {d: load(p, threads=args.threads, verify=False) for d, p in arts.items()}
    vocab = sessions[base].vocab_size
    rng = np.random.default_rng(0)
    probe = rng.integers(2, vocab, (1, 256))
    ref = sessions[base].forward(probe)[0]
    divergence = {d: kl(ref, sessions[d].forward(probe)[0]) for d in names[1:]}
    prompts = {n: rng.integers(2, vocab, (1, n)) for n in args.prefill}
    decode_prompt = rng.integers(2, vocab, (1, 128))

    def prefill(s, ids):
        t0 = time.perf_counter()
        s.forward(ids, logits_to_keep=1)
        return time.perf_counter() - t0

    def decode(s):
        logits, past = s.forward(decode_prompt, logits_to_keep=1)
        steps = []
        for _ in range(args.decode):
            token = np.array([[int(logits[0, -1].argmax())]])
            t0 = time.perf_counter()
            logits, past = s.forward(token, past)
            steps.append(time.perf_counter() - t0)
        return statistics.median(steps)

    for s in sessions.values():  # warm-up
        prefill(s, prompts[args.prefill[0]])
        decode(s)
    times = {d: {"decode": [], **{f"p{n}": [] for n in args.prefill}} for d in names}
    for rnd in range(args.rounds):
        for d in (names if rnd % 2 == 0 else names[::-1]):
            times[d]["decode"].append(decode(sessions[d]))
            for n in args.prefill:
                times[d][f"p{n}"].append(prefill(sessions[d], prompts[n]))
    row = {"baseline": base, f"kl_{base}_to": divergence,
           "bytes": {d: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for d, p in arts.items()}}
    for metric in times[base]:
        med = {d: statistics.median(times[d][metric]) * 1e3 for d in names}
        row[metric] = {"ms": med, "rounds_ms": {d: [t * 1e3 for t in times[d][metric]] for d in names},
                       "over_baseline": {d: med[d] / med[base] for d in names[1:]},
                       "round_ratio_range": {d: [min(r), max(r)] for d in names[1:] for r in
                                             [[a / b for a, b in zip(times[d][metric], times[base][metric])]]}}
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for shape in args.shapes:
            for comp in args.compositions:
                print(f"{shape} {comp}: building", flush=True)
                row = {"shape": shape, "composition": comp,
                       **bench_pair(build(shape, comp, work, args.dispatches), args)}
                rows.append(row)
                base = args.dispatches[0]
                for m in ("decode", *(f"p{n}" for n in args.prefill)):
                    cells = "  ".join(
                        f"{d} {row[m]['ms'][d]:.2f} ms" + ("" if d == base else
                                                           f" ({row[m]['over_baseline'][d]:.2f}x, rounds "
                                                           f"{row[m]['round_ratio_range'][d][0]:.2f}.."
                                                           f"{row[m]['round_ratio_range'][d][1]:.2f})")
                        for d in args.dispatches)
                    print(f"  {m}: {cells}", flush=True)
                print("  KL to " + base + ": " + ", ".join(f"{d} {v:.2e}" for d, v in row[f"kl_{base}_to"].items()),
                      flush=True)
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"commit {commit}, CPU {cpu()}, {args.threads} threads, load {load_start} -> {load_end}")
    out = args.out or RESULTS / f"dispatch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_dispatch.py",
                                                    *(argv if argv is not None else sys.argv[1:])]),
                               "commit": commit, "cpu": cpu(), "threads": args.threads, "load_start": load_start,
                               "statistic": "decode: each round's median step; prefill: one call; median over rounds, "
                                            "the same for every dispatch",
                               "load_end": load_end, "rows": rows}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

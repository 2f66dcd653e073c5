"""Expert dispatch on ort-cpu: fused ``QMoE`` per bit-width group vs per-expert ``gather-if``, one run.

For each shape the script writes a one-decoder-layer random checkpoint at real widths
(``dmpq_compile.testing.scale``; the vocabulary cut to 8192, as in ``bench_shapes.py``, so that the
fp32 head does not hide the experts: Qwen3's real 151936-token head alone reads 1.2 GB a token), quantizes one
graph (RTN, group 64) for each expert
composition (``4bit``: every expert 4-bit; ``mixed``: even experts 4-bit, odd 2-bit; ``mixed3``:
experts cycling 2/4/8 bits) and emits it twice from the same codes, ``--dispatch gather-if`` and
``fused``. It then times both artifacts with ``dmpq_compile.runtime`` interleaved round by round
(order alternating, warmed up): decode (median step of ``--decode`` greedy steps after a 128-token
prompt) and prefill of ``--prefill`` tokens (``logits_to_keep=1``). The statistic is the median
over rounds, the same on both sides; the spread is the min..max of the round values. It also
reports KL(gather-if || fused) of the next-token distributions over a 256-token random prompt
(every position), the figure the fused dispatch must keep <= 1e-5.

Shapes: ``olmoe`` (OLMoE-1B-7B: hidden 2048, 64 experts x 1024, top-8, 16 heads), ``qwen3``
(Qwen3-30B-A3B: hidden 2048, 128 experts x 768, top-8, 32 / 4 heads of 128, q/k norm), ``mixtral``
(Mixtral-8x7B: hidden 4096, 8 experts x 14336, top-2, 32 / 8 heads).

    python benchmarks/bench_dispatch.py                              # olmoe + qwen3, 4bit + mixed
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
DISPATCHES = ("gather-if", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["olmoe", "qwen3"], choices=sorted(SHAPES))
    p.add_argument("--compositions", nargs="+", default=["4bit", "mixed"], choices=sorted(COMPOSITIONS))
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for checkpoints and artifacts (default: a temporary one)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/dispatch-TIME.json)")
    return p.parse_args(argv)


def build(shape: str, composition: str, work: Path) -> dict[str, Path]:
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend
    from dmpq_compile.passes.infra.base import PassContext
    from dmpq_compile.passes.quantize import QuantizePass

    from dmpq_compile.artifact import write_artifact
    from dmpq_compile.frontend import load
    from dmpq_compile.testing.scale import write_random_checkpoint

    arts = {d: work / f"{shape}-{composition}-{d}" for d in DISPATCHES}
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
    QuantizePass(group_size=64).call(graph, PassContext(progress=False))
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

    sessions = {d: load(p, threads=args.threads, verify=False) for d, p in arts.items()}
    vocab = sessions["fused"].vocab_size
    rng = np.random.default_rng(0)
    probe = rng.integers(2, vocab, (1, 256))
    divergence = kl(sessions["gather-if"].forward(probe)[0], sessions["fused"].forward(probe)[0])
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
    times = {d: {"decode": [], **{f"p{n}": [] for n in args.prefill}} for d in DISPATCHES}
    for rnd in range(args.rounds):
        for d in (DISPATCHES if rnd % 2 == 0 else DISPATCHES[::-1]):
            times[d]["decode"].append(decode(sessions[d]))
            for n in args.prefill:
                times[d][f"p{n}"].append(prefill(sessions[d], prompts[n]))
    row = {"kl_gather_if_fused": divergence, "bytes": {d: sum(f.stat().st_size for f in p.iterdir())
                                                        for d, p in arts.items()}}
    for metric in times["fused"]:
        med = {d: statistics.median(times[d][metric]) * 1e3 for d in DISPATCHES}
        ratios = [f / g for f, g in zip(times["fused"][metric], times["gather-if"][metric])]
        row[metric] = {"gather_if_ms": med["gather-if"], "fused_ms": med["fused"],
                       "fused_over_gather_if": med["fused"] / med["gather-if"],
                       "round_ratio_range": [min(ratios), max(ratios)],
                       "rounds_ms": {d: [t * 1e3 for t in times[d][metric]] for d in DISPATCHES}}
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
                row = {"shape": shape, "composition": comp, **bench_pair(build(shape, comp, work), args)}
                rows.append(row)
                cells = "  ".join(f"{m} {row[m]['gather_if_ms']:.2f} -> {row[m]['fused_ms']:.2f} ms "
                                  f"({row[m]['fused_over_gather_if']:.2f}x, rounds {row[m]['round_ratio_range'][0]:.2f}"
                                  f"..{row[m]['round_ratio_range'][1]:.2f})"
                                  for m in ("decode", *(f"p{n}" for n in args.prefill)))
                print(f"  {cells}  KL {row['kl_gather_if_fused']:.2e}", flush=True)
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"commit {commit}, CPU {cpu()}, {args.threads} threads, load {load_start} -> {load_end}")
    out = args.out or RESULTS / f"dispatch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_dispatch.py",
                                                    *(argv if argv is not None else sys.argv[1:])]),
                               "commit": commit, "cpu": cpu(), "threads": args.threads, "load_start": load_start,
                               "statistic": "decode: each round's median step; prefill: one call; median over rounds, "
                                            "the same for both dispatches",
                               "load_end": load_end, "rows": rows}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

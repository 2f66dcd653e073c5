"""GPTQ's cost per expert at real widths: one run per projection vs gate and up stacked, against RTN.

The quantize pass runs GPTQ once over the stacked rows of the roles that read one Hessian (an
expert's gate and up, the attention's q, k and v: ``passes.quantize._shared_hessian_groups``),
since GPTQ treats rows independently given H. This script measures what that saves, with RTN on
the same weights as the floor: for each expert shape ``HxI`` it makes random gate/up ``[I, H]``
and down ``[H, I]`` weights and Hessians from random activations, then times, interleaved in
``--rounds`` rounds,

- ``rtn``: the three weights with round-to-nearest (the default method);
- ``gptq-per-role``: GPTQ on gate, up and down, one run each;
- ``gptq-stacked``: GPTQ on ``[gate; up]`` in one run, then on down (what the pass does).

It checks that both GPTQ variants give the same codes, and prints medians and ratios, each
variant's peak memory above its inputs (the process's ``VmHWM`` reset before each call, Linux),
and the time one GPTQ run spends factorising its Hessian (``inverse_cholesky_upper``), per input
width.

    python benchmarks/bench_gptq.py --shapes 2048x1024 4096x14336 --bits 2 --rounds 3

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

import torch
from dmpq_compile.passes.infra.manager import peak_rss_mb, reset_peak_rss

from dmpq_compile.quant import QuantSpec, quantize
from dmpq_compile.quant.gptq import gptq_quantize, inverse_cholesky_upper
from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("rtn", "gptq-per-role", "gptq-stacked")
PEAK_RESETS = Path("/proc/self/clear_refs").exists()  # else no per-call peak: reported as missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["2048x1024"],
                   help="expert shapes HxI (default OLMoE-1B-7B's; Mixtral-8x7B's is 4096x14336)")
    p.add_argument("--bits", type=int, default=2, help="code bits (default 2)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024, help="calibration rows behind each Hessian (default 1024)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/gptq-TIME.json)")
    return p.parse_args(argv)


def shape(text: str) -> tuple[int, int]:
    try:
        h, i = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not HxI, e.g. 2048x1024") from None
    return h, i


def expert(h: int, i: int, tokens: int) -> dict:
    """Random weights at initialisation scale and Hessians of random (SwiGLU-shaped) inputs."""
    g = torch.Generator().manual_seed(h * 7 + i)
    w = {r: torch.randn(s, generator=g) * s[1] ** -0.5 for r, s in
         (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))}
    x = torch.randn(tokens, h, generator=g)
    mid = torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)
    return {"w": w, "h": x.T @ x / tokens, "h_down": mid.T @ mid / tokens}


def run(variant: str, e: dict, spec: QuantSpec) -> dict[str, torch.Tensor]:
    w, h, hd = e["w"], e["h"], e["h_down"]
    if variant == "rtn":
        return {r: quantize(w[r], QuantSpec(bits=spec.bits, group_size=spec.group_size)).q for r in w}
    if variant == "gptq-per-role":
        return {r: gptq_quantize(w[r], h if r != "down" else hd, spec).q for r in w}
    both = gptq_quantize(torch.cat([w["gate"], w["up"]]), h, spec).q
    return {"gate": both[: len(w["gate"])], "up": both[len(w["gate"]):], "down": gptq_quantize(w["down"], hd, spec).q}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    result = {"command": " ".join(["python", "benchmarks/" + Path(__file__).name, *(argv or sys.argv[1:])]),
              "commit": commit, "start": uptime(), "threads": args.threads, "rows": []}
    print(f"commit {commit}; {result['start']}", flush=True)
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, method="gptq", scale_dtype="float16")
    for text in args.shapes:
        h, i = shape(text)
        e = expert(h, i, args.tokens)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peak: dict[str, float | None] = {v: None for v in VARIANTS}
        codes: dict[str, dict] = {}
        for _ in range(args.rounds):
            for v in VARIANTS:
                codes.pop(v, None)
                reset_peak_rss()
                base = peak_rss_mb()  # right after the reset, the peak is what is resident
                t = time.perf_counter()
                codes[v] = run(v, e, spec)
                times[v].append(time.perf_counter() - t)
                if PEAK_RESETS:
                    peak[v] = max(peak[v] or 0.0, peak_rss_mb() - base)
        same = all(torch.equal(codes["gptq-per-role"][r], codes["gptq-stacked"][r]) for r in e["w"])
        factor = {}
        for name, hm in (("H", e["h"]), ("I", e["h_down"])):
            t = time.perf_counter()
            inverse_cholesky_upper(hm, 0.01)
            factor[f"factorise K={hm.shape[0]} s"] = time.perf_counter() - t
        med = {v: statistics.median(ts) for v, ts in times.items()}
        row = {"shape": text, "bits": args.bits, "median_s": med, "rounds_s": times, "peak_above_inputs_mb": peak,
               "same_codes": same,
               "stacked_over_per_role": med["gptq-stacked"] / med["gptq-per-role"],
               "gptq_stacked_over_rtn": med["gptq-stacked"] / med["rtn"], **factor}
        result["rows"].append(row)
        print(f"{text}: rtn {med['rtn']:.2f} s, gptq per role {med['gptq-per-role']:.2f} s, "
              f"stacked {med['gptq-stacked']:.2f} s (stacked / per role {row['stacked_over_per_role']:.2f}, "
              f"stacked / rtn {row['gptq_stacked_over_rtn']:.1f}); same codes: {same}; peak above inputs "
              + ", ".join(f"{v} {m:.0f} MB" for v, m in peak.items() if m is not None) + "; "
              + ", ".join(f"{k} {v:.2f}" for k, v in factor.items()), flush=True)
        if not same:
            raise SystemExit("stacked GPTQ gave different codes from one run per role: a bug")
    result["end"] = uptime()
    out = args.out or ROOT / "benchmarks" / "results" / f"gptq-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['end']}\nwrote {out}")


if __name__ == "__main__":
    main()

"""Per-layer hot spots of a real-width compile, before and after (issue 28, item 2), side by side.

The sensitivity pass fake-quantizes every expert at every measured bit-width (and the flip probe
at one more, twice), then runs the expert on its routed tokens; the quantize pass quantizes and
packs every expert once. Profiled on two layers of the OLMoE-1B-7B shape (cProfile), the fake
quantization (a ``quantize`` with a whole-tensor NaN scan and validation, a uint8 round trip,
then ``dequantize``) cost more than the routed-token matmuls it prepared, and packing widened
every code to uint64. This script times, on one expert of a given width with random weights,
the code before (reproduced here from the previous implementation: ``dequantize(quantize(w))``
with ``check_weight``, and the uint64 packer) against the code now, in alternating rounds, in
process CPU time (robust to the other load on a shared machine) and wall time, checks that both
give identical values, and prints the ratios plus the per-layer extrapolation::

    python benchmarks/bench_layer_hotspots.py --shape olmoe-1b-7b --rounds 5
    python benchmarks/bench_layer_hotspots.py --shape qwen3-30b-a3b --rounds 5

Per layer, the default pipeline fake-quantizes each expert ``3 x (|bits| + 2)`` times (gate, up,
down at each measured bit-width, plus the flip probe's quantized run and its norm) and runs it
on its routed tokens ``|bits| + 1`` times in ``expert_scores``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from dmpq_compile.ir import ops
from dmpq_compile.quant.formats import WeightFormat
from dmpq_compile.quant.packing import _check_codes, _pack_general, pack_bits
from dmpq_compile.quant.rtn import check_weight, dequantize, fake_quantize_spec, quantize
from dmpq_compile.testing.scale import SHAPES

RESULTS = Path(__file__).parent / "results"


def fake_quantize_before(w, spec):
    """The previous ``fake_quantize_spec``: a full ``quantize`` (with the whole-tensor NaN scan),
    the uint8 round trip and ``dequantize``."""
    check_weight(w)
    return dequantize(quantize(w, spec)).to(w.dtype)


def pack_before(q, bits):
    return _pack_general(_check_codes(np.asarray(q), bits), bits)


def timed(fn, *args):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bits", default="2,4,8", help="measured bit-widths (ort-cpu's)")
    ap.add_argument("--tokens", type=int, default=0, help="routed tokens per expert (default: 2048 x top-k / E)")
    args = ap.parse_args()
    _, cfg = SHAPES[args.shape]
    h = cfg["hidden_size"]
    inter = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    n_exp, top_k = cfg.get("num_experts", cfg.get("num_local_experts")), cfg["num_experts_per_tok"]
    tokens = args.tokens or 16 * 128 * top_k // n_exp  # 16 sensitivity sequences of 128 tokens
    bits = [int(b) for b in args.bits.split(",")]
    gen = torch.Generator().manual_seed(0)
    w = {r: (torch.randn(*s, generator=gen) * s[1] ** -0.5).to(torch.bfloat16).float()
         for r, s in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter)))}
    x = torch.randn(tokens, h, generator=gen)
    specs = {b: WeightFormat(b, scale_dtype="float16").spec(64) for b in bits}
    acc: dict[str, dict[str, float]] = {}

    def add(name, cpu, wall):
        row = acc.setdefault(name, {"cpu": 0.0, "wall": 0.0})
        row["cpu"] += cpu
        row["wall"] += wall

    torch.set_grad_enabled(False)
    for r in range(args.rounds):
        for first in (("before", "after") if r % 2 == 0 else ("after", "before")):
            for b in bits:
                fq = fake_quantize_before if first == "before" else fake_quantize_spec
                outs = {}
                for role, t in w.items():
                    outs[role], c, t_ = timed(fq, t, specs[b])
                    add(f"fake_quantize {first}", c, t_)
                if first == "after":  # identical values (the claim), checked every round
                    ref = {role: fake_quantize_before(t, specs[b]) for role, t in w.items()}
                    assert all(torch.equal(outs[k], ref[k]) for k in ref), "fake quantization changed values"
                q = quantize(w["gate"], specs[b]).q
                pk = pack_before if first == "before" else pack_bits
                packed, c, t_ = timed(pk, q, b)
                add(f"pack {first}", c, t_)
                if first == "after":
                    assert np.array_equal(packed, pack_before(q, b)), "packing changed bytes"
        _, c, t_ = timed(ops.swiglu, x, w["gate"], w["up"], w["down"])
        add("swiglu on routed tokens", c, t_)
    per = {k: {m: v[m] / args.rounds for m in v} for k, v in acc.items()}  # per round
    fq_calls = 3 * (len(bits) + 2)  # per expert per layer
    n_fq_round = 3 * len(bits)
    layer = {}
    for side in ("before", "after"):
        fq_one = per[f"fake_quantize {side}"]["cpu"] / n_fq_round
        layer[side] = n_exp * (fq_calls * fq_one + (len(bits) + 1) * per["swiglu on routed tokens"]["cpu"])
    out = {"shape": args.shape, "expert": [inter, h], "tokens": tokens, "bits": bits, "rounds": args.rounds,
           "per_round_s": per,
           "ratio_cpu": {k: per[f"{k} after"]["cpu"] / per[f"{k} before"]["cpu"] for k in ("fake_quantize", "pack")},
           "expert_scores_layer_cpu_s": layer, "loadavg": os.getloadavg(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip(),
           "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), "?"), "threads": torch.get_num_threads()}
    for k, v in per.items():
        print(f"{k:28s} cpu {v['cpu'] * 1000:8.1f} ms  wall {v['wall'] * 1000:8.1f} ms  (per round)")
    print("after/before CPU time:", {k: round(v, 3) for k, v in out["ratio_cpu"].items()})
    print(f"fake quantization + routed-token expert runs of one layer ({n_exp} experts, {fq_calls} fake "
          f"quantizations and {len(bits) + 1} runs each): before {layer['before']:.1f} s CPU, after "
          f"{layer['after']:.1f} s CPU")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"layer-hotspots-{args.shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({**out, "command": "python benchmarks/bench_layer_hotspots.py " +
                                " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()

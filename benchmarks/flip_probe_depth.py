"""The flip probe's cost against depth: every layer probed (sequences reused) vs at most one per sequence.

``passes.sensitivity.local.probe_groups`` gives a model deeper than its calibration set has sequences
one probe per sequence on evenly spaced layers, the rest interpolated in depth (``fill_rates``). Before,
every layer was probed with the sequences reused round-robin, and each probe's rows ran through every
later layer: about ``L^2 / n_seq`` sequence-layers. This script builds a deep random checkpoint (narrow,
so it runs in minutes; the cost is in forwards, so the ratio carries over to real widths), runs the
sensitivity pass both ways on the same 16 calibration sequences, and prints the flip probe's time, the
pass's time and the rates of both.

    python benchmarks/flip_probe_depth.py --layers 48 --out benchmarks/results/flip-probe-depth.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from dmpq_compile.passes import PassContext, PassManager, make_pass
from dmpq_compile.passes.sensitivity import local

from dmpq_compile.compiler import calibration_ids
from dmpq_compile.frontend import load
from dmpq_compile.sysinfo import cpu_flags, cpu_model
from dmpq_compile.testing import make_tiny_checkpoint


def every_layer(n_seq: int, layers: list[int]) -> dict[int, list[int]]:
    """The grouping before: disjoint groups when there are enough sequences, else every layer, round-robin."""
    if n_seq >= len(layers):
        return local.probe_groups(n_seq, layers)
    return {layer: [i % n_seq] for i, layer in enumerate(layers)}


def run(ckpt: Path, ids: torch.Tensor, groups) -> dict:
    """Profile and sensitivity passes with ``groups`` as the probe's grouping: the flip probe's time and rates."""
    timed: dict = {}
    flip = local.flip_rates

    def flip_rates(*a, **k):
        t0 = time.perf_counter()
        timed["rates"] = flip(*a, **k)
        timed["flip_s"] = time.perf_counter() - t0
        return timed["rates"]

    saved = local.flip_rates, local.probe_groups
    local.flip_rates, local.probe_groups = flip_rates, groups
    try:
        t0 = time.perf_counter()
        PassManager([make_pass("profile"), make_pass("sensitivity", gradvar=False, compute_dtype="float32")]
                    ).run(load(ckpt), PassContext(calibration=ids, progress=False))
        total = time.perf_counter() - t0
    finally:
        local.flip_rates, local.probe_groups = saved
    return {"flip_s": timed["flip_s"], "profile_and_sensitivity_s": total,
            "measured_rates": {str(k): v for k, v in sorted(timed["rates"].items())}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/flip-probe-depth.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="flip-depth-") as tmp:
        ckpt = make_tiny_checkpoint("qwen3_moe", Path(tmp) / "deep", num_hidden_layers=a.layers, hidden_size=256,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                                    num_experts_per_tok=4, moe_intermediate_size=128)
        ids = calibration_ids(ckpt, "pydoc", a.sequences, a.seq_len)
        rows = {}
        for name, groups in (("every layer (before)", every_layer), ("one per sequence (now)", local.probe_groups)):
            rows[name] = run(ckpt, ids, groups)
            g = groups(len(ids), list(range(a.layers - 1)))
            measured = {int(k): v for k, v in rows[name]["measured_rates"].items()}
            rows[name]["rates"] = {str(k): v for k, v in local.fill_rates(measured, list(range(a.layers))).items()}
            rows[name] |= {"probed_layers": len(g),
                           "seq_layers": sum(2 * len(v) * (a.layers - 1 - k) for k, v in g.items())}
            print(name, {k: v for k, v in rows[name].items() if not k.endswith("rates")}, flush=True)
    before, now = rows["every layer (before)"], rows["one per sequence (now)"]
    result = {"command": " ".join(["python", "benchmarks/flip_probe_depth.py", *sys.argv[1:]]),
              "cpu": cpu_model(), "cpu_flags": cpu_flags(), "load_start": load_start, "load_end": os.getloadavg(),
              "layers": a.layers, "sequences": a.sequences, "rows": rows,
              "flip_ratio": now["flip_s"] / before["flip_s"],
              "rate_sum": {name: sum(r["rates"].values()) for name, r in rows.items()}}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"flip probe: {before['flip_s']:.1f} s -> {now['flip_s']:.1f} s ({result['flip_ratio']:.2f}x); "
          f"profile + sensitivity {before['profile_and_sensitivity_s']:.1f} -> {now['profile_and_sensitivity_s']:.1f} s; "
          f"sum of the rates over depth {result['rate_sum']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

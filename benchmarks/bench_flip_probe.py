"""Does the sensitivity pass's routing-flip term pay? Allocations with and without it, and a control.

The layer-local Fisher estimate sees the model with every router frozen; the flip probe adds, per
node and bit-width, ``c_l x`` the node's mean output-change norm, ``c_l`` measured per MoE layer
(``passes.sensitivity.local.flip_rates``). For each model and budget this compiles

* ``probe``: the default (sensitivity with the flip term);
* ``no-probe``: ``--no-flip-probe``, the layer-local estimate alone (what compiles did before);
* ``flat``: the control for "any norm-proportional term would do": the same term with every
  probed layer's rate replaced by their mean (the last MoE layer keeps 0), so only the per-layer
  measurement differs from ``probe``;
* ``interp``: what a model deeper than its calibration set has sequences gets
  (``local.probe_groups``): every other probed layer measured (the first one included), the rates
  between interpolated in depth (``local.fill_rates``); on the 4-layer samples, layer 1's rate is
  the mean of layers 0's and 2's;

with ``--nonexpert-bits auto`` under ``--budget-bits`` (stored bits per weight of the weight
tensors) and the optimal allocator, GPTQ rounding off (RTN), and scores every artifact with
``dmpq-compile eval --reference`` (KL to the fp32 checkpoint on the pydoc test split).

Part ``estimate`` (``--parts estimate``): per layer and bit-width, all of a layer's experts
quantized together: the summed per-expert estimates with and without the flip term against the
measured whole-model KL. The probe's cost against depth: ``flip_probe_depth.py``.

    python benchmarks/bench_flip_probe.py --models samples/mixtral-tiny samples/olmoe-tiny \\
        --budget-bits 3.0 3.5 4.0 4.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nonexpert_alloc import score
from dmpq_compile.passes.sensitivity import local as sensitivity_local

from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.eval.protocol import format_quality

VARIANTS = ("probe", "no-probe", "flat", "interp")


def flat_rates(probe):
    """``flip_rates`` with every probed layer's rate replaced by the mean of them (the control)."""
    def rates(*args, **kwargs):
        measured = probe(*args, **kwargs)
        last = max(measured)
        mean = sum(v for k, v in measured.items() if k != last) / max(1, len(measured) - 1)
        return {k: (0.0 if k == last else mean) for k in measured}
    return rates


def every_other_layer(groups):
    """``probe_groups`` keeping every other probed layer, the first one included (the ``interp`` variant)."""
    def pick(n_seq, layers):
        full = groups(n_seq, layers)
        return {k: v for i, (k, v) in enumerate(full.items()) if i % 2 == 0}
    return pick


def compile_row(model: str, budget: float, variant: str, folder: Path, eval_tokens: int, cache_dirs: dict) -> dict:
    cfg = CompileConfig.from_dict({
        "target": "ort-cpu", "allocate": {"budget_kind": "stored-bits", "budget": budget, "nonexpert_allocate": True},
        "sensitivity": {"flip_probe": variant != "no-probe"}})
    art = folder / f"{Path(model).name}-{budget}-{variant}"
    probe, groups = sensitivity_local.flip_rates, sensitivity_local.probe_groups
    if variant == "flat":
        sensitivity_local.flip_rates = flat_rates(probe)
    if variant == "interp":
        sensitivity_local.probe_groups = every_other_layer(groups)
    os.environ["DMPQ_CACHE_DIR"] = str(cache_dirs[variant])  # the control's cached results are its own
    t0 = time.perf_counter()
    try:
        compile_model(model, art, cfg, progress=False, cache=True)
    finally:
        sensitivity_local.flip_rates, sensitivity_local.probe_groups = probe, groups
    report = json.loads((art / "report.json").read_text())
    sens = next(p for p in report["passes"] if p["name"] == "sensitivity")
    manifest = json.loads((art / "manifest.json").read_text())
    row = {"model": model, "budget_bits": budget, "variant": variant, "compile_s": time.perf_counter() - t0,
           "weights_bpw": report["storage"]["weights"]["bits_per_weight"],
           "experts_by_bits": manifest["quantization"]["bits_histogram"],
           "nonexpert_bits": {k: v["bits"] for k, v in manifest.get("nonexpert", {}).items()},
           "flip_rates": sens.get("stats", {}).get("flip_rates")}
    row.update(score(model, art, eval_tokens))  # every set: ppl, kl (first set), *_pystdlib, quality
    print(json.dumps(row), flush=True)
    return row


def estimate_rows(model: str, sequences: int, seq_len: int) -> list[dict]:
    """Per MoE layer and bits: every expert of the layer quantized; summed estimates vs measured KL."""
    from dmpq_compile.backends import get_backend
    from dmpq_compile.passes import PassContext, PassManager, make_pass

    from dmpq_compile.compiler import calibration_ids
    from dmpq_compile.eval.metrics import next_token_logprobs, token_kl
    from dmpq_compile.frontend import load
    from dmpq_compile.ir import Interpreter, RunOptions

    backend = get_backend("ort-cpu")
    ids = calibration_ids(model, "pydoc", sequences, seq_len)
    graph = PassManager([make_pass("profile"), make_pass("sensitivity", gradvar=False, max_sequences=sequences)]
                        ).run(load(model), PassContext(calibration=ids, progress=False, backend=backend))
    # scored on other sequences than the probe and the estimates saw: the split's next ones
    test = calibration_ids(model, "pydoc", 2 * sequences, seq_len)[sequences:]
    interp = Interpreter(graph, quantize=False, formats=backend.weight_formats)
    rows = []
    with torch.no_grad():
        ref = next_token_logprobs(interp.run(test, RunOptions(quantize=False))["lm_head"])
        for layer in sorted({n.attrs["layer"] for n in graph.experts()}):
            experts = [n for n in graph.experts() if n.attrs["layer"] == layer]
            for b in sorted(b for b in experts[0].ann["kl"] if b != 16):
                over = {n.id: b for n in experts}
                measured = float(token_kl(ref, next_token_logprobs(
                    interp.run(test, RunOptions(quantize=False, bits_override=over))["lm_head"])).mean())
                flip = sum(n.ann.get("flip_kl", {}).get(b, 0.0) for n in experts)
                total = sum(n.ann["kl"][b] for n in experts)
                row = {"model": model, "layer": layer, "bits": b, "measured": measured, "estimate": total,
                       "estimate_without_flips": total - flip,
                       "ratio": measured / total if total else None,
                       "ratio_without_flips": measured / (total - flip) if total > flip else None}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    p.add_argument("--budget-bits", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--parts", nargs="+", choices=("compare", "estimate"), default=["compare", "estimate"])
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--estimate-sequences", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/flip-probe.json")
    a = p.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
    result: dict = {"command": " ".join(["python", "benchmarks/bench_flip_probe.py", *sys.argv[1:]]),
                    "load_start": os.getloadavg(), "compare": [], "estimate": []}
    with tempfile.TemporaryDirectory(prefix="flip-probe-") as tmp:
        caches = {v: Path(tmp) / f"cache-{v}" for v in VARIANTS}
        for model in a.models:
            if "compare" in a.parts and a.models:
                for budget in a.budget_bits:
                    rows = [compile_row(model, budget, v, Path(tmp), a.eval_tokens, caches) for v in a.variants]
                    best = min(r["kl"] for r in rows)
                    for r in rows:
                        r["kl_over_best"] = r["kl"] / best
                    result["compare"] += rows
            if "estimate" in a.parts:
                result["estimate"] += estimate_rows(model, a.estimate_sequences, 128)
    result["load_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"load average {os.getloadavg()}; wrote {a.out}")
    print("\n| model | budget | variant | weights bpw | KL | / best | every set [95%] |\n|---|---:|---|---:|---:|---:|---|")
    for r in result["compare"]:
        print(f"| {Path(r['model']).name} | {r['budget_bits']} | {r['variant']} | {r['weights_bpw']:.2f} | "
              f"{r['kl']:.5f} | {r['kl_over_best']:.2f} | {format_quality(r['quality'])} |")
    if result["estimate"]:
        print("\n| model | layer | bits | measured KL | estimate (ratio) | without flips (ratio) |\n|---|---:|---:|---:|---|---|")
        for r in result["estimate"]:
            fmt = lambda v: f"{v:.2f}x" if v is not None else "-"
            print(f"| {Path(r['model']).name} | {r['layer']} | {r['bits']} | {r['measured']:.2e} | "
                  f"{r['estimate']:.2e} ({fmt(r['ratio'])}) | {r['estimate_without_flips']:.2e} "
                  f"({fmt(r['ratio_without_flips'])}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

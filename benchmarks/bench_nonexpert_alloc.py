"""Allocated vs fixed non-expert bits at equal whole-model stored bits.

Part ``compare``: for each model and ``--budget-bits`` (stored bits per weight of the weight
tensors), compile

* ``auto``: ``--nonexpert-bits auto``, the optimal allocator placing attention, lm_head and the
  embedding with the experts by their measured sensitivity;
* ``auto-uniform``: the control without the measured part: the same items, one bit-width for all
  (``--allocator uniform``);
* each fixed policy of ``--policies`` (the experts still allocated by ``optimal`` in what the
  policy leaves),

and score every artifact with ``dmpq-compile eval --reference`` (KL to the fp32 checkpoint and
perplexity on the pydoc test split). Each row prints its KL over the best KL at that budget.

Part ``estimate``: per non-expert node and bit-width, the sensitivity pass's figure against the
whole model's KL with only that node quantized, and the same with every router's decisions frozen
at the full-precision ones (``RunOptions.resume`` of the router nodes): the layer-local Fisher
estimate sees no routing flips, so it should match the frozen-routing KL, not the real one.

    python benchmarks/bench_nonexpert_alloc.py --models samples/mixtral-tiny samples/olmoe-tiny \\
        --budget-bits 4.5 5.0 5.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.eval.protocol import flatten_eval, format_quality

POLICIES = ("4", "8", "4,lm_head=8", "4,attention=8,lm_head=8")


def score(model: str, art: Path, eval_tokens: int) -> dict:
    out = art.with_suffix(".eval.json")
    subprocess.run([sys.executable, "-m", "dmpq_compile.cli", "eval", str(art), "--reference", model,
                    "--windows", str(max(1, eval_tokens // 256)), "--json", str(out), "--no-progress"], check=True)
    return flatten_eval(json.loads(out.read_text()))


def compare_row(model: str, budget: float, variant: str, folder: Path, eval_tokens: int) -> dict:
    from dmpq_compile.passes.precision import parse_policy

    auto = variant.startswith("auto")
    fields = {"nonexpert_allocate": True, "allocator": "uniform" if variant == "auto-uniform" else "optimal"} \
        if auto else dict(zip(("nonexpert_bits", "nonexpert_kinds"), parse_policy(variant)))
    cfg = CompileConfig.from_dict({"target": "ort-cpu",
                                   "allocate": {"budget_kind": "stored-bits", "budget": budget, **fields}})
    art = folder / f"{Path(model).name}-{budget}-{variant.replace(',', '+').replace('=', '')}"
    row = {"model": model, "budget_bits": budget, "variant": variant}
    try:
        compile_model(model, art, cfg, progress=False, cache=True)
    except ValueError as e:  # a fixed policy whose float or 8-bit part alone exceeds the budget
        print(json.dumps({**row, "skipped": str(e)[:160]}), flush=True)
        return {**row, "skipped": str(e)}
    report = json.loads((art / "report.json").read_text())
    storage = report["storage"]
    alloc = next(p for p in report["passes"] if p["name"] == "allocate")["stats"]
    manifest = json.loads((art / "manifest.json").read_text())
    row.update({"weights_bpw": storage["weights"]["bits_per_weight"], "file_bpw": storage["bits_per_weight"],
                "experts_by_bits": manifest["quantization"]["bits_histogram"],
                "nonexpert_bits": {k: v["bits"] for k, v in manifest.get("nonexpert", {}).items()},
                "allocated": alloc.get("nonexpert")})
    row.update(score(model, art, eval_tokens))  # every set: ppl, kl (first set), *_pystdlib, quality
    print(json.dumps(row), flush=True)
    return row


def estimate_rows(model: str, sequences: int, seq_len: int, label_samples: int) -> list[dict]:
    from dmpq_compile.backends import get_backend
    from dmpq_compile.passes import PassContext, PassManager, make_pass

    from dmpq_compile.compiler import calibration_ids
    from dmpq_compile.eval.metrics import next_token_logprobs, token_kl
    from dmpq_compile.frontend import load
    from dmpq_compile.ir import Interpreter, RunOptions
    from dmpq_compile.ir.graph import NONEXPERT_QUANTIZABLE_KINDS

    backend = get_backend("ort-cpu")
    ids = calibration_ids(model, "pydoc", sequences, seq_len)
    graph = PassManager([make_pass("profile"), make_pass("sensitivity", nonexpert=NONEXPERT_QUANTIZABLE_KINDS,
                                                         label_samples=label_samples, gradvar=False,
                                                         max_sequences=sequences)]
                        ).run(load(model), PassContext(calibration=ids, progress=False, backend=backend))
    interp = Interpreter(graph, quantize=False, formats=backend.weight_formats)
    routes: dict = {}

    def keep(node_id, kind, value):
        if kind == "router":
            routes[node_id] = value

    rows = []
    with torch.no_grad():
        ref = next_token_logprobs(interp.run(ids, RunOptions(quantize=False, observer=keep))["lm_head"])

        def kl(over: dict, frozen: bool) -> float:
            opts = RunOptions(quantize=False, bits_override=over, resume=dict(routes) if frozen else {})
            return float(token_kl(ref, next_token_logprobs(interp.run(ids, opts)["lm_head"])).mean())

        for node in graph.nodes():
            if "kl" not in node.ann or node.kind == "expert" and node.attrs["expert"] > 1:
                continue  # every non-expert node, and two experts a layer for comparison
            for b, est in sorted(node.ann["kl"].items()):
                if b == 16:
                    continue
                row = {"model": model, "node": node.id, "kind": node.kind, "bits": b, "sensitivity": est,
                       "measured": kl({node.id: b}, False), "frozen_routing": kl({node.id: b}, True)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    p.add_argument("--budget-bits", type=float, nargs="+", default=[4.5, 5.0, 5.5])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), help="fixed --nonexpert-bits policies")
    p.add_argument("--parts", nargs="+", choices=("compare", "estimate"), default=["compare", "estimate"])
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--estimate-sequences", type=int, default=16, help="calibration sequences of the estimate part")
    p.add_argument("--label-samples", type=int, default=4, help="sampled-label backward passes (estimate part)")
    p.add_argument("--out", default="benchmarks/results/nonexpert-alloc.json")
    a = p.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
    result: dict = {"load_start": os.getloadavg(), "compare": [], "estimate": []}
    with tempfile.TemporaryDirectory(prefix="nonexpert-alloc-") as tmp:
        for model in a.models:
            if "compare" in a.parts:
                for budget in a.budget_bits:
                    rows = [compare_row(model, budget, v, Path(tmp), a.eval_tokens)
                            for v in ("auto", "auto-uniform", *a.policies)]
                    best = min(r["kl"] for r in rows if "kl" in r)
                    for r in rows:
                        if "kl" in r:
                            r["kl_over_best"] = r["kl"] / best
                    result["compare"] += rows
            if "estimate" in a.parts:
                result["estimate"] += estimate_rows(model, a.estimate_sequences, 128, a.label_samples)
    result["load_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"load average {os.getloadavg()}; wrote {a.out}")
    print("\n| model | budget | variant | weights bpw | KL | / best | non-expert bits | every set [95%] |\n"
          "|---|---:|---|---:|---:|---:|---|---|")
    for r in result["compare"]:
        if "kl" in r:
            ne = ",".join(f"{k}={v}" for k, v in r["nonexpert_bits"].items())
            print(f"| {Path(r['model']).name} | {r['budget_bits']} | {r['variant']} | {r['weights_bpw']:.2f} | "
                  f"{r['kl']:.5f} | {r['kl_over_best']:.2f} | {ne} | {format_quality(r['quality'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a compile without budget flags makes: whole-model stored bits per weight and the KL it costs.

For each model and target, compile

* ``default``: no budget flags (the target's default ``--budget-bits`` with ``--nonexpert-bits auto``);
* ``previous``: the default before it, ``--budget-code-bits 4`` with float non-experts;
* ``all-4``: the control without allocation at about the same size, every quantizable weight at
  4 bits (``--allocator uniform --budget-code-bits 4 --nonexpert-bits 4``);
* ``auto-B`` for each ``--budget-bits`` B given: that budget with ``--nonexpert-bits auto``;

and report each artifact's stored bits per weight (the whole file, and the weight tensors alone,
what ``--budget-bits`` counts) and its KL to the float checkpoint on the pydoc test split: through
the reference interpreter running the compiled graph's stored codes (every target), and for ort-cpu
also ``dmpq-compile eval --reference`` on the artifact itself.

    python benchmarks/default_budget.py --models samples/mixtral-tiny samples/olmoe-tiny \\
        --targets ort-cpu trt-a100 --budget-bits 4.0 4.8 --json benchmarks/results/default-budget.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from dmpq_compile.passes.infra.cache import PassCache

from dmpq_compile.compiler import CompileConfig, calibration_ids, emit, resolve_defaults, run_pipeline
from dmpq_compile.eval.metrics import next_token_logprobs, token_kl
from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter, RunOptions
from dmpq_compile.sysinfo import cpu_model, git_commit, load_average


def variants(target: str, budgets: list[float]) -> dict[str, CompileConfig]:
    def config(**allocate) -> CompileConfig:
        return CompileConfig.from_dict({"target": target, "allocate": allocate})

    out = {"default": config(),
           "previous": config(budget_kind="bits", budget=4.0, nonexpert_allocate=False),
           "all-4": config(allocator="uniform", budget_kind="bits", budget=4.0, nonexpert_bits=4, nonexpert_allocate=False)}
    for b in budgets:
        out[f"auto-{b:g}"] = config(budget_kind="stored-bits", budget=b, nonexpert_allocate=True)
    return out


def interpreter_kl(graph, fp_graph, ids: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token KL(float || compiled) over every position of ``ids`` [N, T]."""
    q, p = Interpreter(graph, quantize=True), Interpreter(fp_graph, quantize=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x = ids[i:i + batch]
            kl = token_kl(next_token_logprobs(p.run(x, RunOptions(quantize=False))["lm_head"]),
                          next_token_logprobs(q(x)))
            total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


def artifact_eval(model: str, art: Path, windows: int) -> dict:
    """KL and perplexity of the artifact on the protocol's pydoc test set (docs/evaluation.md), each
    ``{"value", "lo", "hi"}`` (95 % bootstrap over documents), and the scored tokens."""
    out = art.with_suffix(".eval.json")
    subprocess.run([sys.executable, "-m", "dmpq_compile.cli", "eval", str(art), "--reference", model,
                    "--corpus", "pydoc", "--windows", str(windows), "--json", str(out), "--no-progress"], check=True)
    pydoc = next(s for s in json.loads(out.read_text())["sets"] if s["set"] == "pydoc/test")
    return {"kl": pydoc["kl"]["value"], "kl_interval": [pydoc["kl"]["lo"], pydoc["kl"]["hi"]],
            "ppl": pydoc["ppl"]["value"], "tokens": pydoc["scored_tokens"]}


def row(model: str, target: str, name: str, cfg: CompileConfig, folder: Path, ids: torch.Tensor,
        eval_windows: int) -> dict:
    graph = load(model)
    graph.meta["group_size"] = cfg.quantize.group_size
    cfg = resolve_defaults(cfg, graph)
    work = Path(tempfile.mkdtemp(dir=folder))
    art = folder / f"{Path(model).name}-{target}-{name}"
    t0 = time.perf_counter()
    try:
        graph, records = run_pipeline(graph, model, cfg, progress=False, work_dir=work, cache=PassCache())
        emit(graph, cfg, art, records, time.perf_counter() - t0, overwrite=True)
        kl = interpreter_kl(graph, load(model), ids)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = json.loads((art / "report.json").read_text())
    s = report["storage"]
    bits = [r["bits"] for r in report["experts"]]
    out = {"model": model, "target": target, "variant": name, "budget_kind": cfg.allocate.budget_kind,
           "budget": cfg.allocate.budget, "nonexpert_allocate": cfg.allocate.nonexpert_allocate,
           "stored_bpw": s["bits_per_weight"],
           "weights_bpw": s["weights"]["bits_per_weight"],
           "experts_by_bits": {b: bits.count(b) for b in sorted(set(bits))},
           "nonexpert_bits": {r["id"]: r["bits"] for r in report["nonexpert"]},
           "interpreter_kl": kl, "interpreter_tokens": int(ids.numel())}
    if target == "ort-cpu":
        ev = artifact_eval(model, art, eval_windows)
        out.update(artifact_kl=ev["kl"], artifact_kl_interval=ev["kl_interval"], artifact_ppl=ev["ppl"],
                   artifact_tokens=ev["tokens"])
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    p.add_argument("--targets", nargs="+", default=["ort-cpu", "trt-a100"])
    p.add_argument("--budget-bits", type=float, nargs="*", default=[4.0, 4.8])
    p.add_argument("--sequences", type=int, default=32, help="test-split sequences of 256 tokens for the KL")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="evaluation windows `dmpq-compile eval` scores on pydoc/test (ort-cpu)")
    p.add_argument("--variants", nargs="*", help="run only these variants (default: all)")
    p.add_argument("--json")
    a = p.parse_args()
    meta = {"command": " ".join(sys.argv), "commit": git_commit(), "cpu": cpu_model(), "load_start": load_average()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            ids = calibration_ids(model, "pydoc", a.sequences, 256, split="test")
            for target in a.targets:
                budgets = [b for b in a.budget_bits if target == "ort-cpu"]  # trt-a100: infeasible on the samples
                for name, cfg in variants(target, budgets).items():
                    if a.variants and name not in a.variants:
                        continue
                    rows.append(row(model, target, name, dataclasses.replace(cfg), Path(tmp), ids, a.eval_windows))
    meta["load_end"] = load_average()
    print("\n| model | target | variant | budget | stored bpw (file) | weights bpw | KL (interpreter) | KL (artifact eval) |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        art = f"{r['artifact_kl']:.4f}" if r.get("artifact_kl") is not None else "-"
        print(f"| {Path(r['model']).name} | {r['target']} | {r['variant']} | {r['budget']:g} {r['budget_kind']} | "
              f"{r['stored_bpw']:.2f} | {r['weights_bpw']:.2f} | {r['interpreter_kl']:.4f} | {art} |")
    if a.json:
        Path(a.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

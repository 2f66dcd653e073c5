"""Stored bits per weight and quality of artifacts at several ``--nonexpert-bits``.

For each model and non-expert bit-width: compile at one budget of expert code bits (this script's
``--budget-bits``, the compile's ``--budget-code-bits``), read the artifact's storage summary,
and, for ort-cpu, score it with ``dmpq-compile eval`` (perplexity on the pydoc test split and KL
to the fp32 checkpoint). trt-a100 artifacts are compiled for their
stored bytes only (running them needs TensorRT on a GPU), at ``--trt-budget-bits`` (its smallest
expert bit-width is 4).

    python benchmarks/bench_nonexpert.py --models samples/mixtral-tiny samples/olmoe-tiny \\
        --nonexpert-bits 16 8 4 --budget-bits 3.5 --trt-budget-bits 4.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.eval.protocol import flatten_eval


def run(model: str, target: str, bits: int, budget: float, folder: Path, eval_tokens: int) -> dict:
    art = folder / f"{Path(model).name}-{target}-ne{bits}"
    cfg = CompileConfig.from_dict({"target": target, "allocate": {"budget": budget, "nonexpert_bits": bits}})
    t0 = time.perf_counter()
    compile_model(model, art, cfg, progress=False, cache=True)
    storage = json.loads((art / "report.json").read_text())["storage"]
    row = {"model": model, "target": target, "budget_bits": budget, "nonexpert_bits": bits,
           "compile_s": round(time.perf_counter() - t0, 1), "bytes": storage["bytes"],
           "bits_per_weight": storage["bits_per_weight"], "experts_bpw": storage["experts"]["bits_per_weight"],
           "other_bpw": storage["other"]["bits_per_weight"],
           "nonexpert_bpw": (storage.get("nonexpert") or {}).get("bits_per_weight")}
    if target == "ort-cpu":
        out = folder / f"{art.name}.eval.json"
        subprocess.run([sys.executable, "-m", "dmpq_compile.cli", "eval", str(art), "--reference", model,
                        "--windows", str(max(1, eval_tokens // 256)), "--json", str(out), "--no-progress"], check=True)
        row.update(flatten_eval(json.loads(out.read_text())))
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    p.add_argument("--targets", nargs="+", default=["ort-cpu", "trt-a100"])
    p.add_argument("--nonexpert-bits", type=int, nargs="+", default=[16, 8, 4])
    p.add_argument("--budget-bits", type=float, default=3.5)
    p.add_argument("--trt-budget-bits", type=float, default=4.5, help="expert budget on trt-a100 (>= 4)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default="benchmarks/results/nonexpert-bits.json")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nonexpert-") as tmp:
        for model in a.models:
            for target in a.targets:
                for bits in a.nonexpert_bits:
                    budget = a.trt_budget_bits if target == "trt-a100" else a.budget_bits
                    rows.append(run(model, target, bits, budget, Path(tmp), a.eval_tokens))
    meta = {"command": " ".join(["python", *sys.argv]), "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

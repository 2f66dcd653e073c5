"""Does calibrating in bf16 change what the compile makes? The control for ``--calib-dtype auto``.

``auto`` runs the profile and sensitivity passes' products in bf16 where the experts are stored in
bf16 (the real checkpoints) and bf16 products, timed at the experts' widths, run at least 1.3x
fp32's speed (2.3x on an AVX-512 BF16 EPYC; 0.6x on an Intel Xeon without AMX, which keeps fp32).
The samples are stored in fp32, so ``auto`` keeps fp32 on them; here each trained sample is compiled
twice with the default pipeline and budget, ``--calib-dtype float32``
and ``--calib-dtype bfloat16``, and both artifacts are scored on the protocol's **dev** split
(``dmpq-compile eval --reference SAMPLE``: KL to the float checkpoint and perplexity, 95 % bootstrap
intervals over documents), with the experts whose bit-width differs between the two counted.

    python benchmarks/calib_dtype.py --models samples/mixtral-tiny samples/olmoe-tiny SAMPLE_DIR ...

Writes ``benchmarks/results/calib-dtype-<time>.json`` with the commands, the load average and the commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmpq_compile.sysinfo import cpu_flags, cpu_model, git_commit, load_average

RESULTS = Path(__file__).parent / "results"
DTYPES = ("float32", "bfloat16")


def run(cmd: list[str]) -> None:
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="calib-dtype-") as tmp:
        for model in args.models:
            row = {"model": model}
            bits = {}
            for dtype in DTYPES:
                art = Path(tmp) / f"{Path(model).name}-{dtype}"
                compile_cmd = ["dmpq-compile", "compile", model, "--target", "ort-cpu", "--calib-dtype", dtype,
                               "-o", str(art), "--no-cache", "--no-progress"]
                t0 = time.perf_counter()
                run(compile_cmd)
                seconds = time.perf_counter() - t0
                out = art.with_suffix(".eval.json")
                run(["dmpq-compile", "eval", str(art), "--reference", model, "--split", args.split,
                     "--no-progress", "--json", str(out)])
                manifest = json.loads((art / "manifest.json").read_text())
                bits[dtype] = {k: v["bits"] for k, v in manifest["experts"].items()}
                sets = json.loads(out.read_text())["sets"]
                row[dtype] = {"compile": " ".join(compile_cmd), "compile_s": round(seconds, 1),
                              "sets": {s["set"]: {k: s[k] for k in ("kl", "ppl", "ppl_ratio") if k in s} for s in sets}}
            row["experts_with_other_bits"] = sum(bits["float32"][k] != bits["bfloat16"][k] for k in bits["float32"])
            row["experts"] = len(bits["float32"])
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"calib-dtype-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": git_commit(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
                                "load": load_average(), "split": args.split, "argv": sys.argv, "rows": rows}, indent=1))
    for r in rows:
        for s in r["float32"]["sets"]:
            a, b = r["float32"]["sets"][s].get("kl", {}), r["bfloat16"]["sets"][s].get("kl", {})
            print(f"{r['model']} {s}: KL fp32-calibrated {a.get('value', float('nan')):.4g} "
                  f"[{a.get('lo', float('nan')):.4g}, {a.get('hi', float('nan')):.4g}], bf16-calibrated "
                  f"{b.get('value', float('nan')):.4g} [{b.get('lo', float('nan')):.4g}, {b.get('hi', float('nan')):.4g}]; "
                  f"{r['experts_with_other_bits']}/{r['experts']} experts at other bits")
    print(f"results: {path}")


if __name__ == "__main__":
    main()

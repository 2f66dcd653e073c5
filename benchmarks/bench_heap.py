"""The compile in two modes set by environment variables or flags, side by side: ``--compare heap`` (the
default) with and without :func:`dmpq_compile.sysinfo.keep_freed_heap`, ``--compare native-rtn`` with the
group-wise RTN in torch (``DMPQ_NATIVE_RTN=0``) and in C++ (:mod:`dmpq_compile.quant.native`, as shipped),
``--compare calib-dtype`` with the calibration's products forced to bf16 (``--calib-dtype bfloat16``, what
``auto`` chose on any CPU with AVX-512 BF16 before it was measured) and as ``auto`` chooses now (timed:
:func:`dmpq_compile.ir.interpreter.bf16_speedup`). The last two make different models where ``auto`` picks
fp32: the counts of experts at another bit-width say how different.

Each round compiles the same checkpoint twice with the default command, once per mode (heap: as shipped,
glibc's default allocation, and with ``DMPQ_KEEP_FREED_HEAP=1``, freed heap kept for reuse), alternating
which goes first. Per run: wall, user and system CPU seconds and minor page faults
of the child process (``wait4``), and each pass's wall and CPU seconds and peak RSS from its
report.json. The two modes must make the same model: every expert's and non-expert's bit-width
and sensitivity values are compared (bitwise).

    python benchmarks/bench_heap.py /work/scale/olmoe4 --rounds 2 --work /work/scale/fast5-out \\
        --json benchmarks/results/heap-olmoe4-DATE.json

CPU seconds on a shared machine include OpenMP threads spinning while their peer is descheduled;
page faults do not depend on the load: read those, and wall only from quiet runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dmpq_compile.sysinfo import cpu_flags, cpu_model, git_commit, load_average

# keep_freed_heap is opt-in (DMPQ_KEEP_FREED_HEAP=1); the baseline is glibc's own default allocation (no
# MALLOC_* variable either: one would switch off glibc's adaptive mmap threshold, a worse baseline)
# mode -> (environment variables, extra compile flags)
COMPARISONS = {"heap": {"default-heap": ({}, []), "keep-freed-heap": ({"DMPQ_KEEP_FREED_HEAP": "1"}, [])},
               "native-rtn": {"torch-rtn": ({"DMPQ_NATIVE_RTN": "0"}, []), "native-rtn": ({}, [])},
               "calib-dtype": {"bf16-forced": ({}, ["--calib-dtype", "bfloat16"]), "auto": ({}, [])}}
MODE_VARIABLES = ("GLIBC_TUNABLES", "DMPQ_KEEP_FREED_HEAP", "DMPQ_NATIVE_RTN")  # taken from the mode, not inherited


def compile_once(ckpt: Path, out: Path, mode: tuple[dict[str, str], list[str]]) -> dict:
    extra_env, flags = mode
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in MODE_VARIABLES}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "dmpq_compile.cli", "-v", "compile", str(ckpt), "--target", "ort-cpu", "-o", str(out),
           "--overwrite", "--no-cache", "--no-progress", *flags]
    load0, t0 = load_average(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compile failed:\n{err[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)  # what is compared is in the report: one artifact on disk at a time
    return {"wall_s": round(wall, 1), "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
            "minor_faults": usage.ru_minflt, "load_before": load0, "load_after": load_average(),
            "peak_rss_mb": report["peak_rss_mb"],
            "passes": {p["name"]: {"seconds": round(p["seconds"], 1), "cpu_seconds": round(p.get("cpu_seconds", 0), 1),
                                   "peak_rss_mb": round(p["peak_rss_mb"])} for p in report["passes"]},
            "model": {"experts": {e["id"]: [e["bits"], e["kl"], e.get("flip_kl")] for e in report["experts"]},
                      "nonexpert": {n["id"]: [n["bits"], n.get("kl")] for n in report["nonexpert"]}}}


def warm_page_cache(folder: Path) -> None:
    """Read every file of the checkpoint once, so the first compile does not pay for the disk and the
    second does not win by it."""
    t0, size = time.perf_counter(), 0
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    size += len(chunk)
    print(f"page cache warmed: {size / 1e9:.1f} GB read in {time.perf_counter() - t0:.0f} s", flush=True)


def differences(a: dict, b: dict) -> dict:
    """Experts and non-experts at another bit-width, and those whose sensitivity values differ at all."""
    out = {}
    for part in ("experts", "nonexpert"):
        x, y = a[part], b[part]
        out[part] = {"nodes": len(x), "other_bits": sum(x[k][0] != y.get(k, [None])[0] for k in x),
                     "other_values": sum(x[k][1:] != y.get(k, [None])[1:] for k in x)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True, help="folder for the artifacts (each removed once its report is read)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="heap", help="which two modes (default heap)")
    ap.add_argument("--first", choices=("base", "new"), default="base",
                    help="which mode runs first in round 0 (then alternating; default base)")
    args = ap.parse_args()
    modes = COMPARISONS[args.compare]
    warm_page_cache(args.checkpoint)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    models: dict[str, dict] = {}
    for r in range(args.rounds):
        order = list(modes) if (r + (args.first == "new")) % 2 == 0 else list(reversed(modes))
        for mode in order:
            out = args.work / f"heap-{mode}"
            run = compile_once(args.checkpoint, out, modes[mode])
            models.setdefault(mode, run.pop("model"))
            run.pop("model", None)
            runs[mode].append(run)
            print(f"round {r} {mode}: wall {run['wall_s']} s, user {run['user_s']} s, sys {run['sys_s']} s, "
                  f"faults {run['minor_faults']}, peak {run['peak_rss_mb']:.0f} MB, load {run['load_before']}", flush=True)
    for mode in modes:
        shutil.rmtree(args.work / f"heap-{mode}", ignore_errors=True)

    def med(mode: str, get) -> float:
        return statistics.median(get(x) for x in runs[mode])

    base, new = modes
    rows = {"wall_s": lambda x: x["wall_s"], "user_s": lambda x: x["user_s"], "sys_s": lambda x: x["sys_s"],
            "cpu_s": lambda x: x["user_s"] + x["sys_s"], "minor_faults": lambda x: x["minor_faults"],
            "peak_rss_mb": lambda x: x["peak_rss_mb"]}
    for name in runs[base][0]["passes"]:
        for k in ("seconds", "cpu_seconds"):
            rows[f"{name}.{k}"] = lambda x, name=name, k=k: x["passes"][name][k]
    summary = {}
    print(f"\n{'median':<26}{base:>16}{new:>16}{'ratio':>8}")
    for key, get in rows.items():
        a, b = med(base, get), med(new, get)
        summary[key] = {base: a, new: b, "ratio": round(b / a, 3) if a else None}
        print(f"{key:<26}{a:>16.1f}{b:>16.1f}{summary[key]['ratio'] or 0:>8.3f}")
    same = differences(models[base], models[new])
    print("same model:", same)
    if args.json:
        commit = git_commit()
        args.json.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/bench_heap.py", *sys.argv[1:]]), "commit": commit,
            "cpu": f"{cpu_model()} ({', '.join(f for f in cpu_flags() if 'avx512' in f or f == 'avx2')})",
            "checkpoint": str(args.checkpoint), "modes": modes, "runs": runs, "median": summary, "same_model": same},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

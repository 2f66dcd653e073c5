"""Where an ort-cpu artifact's decode (or prefill) time goes: ONNX Runtime's own profile, by op type.

Runs the artifact's ``model.onnx`` with ``SessionOptions.enable_profiling``: a prefill of
``--prompt`` random tokens, then ``--steps`` greedy decode steps, through ``dmpq_compile.runtime``
(the same feeds as generation). From the profile's node events it sums, per phase, the kernel
time of each op type, and compares their total with the wall time of the ``Run`` calls: the
remainder is the executor's dispatch between kernels and the copies in and out of a run (inputs,
outputs, the KV cache the runtime passes back as numpy arrays).

    python benchmarks/profile_ort.py ARTIFACT --steps 16 --threads 2
    python benchmarks/profile_ort.py ARTIFACT --phase prefill --prompt 128

Prints a table; ``--out`` writes it as JSON with the CPU, load average and commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_genai import cpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (the prefill, and the decode's cache)")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON results")
    return p.parse_args(argv)


def profile(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    from dmpq_compile.runtime import load
    from dmpq_compile.runtime.session import register_custom_ops

    session = load(args.artifact, threads=args.threads, verify=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path("/tmp") / f"ort-profile-{int(time.time())}")
    register_custom_ops(options, args.artifact, session.manifest["target"])  # --dispatch kernel's library
    session._sess = ort.InferenceSession(str(args.artifact / session.manifest["target"]["model_file"]), options,
                                         providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(2, session.vocab_size, (1, args.prompt))
    logits, past = session.forward(ids, logits_to_keep=1)  # warm-up prefill
    walls = []
    if args.phase == "prefill":
        for _ in range(3):
            t0 = time.perf_counter()
            session.forward(ids, logits_to_keep=1)
            walls.append(time.perf_counter() - t0)
    else:
        logits, past = session.forward(ids, logits_to_keep=1)
        for _ in range(args.steps):
            token = np.array([[int(logits[0, -1].argmax())]])
            t0 = time.perf_counter()
            logits, past = session.forward(token, past)
            walls.append(time.perf_counter() - t0)
    trace = json.loads(Path(session._sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed = runs[-len(walls):]  # the runs measured (after the warm-ups)
    start, end = timed[0]["ts"], timed[-1]["ts"] + timed[-1]["dur"]
    by_op: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    n = len(walls)
    kernels = sum(by_op.values()) / n / 1e3
    run_ms = sum(r["dur"] for r in timed) / n / 1e3
    wall_ms = float(np.mean(walls)) * 1e3
    return {"artifact": str(args.artifact), "phase": args.phase, "prompt": args.prompt, "calls": n,
            "wall_ms": wall_ms, "run_ms": run_ms, "kernel_ms": kernels,
            "by_op_ms": {k: v / n / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.artifact / "manifest.json").is_file():
        sys.exit(f"{args.artifact} is not an artifact folder (no manifest.json)")
    result = profile(args)
    result.update({"cpu": cpu(), "threads": args.threads, "load": Path("/proc/loadavg").read_text().split()[:3],
                   "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, check=False).stdout.strip()})
    print(f"{result['phase']} of {args.artifact.name}: {result['wall_ms']:.2f} ms a call in Python, "
          f"{result['run_ms']:.2f} ms in Run, {result['kernel_ms']:.2f} ms in kernels "
          f"({result['run_ms'] - result['kernel_ms']:.2f} ms executor between kernels, "
          f"{result['wall_ms'] - result['run_ms']:.2f} ms feeds/copies outside Run)")
    for op, ms in result["by_op_ms"].items():
        if ms >= 0.005 * result["kernel_ms"]:
            print(f"  {op:>28} {ms:8.3f} ms  {100 * ms / result['kernel_ms']:5.1f} %")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

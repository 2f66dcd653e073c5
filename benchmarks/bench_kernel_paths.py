"""dmpq's MixedMoE kernel on its three CPU paths (AVX-512 VNNI, AVX2, portable), side by side in one run.

One ``ai.dmpq.MixedMoE`` node, one MoE layer at OLMoE-1B-7B's widths by default (hidden 2048, 64 experts of
1024, top-8, block 64, every expert 4-bit, accuracy level 4), with random weights written directly in the
op's panel layout (random bytes are valid codes at any width; float16 scales, zero points below 2^bits) and
random routing (8 distinct experts a token, softmax weights). Decode cycles through ``--decode-tokens``
tokens of different routing, so that successive runs read different experts' weights (as a model's
layers do) instead of the same few from the cache. One worker process per path
(``DMPQ_KERNEL_PATH``; the path is chosen once per process), all on the same model file and inputs,
``DMPQ_KERNEL_THREADS`` and onnxruntime's intra-op threads both ``--threads`` (the op runs on
onnxruntime's pool, or on its own with ``DMPQ_KERNEL_POOL=own`` in the environment). Each round asks every worker
in turn (order rotating) for decode (1 token: the median of ``--decode-reps`` runs) and prefill
(``--prefill`` tokens: the median of ``--prefill-reps`` runs), after a warm-up; the ratios are taken
round by round (same round, same load) and given as their median with the min..max. The workers' outputs
are compared bit for bit (the paths compute the same logits).

    python benchmarks/bench_kernel_paths.py                       # OLMoE widths, 4-bit, 2 threads, 5 rounds
    python benchmarks/bench_kernel_paths.py --bits 8 --level 0 --rounds 3

Other processes share this machine's CPU: the load average is recorded before and after each round; compare
only the ratios. Results: ``benchmarks/results/kernel-paths-TIME.json`` (command, commit, CPU, load).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PATHS = ("avx512-vnni", "avx2", "portable")
# Each path's CPU flags (/proc/cpuinfo's names); a path the CPU lacks is left out of the run.
PATH_FLAGS = {"avx512-vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"},
              "avx2": {"avx2", "fma", "f16c"}, "portable": set()}
REPORT_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                "avx512_vnni", "amx_int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--level", type=int, default=4, choices=(0, 4), help="accuracy_level: 4 int8, 0 fp32 activations")
    p.add_argument("--prefill", type=int, default=128, help="prefill tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-reps", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=16, help="distinct decode tokens (routings), run in turn")
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                   help="the first is the baseline of the ratios (default: avx512-vnni avx2 portable)")
    p.add_argument("--library", action="append", default=[], metavar="LABEL=PATH",
                   help="also time this build of the library (e.g. one built from an earlier commit) on the first "
                        "path, as worker LABEL; repeatable. The current sources' build is the baseline")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/kernel-paths-TIME.json)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "INPUTS"), help=argparse.SUPPRESS)
    p.add_argument("--worker-library", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cpu_info() -> dict:
    model, flags = "", set()
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return {"model": model, "flags": [f for f in REPORT_FLAGS if f in flags], "all_flags": flags}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def build_model(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """The one-node model (weights as external data) and the inputs (decode and prefill); their paths."""
    import onnx
    from dmpq_compile.backends.ort_cpu import kernels
    from onnx import TensorProto, helper

    h, i, e, bits, bs = args.hidden, args.inter, args.experts, args.bits, args.block
    rng = np.random.default_rng(0)
    gu, dn = 2 * i * h, h * i  # weights of an expert's gate/up and down
    meta = np.zeros((e, 8), np.int64)
    for x in range(e):
        c, s = x * (gu + dn) * bits // 8, x * (gu + dn) // bs
        meta[x] = [bits, c, c + gu * bits // 8, s, s + gu // bs, s, s + gu // bs, 0]
    codes = rng.integers(0, 256, e * (gu + dn) * bits // 8, dtype=np.uint8)
    # Scales ~ what RTN gives a weight of std 0.02 at these widths; zero points in the code range.
    scales = (rng.uniform(0.5, 1.5, e * (gu + dn) // bs) * 0.08 / (2 ** bits - 1)).astype(np.float16)
    zeros = rng.integers(0, 2 ** bits, e * (gu + dn) // bs, dtype=np.uint8)
    node = helper.make_node("MixedMoE", ["x", "ti", "tw", "codes", "scales", "zeros", "meta"], ["y"],
                            domain=kernels.DOMAIN, hidden=h, inter=i, block_size=bs, accuracy_level=args.level)
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in
             (("codes", codes), ("scales", scales), ("zeros", zeros), ("meta", meta))]
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, h]),
                                              helper.make_tensor_value_info("ti", TensorProto.INT64, [None, args.top_k]),
                                              helper.make_tensor_value_info("tw", TensorProto.FLOAT, [None, args.top_k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    path = folder / "moe.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="moe.data", size_threshold=1024)

    feeds = {}
    for name, n in (*((f"decode{j}", 1) for j in range(args.decode_tokens)), ("prefill", args.prefill)):
        x = rng.standard_normal((n, h), dtype=np.float32)
        ti = np.stack([rng.permutation(e)[:args.top_k] for _ in range(n)]).astype(np.int64)
        logits = rng.standard_normal((n, args.top_k)).astype(np.float32)
        tw = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        feeds.update({f"{name}.x": x, f"{name}.ti": ti, f"{name}.tw": tw.astype(np.float32)})
    inputs = folder / "inputs.npz"
    np.savez(inputs, **feeds)
    return path, inputs


def worker(model: Path, inputs: Path, threads: int, library: Path | None = None) -> None:
    """Serve timing requests on stdin ("decode REPS", "prefill REPS"), one JSON line each on stdout."""
    import onnxruntime as ort
    from dmpq_compile.backends.ort_cpu import kernels

    library = library or kernels.build()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    kernels.register(opts, library)
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    data = np.load(inputs)
    names = sorted({k.split(".")[0] for k in data.files})
    feeds = {k: {"x": data[f"{k}.x"], "ti": data[f"{k}.ti"], "tw": data[f"{k}.tw"]} for k in names}
    digests = {k: hashlib.sha256(sess.run(["y"], f)[0].tobytes()).hexdigest() for k, f in feeds.items()}  # warm-up
    decode = [k for k in names if k.startswith("decode")]
    import ctypes

    ort_pool = bool(ctypes.CDLL(str(library)).dmpq_kernel_uses_ort_pool())  # decided at registration
    print(json.dumps({"ready": kernels.describe(library), "ort_pool": ort_pool, "digests": digests}), flush=True)
    for line in sys.stdin:
        what, reps = line.split()
        times = []
        for rep in range(int(reps)):
            feed = feeds[decode[rep % len(decode)] if what == "decode" else what]
            t0 = time.perf_counter()
            sess.run(["y"], feed)
            times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"ms": times}), flush=True)


class Worker:
    def __init__(self, path: str, model: Path, inputs: Path, threads: int, library: Path | None = None):
        env = {**os.environ, "DMPQ_KERNEL_PATH": path, "DMPQ_KERNEL_THREADS": str(threads)}
        cmd = [sys.executable, __file__, "--worker", str(model), str(inputs), "--threads", str(threads)]
        if library:
            cmd += ["--worker-library", str(library)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.path = path
        hello = self.read()
        if hello["ready"]["path"] != path or hello["ready"]["threads"] != threads:
            raise RuntimeError(f"worker for {path} reports {hello['ready']}")
        self.digests, self.ort_pool = hello["digests"], hello["ort_pool"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.path} worker ended (exit {self.proc.wait()})")
        return json.loads(line)

    def time(self, what: str, reps: int) -> float:
        self.proc.stdin.write(f"{what} {reps}\n")
        self.proc.stdin.flush()
        return statistics.median(self.read()["ms"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.threads, args.worker_library)
        return 0
    cpu = cpu_info()
    paths = [p for p in args.paths if PATH_FLAGS[p] <= cpu["all_flags"]]
    if skipped := [p for p in args.paths if p not in paths]:
        print(f"this CPU lacks the {', '.join(skipped)} path(s); timing {', '.join(paths)}")
    libraries = {}
    for spec in args.library:
        label, sep, file = spec.partition("=")
        if not sep or not label or not Path(file).is_file():
            raise SystemExit(f"--library {spec!r}: give LABEL=PATH with PATH a built libdmpq_kernels.so")
        if label in PATHS or label in libraries:
            raise SystemExit(f"--library label {label!r} is taken: pick another")
        libraries[label] = Path(file)
    if not paths or len(paths) + len(libraries) < 2:
        raise SystemExit("fewer than two paths or libraries to compare on this CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=False).stdout.strip())
    base = paths[0]
    with tempfile.TemporaryDirectory(prefix="bench-kernel-paths-") as tmp:
        model, inputs = build_model(args, Path(tmp))
        workers = {p: Worker(p, model, inputs, args.threads) for p in paths}
        workers.update({label: Worker(paths[0], model, inputs, args.threads, lib) for label, lib in libraries.items()})
        paths = [*paths, *libraries]  # from here on: the workers' labels
        try:
            identical = all(w.digests == workers[base].digests for w in workers.values())
            pool = "onnxruntime intra-op" if all(w.ort_pool for w in workers.values()) else \
                "own" if not any(w.ort_pool for w in workers.values()) else "mixed"
            rounds = []
            for r in range(args.rounds):
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                row = {"order": order, "load_start": loadavg(), "decode_ms": {}, "prefill_ms": {}}
                for p in order:
                    row["decode_ms"][p] = workers[p].time("decode", args.decode_reps)
                    row["prefill_ms"][p] = workers[p].time("prefill", args.prefill_reps)
                row["load_end"] = loadavg()
                rounds.append(row)
                print(f"round {r + 1}: load {row['load_start'][0]} -> {row['load_end'][0]}; "
                      + "; ".join(f"{p} decode {row['decode_ms'][p]:.2f} ms, prefill {row['prefill_ms'][p]:.1f} ms"
                                  for p in paths), flush=True)
        finally:
            for w in workers.values():
                w.close()

    summary = {}
    print(f"\nMixedMoE, hidden {args.hidden}, {args.experts} experts x {args.inter}, top-{args.top_k}, block "
          f"{args.block}, {args.bits}-bit, level {args.level}, {args.threads} threads ({pool} pool); median over {args.rounds} "
          f"rounds (min..max of the round-by-round ratios)")
    for what, label in (("decode_ms", "decode (1 token)"), ("prefill_ms", f"prefill ({args.prefill} tokens)")):
        entry = {p: {"ms": statistics.median(r[what][p] for r in rounds)} for p in paths}
        pairs = [(a, b) for i, a in enumerate(paths) for b in paths[i + 1:]]  # b's time / a's time
        ratios = {}
        for a, b in pairs:
            per_round = [r[what][b] / r[what][a] for r in rounds]
            ratios[f"{b}/{a}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                  "max": max(per_round)}
        summary[what] = {"paths": entry, "time_ratios": ratios}
        print(f"  {label}: " + ", ".join(f"{p} {entry[p]['ms']:.2f} ms" for p in paths))
        for name, v in ratios.items():
            print(f"    time {name}: {v['median']:.2f}x ({v['min']:.2f}..{v['max']:.2f})")
    print(f"outputs identical bit for bit across paths: {identical}")
    cpu_record = {"model": cpu["model"], "flags": cpu["flags"]}
    print(f"commit {commit}{' (dirty)' if dirty else ''}, CPU {cpu_record}, load {rounds[0]['load_start']} -> "
          f"{rounds[-1]['load_end']}")
    out = args.out or RESULTS / f"kernel-paths-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python benchmarks/bench_kernel_paths.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit, "dirty": dirty, "cpu": cpu_record, "threads": args.threads, "pool": pool,
        "shape": {"hidden": args.hidden, "inter": args.inter, "experts": args.experts, "top_k": args.top_k,
                  "block": args.block, "bits": args.bits, "level": args.level, "prefill": args.prefill},
        "reps": {"decode": args.decode_reps, "prefill": args.prefill_reps}, "decode_tokens": args.decode_tokens, "paths": paths,
        "outputs_identical": identical, "load_start": rounds[0]["load_start"], "load_end": rounds[-1]["load_end"],
        "summary": summary, "rounds": rounds}, indent=1))
    print(f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

"""Would a float16 KV cache make decode faster on ONNX Runtime's CPU? fp32 against fp16 keys and values.

At a long context a decode step reads every cached key and value once per layer: in fp32 that is
``2 * 4 * kv_heads * head_dim * layers`` bytes per cached position (256 KB for OLMoE-1B-7B, 192 KB for
Qwen3-30B-A3B), 134 MB a token at 512 positions of OLMoE, as much as a fifth of its weights at 4.5 bits.
llama.cpp caches float16. ort-cpu artifacts attend with ``com.microsoft.GroupQueryAttention`` over a
KV buffer shared between past and present; the op also takes float16. This script times the attention
alone, as the artifact runs it: a stack of one ``GroupQueryAttention`` per layer at a model's widths
(a residual add between them, so each layer's query depends on the one before), a buffer of
``--capacity`` positions bound as both past and present through I/O binding, one token per step after
``context`` cached positions; fp32 graphs, and fp16 graphs that cast the query, key and value to
float16 and the output back (what an fp16 cache costs a fp32 model). Beside them, where a C++ compiler
is found, a prototype (``benchmarks/csrc/kv_attention.cc``, AVX2/F16C) that reads the buffer where it lies,
once per KV head for its group of query heads, in fp16 and, as the control, the same loop in fp32 (first
checked against numpy's attention). Rounds interleave all of them; the median step of each round, the
median over rounds, and the ratios to ORT's fp32 are printed.

    python benchmarks/bench_kv_dtype.py --model olmoe-1b-7b --contexts 128 512 2048 --rounds 3

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from dmpq_compile.bench import machine, write_results
from dmpq_compile.sysinfo import git_commit
from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
# layers, query heads, KV heads, head dim (the hub configs)
MODELS = {"olmoe-1b-7b": (16, 16, 16, 128), "qwen3-30b-a3b": (48, 32, 4, 128), "mixtral-8x7b": (32, 32, 8, 128)}
DTYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}
PROTO_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-mavx2", "-mfma", "-mf16c",
               "-fvisibility=hidden", "-Wall")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="olmoe-1b-7b", help="attention widths and depth")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048], help="cached positions before a step")
    p.add_argument("--capacity", type=int, default=4096, help="KV buffer positions (onnxruntime-genai's max_length)")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per round (after 4 untimed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-prototype", action="store_true", help="time onnxruntime's op only")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/kv-dtype-TIME.json)")
    args = p.parse_args(argv)
    if max(args.contexts) + args.steps + 4 > args.capacity:
        p.error(f"--capacity {args.capacity} cannot hold {max(args.contexts)} cached positions and "
                f"{args.steps + 4} steps; raise it")
    return args


def attention_stack(layers: int, heads: int, kv_heads: int, head_dim: int, dtype: str) -> bytes:
    """One GroupQueryAttention per layer over its own past/present buffers; query, key and value are the
    residual stream (fp32) cast to ``dtype``; the output is cast back and added to the stream."""
    elem = DTYPES[dtype][0]
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", q_width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs, nodes = [], []
    stream = "x"
    for layer in range(layers):
        for name in ("past_key", "past_value"):
            inputs.append(helper.make_tensor_value_info(f"{name}.{layer}", elem, ["batch", kv_heads, "past", head_dim]))
        for name in ("present_key", "present_value"):
            outputs.append(helper.make_tensor_value_info(f"{name}.{layer}", elem,
                                                         ["batch", kv_heads, "total", head_dim]))
        q, kv = f"q.{layer}", f"kv.{layer}"
        nodes.append(helper.make_node("Cast", [stream], [q], to=elem))
        nodes.append(helper.make_node("Slice", [q, "zero", "kv_width", "last"], [kv]))
        out = f"attn.{layer}"
        nodes.append(helper.make_node(
            "GroupQueryAttention", [q, kv, kv, f"past_key.{layer}", f"past_value.{layer}", "seqlens_k",
                                    "total_sequence_length"],
            [out, f"present_key.{layer}", f"present_value.{layer}"], domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5)))
        nodes.append(helper.make_node("Cast", [out], [f"attn32.{layer}"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Add", [stream, f"attn32.{layer}"], [f"stream.{layer}"]))
        stream = f"stream.{layer}"
    outputs.insert(0, helper.make_tensor_value_info(stream, TensorProto.FLOAT, ["batch", "seq", q_width]))
    consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
              helper.make_tensor("kv_width", TensorProto.INT64, [1], [kv_width]),
              helper.make_tensor("last", TensorProto.INT64, [1], [2])]
    graph = helper.make_graph(nodes, f"gqa-{dtype}", inputs, outputs, initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


class Stack:
    """A session over :func:`attention_stack` with its KV buffers bound as past and present."""

    def __init__(self, widths: tuple[int, int, int, int], dtype: str, capacity: int, threads: int):
        layers, heads, kv_heads, head_dim = widths
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(attention_stack(*widths, dtype), opts, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name
        rng = np.random.default_rng(0)
        self.binding = self.session.io_binding()
        self.buffers = []
        for layer in range(layers):
            for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
                value = (rng.standard_normal((1, kv_heads, capacity, head_dim)) * 0.5).astype(DTYPES[dtype][1])
                buf = ort.OrtValue.ortvalue_from_numpy(value)
                self.buffers.append(buf)
                self.binding.bind_ortvalue_input(f"{past}.{layer}", buf)
                self.binding.bind_ortvalue_output(f"{present}.{layer}", buf)
        self.x = (rng.standard_normal((1, 1, heads * head_dim)) * 0.5).astype(np.float32)
        self.binding.bind_cpu_input("x", self.x)
        self.binding.bind_output(self.output)

    def steps(self, context: int, n: int, warm: int = 4) -> float:
        """Median ms of ``n`` one-token steps after ``context`` cached positions (``warm`` untimed first)."""
        times = []
        for i in range(warm + n):
            cached = context + i
            self.binding.bind_cpu_input("seqlens_k", np.array([cached], np.int32))  # total - 1
            self.binding.bind_cpu_input("total_sequence_length", np.array(cached + 1, np.int32))
            t0 = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warm:]) * 1e3


class Prototype:
    """The C++ prototype over one layer's worth of buffers per layer (numpy arrays), fp16 or fp32."""

    def __init__(self, library: ctypes.CDLL, widths: tuple[int, int, int, int], dtype: str, capacity: int,
                 threads: int):
        self.layers, self.heads, self.kv_heads, self.head_dim = widths
        self.capacity, self.threads, self.np_dtype = capacity, threads, DTYPES[dtype][1]
        self.fn = getattr(library, f"kv_attention_{'f16' if dtype == 'fp16' else 'f32'}")
        self.fn.restype = ctypes.c_int
        rng = np.random.default_rng(0)
        shape = (self.kv_heads, capacity, self.head_dim)
        self.kv = [tuple((rng.standard_normal(shape) * 0.5).astype(self.np_dtype) for _ in "kv")
                   for _ in range(self.layers)]
        self.q = (rng.standard_normal((self.heads, self.head_dim)) * 0.5).astype(np.float32)
        self.out = np.empty_like(self.q)
        self.scores = np.empty((self.heads, capacity), np.float32)

    def step(self, layer: int, total: int) -> np.ndarray:
        k, v = self.kv[layer]
        k[:, total - 1] = self.q[:: self.heads // self.kv_heads]  # the new token's row, as the op writes it
        v[:, total - 1] = self.q[:: self.heads // self.kv_heads]
        ptr = ctypes.c_void_p
        status = self.fn(ptr(self.q.ctypes.data), ptr(k.ctypes.data), ptr(v.ctypes.data), self.heads, self.kv_heads,
                         self.head_dim, self.capacity, total, ctypes.c_float(self.head_dim ** -0.5),
                         ptr(self.out.ctypes.data), ptr(self.scores.ctypes.data), self.threads)
        if status:
            raise RuntimeError(f"the prototype does not take these widths: {self.heads} heads, {self.kv_heads} KV "
                               f"heads of {self.head_dim}")
        return self.out

    def check(self, total: int = 37) -> float:
        """Largest difference to numpy's attention over the same (stored) keys and values, relative to its scale."""
        got = self.step(0, total).copy()
        k, v = (t[:, :total].astype(np.float32) for t in self.kv[0])
        group = self.heads // self.kv_heads
        q = self.q.reshape(self.kv_heads, group, self.head_dim)
        s = np.einsum("ngd,ntd->ngt", q, k) * self.head_dim ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("ngt,ntd->ngd", p / p.sum(-1, keepdims=True), v).reshape(self.heads, self.head_dim)
        return float(np.abs(got - ref).max() / np.abs(ref).max())

    def steps(self, context: int, n: int, warm: int = 4) -> float:
        times = []
        for i in range(warm + n):
            t0 = time.perf_counter()
            for layer in range(self.layers):
                self.step(layer, context + i + 1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warm:]) * 1e3


def prototypes(widths: tuple[int, int, int, int], capacity: int, threads: int) -> dict[str, Prototype]:
    """The prototype's fp32 and fp16 runners, checked against numpy; empty (with a note) where it cannot build."""
    from dmpq_compile.native import NativeBuildError, build_library

    try:
        path = build_library("libkv_attention_proto.so", ROOT / "benchmarks" / "csrc", ("kv_attention.cc",),
                             PROTO_FLAGS, "the KV attention prototype", native_cpu=True)
    except NativeBuildError as e:
        print(f"note: no prototype rows: {e}", file=sys.stderr)
        return {}
    library = ctypes.CDLL(str(path))
    runners = {f"proto-{d}": Prototype(library, widths, d, capacity, threads) for d in DTYPES}
    for name, runner in runners.items():
        error = runner.check()
        if error > 1e-5:
            sys.exit(f"the prototype's {name} attention differs from numpy's by {error:.2e} (relative): not timing it")
    return runners


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    widths = MODELS[args.model]
    layers, _, kv_heads, head_dim = widths
    commit, start = git_commit(ROOT), uptime()
    runners: dict[str, Stack | Prototype] = {f"ort-{d}": Stack(widths, d, args.capacity, args.threads)
                                             for d in DTYPES}
    if not args.no_prototype:
        runners |= prototypes(widths, args.capacity, args.threads)
    names = list(runners)
    rows = []
    for context in args.contexts:
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                times[n].append(runners[n].steps(context, args.steps))
        ms = {n: statistics.median(t) for n, t in times.items()}
        kv_bytes = {n: 2 * kv_heads * head_dim * layers * (context + 1) * (2 if n.endswith("fp16") else 4)
                    for n in names}
        row = {"context": context, "ms": ms, "rounds_ms": times,
               "over_ort_fp32": {n: ms[n] / ms["ort-fp32"] for n in names},
               "kv_bytes_read": kv_bytes, "kv_gb_s": {n: kv_bytes[n] / ms[n] / 1e6 for n in names}}
        rows.append(row)
        print(f"{args.model} context {context}: " + ", ".join(
            f"{n} {ms[n]:.2f} ms ({row['kv_gb_s'][n]:.1f} GB/s, {row['over_ort_fp32'][n]:.2f}x)" for n in names),
            flush=True)
    write_results(args.out, ROOT / "benchmarks" / "results", "kv-dtype", "benchmarks/bench_kv_dtype.py", args, rows,
                  commit=commit, machine=machine(), onnxruntime=ort.__version__,
                  statistic="median over rounds of each round's median step (all layers), ms",
                  uptime_start=start, uptime_end=uptime(),
                  widths=dict(zip(("layers", "heads", "kv_heads", "head_dim"), widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention alone, as ort-cpu artifacts run it: onnxruntime's ``com.microsoft.GroupQueryAttention`` against
dmpq's ``ai.dmpq.GroupQueryAttention`` (the kernel dispatch's, ``backends/ort_cpu/csrc/gqa.h``), side by side.

A stack of one attention node per layer at a model's widths (a residual add between them, so each layer's
query depends on the one before), fp32, each layer's KV buffer of ``--capacity`` positions bound as both past
and present through I/O binding (genai's past_present_share_buffer), the additive bias the artifacts feed
(causal). Two regimes: a decode step (one token) after ``context`` cached positions, and a prefill of
``--prefill`` tokens into an empty cache. Rounds alternate the two ops' order; the median step of each round,
the median over rounds, and dmpq's time over onnxruntime's are printed. Both ops are first run on the same
inputs and their outputs compared (they must agree to 1e-4 relative).

    python benchmarks/bench_attention.py --model qwen3-30b-a3b --contexts 128 512 2048 --prefill 512 --rounds 3

Record results with the command, the load average and the commit (the JSON does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from dmpq_compile.backends.ort_cpu import kernels
from onnx import TensorProto, helper

from dmpq_compile.bench import machine, write_results
from dmpq_compile.sysinfo import git_commit
from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
# layers, query heads, KV heads, head dim (the hub configs)
MODELS = {"olmoe-1b-7b": (16, 16, 16, 128), "qwen3-30b-a3b": (48, 32, 4, 128), "mixtral-8x7b": (32, 32, 8, 128)}
OPS = ("ort", "dmpq")
LOWEST = float(np.finfo(np.float32).min)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="olmoe-1b-7b", help="attention widths and depth")
    p.add_argument("--layers", type=int, help="attention layers (default: the model's)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048], help="cached positions before a step")
    p.add_argument("--prefill", type=int, nargs="*", default=[512], help="prompt lengths into an empty cache")
    p.add_argument("--capacity", type=int, default=4096, help="KV buffer positions (onnxruntime-genai's max_length)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per round (after 4 untimed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/attention-TIME.json)")
    args = p.parse_args(argv)
    if max([*args.contexts, *args.prefill]) + args.steps + 4 > args.capacity:
        p.error(f"--capacity {args.capacity} cannot hold the longest context and {args.steps + 4} steps; raise it")
    return args


def attention_stack(op: str, layers: int, heads: int, kv_heads: int, head_dim: int) -> bytes:
    """One attention node per layer (``op``: onnxruntime's or dmpq's) over its own past/present buffers; query,
    key and value are slices of the residual stream; the output is added to the stream."""
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f, ["batch", "seq", q_width]),
              helper.make_tensor_value_info("bias", f, ["batch", 1, "seq", "total"])]
    if op == "ort":
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                   helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    else:
        inputs += [helper.make_tensor_value_info("total", TensorProto.INT64, [1])]
    outputs, nodes = [], []
    stream = "x"
    for layer in range(layers):
        for name in ("past_key", "past_value"):
            inputs.append(helper.make_tensor_value_info(f"{name}.{layer}", f, ["batch", kv_heads, "past", head_dim]))
        for name in ("present_key", "present_value"):
            outputs.append(helper.make_tensor_value_info(f"{name}.{layer}", f, ["batch", kv_heads, "total", head_dim]))
        kv, out = f"kv.{layer}", f"attn.{layer}"
        nodes.append(helper.make_node("Slice", [stream, "zero", "kv_width", "last"], [kv]))
        past = [f"past_key.{layer}", f"past_value.{layer}"]
        present = [out, f"present_key.{layer}", f"present_value.{layer}"]
        if op == "ort":
            nodes.append(helper.make_node(
                "GroupQueryAttention", [stream, kv, kv, *past, "seqlens_k", "total_sequence_length", "", "", "",
                                        "bias"],
                present, domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                scale=float(head_dim ** -0.5)))
        else:
            nodes.append(helper.make_node("GroupQueryAttention", [stream, kv, kv, *past, "total", "bias"], present,
                                          domain=kernels.DOMAIN, num_heads=heads, kv_num_heads=kv_heads))
        nodes.append(helper.make_node("Add", [stream, out], [f"stream.{layer}"]))
        stream = f"stream.{layer}"
    outputs.insert(0, helper.make_tensor_value_info(stream, f, ["batch", "seq", q_width]))
    consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
              helper.make_tensor("kv_width", TensorProto.INT64, [1], [kv_width]),
              helper.make_tensor("last", TensorProto.INT64, [1], [2])]
    graph = helper.make_graph(nodes, f"attention-{op}", inputs, outputs, initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    return model.SerializeToString()


class Stack:
    """A session over :func:`attention_stack` with its KV buffers bound as past and present."""

    def __init__(self, op: str, widths: tuple[int, int, int, int], capacity: int, threads: int, library: Path):
        layers, heads, kv_heads, head_dim = widths
        self.op, self.width = op, heads * head_dim
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if op == "dmpq":
            kernels.register(opts, library)
        self.session = ort.InferenceSession(attention_stack(op, *widths), opts, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name
        rng = np.random.default_rng(0)
        self.binding = self.session.io_binding()
        self.buffers = []
        for layer in range(layers):
            for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
                value = (rng.standard_normal((1, kv_heads, capacity, head_dim)) * 0.5).astype(np.float32)
                buf = ort.OrtValue.ortvalue_from_numpy(value)
                self.buffers.append(buf)
                self.binding.bind_ortvalue_input(f"{past}.{layer}", buf)
                self.binding.bind_ortvalue_output(f"{present}.{layer}", buf)

    def run(self, cached: int, tokens: int, seed: int = 1) -> tuple[float, np.ndarray]:
        """One call: ``tokens`` new positions after ``cached``; its seconds and the stack's output."""
        total = cached + tokens
        x = (np.random.default_rng(seed).standard_normal((1, tokens, self.width)) * 0.5).astype(np.float32)
        allowed = np.arange(total)[None, :] <= (cached + np.arange(tokens))[:, None]
        bias = np.where(allowed, 0.0, LOWEST).astype(np.float32)[None, None]
        self.binding.bind_cpu_input("x", x)
        self.binding.bind_cpu_input("bias", bias)
        self.binding.bind_output(self.output)  # afresh: its shape follows the call's tokens
        if self.op == "ort":
            self.binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
            self.binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        else:
            self.binding.bind_cpu_input("total", np.array([total], np.int64))
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        seconds = time.perf_counter() - t0
        return seconds, self.binding.copy_outputs_to_cpu()[0]

    def decode(self, context: int, n: int, warm: int = 4) -> float:
        """Median ms of ``n`` one-token steps after ``context`` cached positions (``warm`` untimed first)."""
        times = [self.run(context + i, 1)[0] for i in range(warm + n)]
        return statistics.median(times[warm:]) * 1e3

    def prefill(self, tokens: int, n: int = 3) -> float:
        """Median ms of ``n`` prefills of ``tokens`` positions into an empty cache (one untimed first)."""
        times = [self.run(0, tokens)[0] for _ in range(n + 1)]
        return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    widths = MODELS[args.model]
    if args.layers:
        widths = (args.layers, *widths[1:])
    library = kernels.build()
    commit, start = git_commit(ROOT), uptime()
    stacks = {op: Stack(op, widths, args.capacity, args.threads, library) for op in OPS}
    checks = ((0, min(37, args.capacity)), (min(300, args.capacity - 1), 1))  # a prompt, then a step after a cache
    for cached, tokens in checks:  # the same inputs and the same cache contents: the same outputs
        outs = [stacks[op].run(cached, tokens, seed=7)[1] for op in OPS]
        error = float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max())
        if error > 1e-4:
            sys.exit(f"dmpq's attention differs from onnxruntime's by {error:.2e} (relative): not timing it")
    rows = []
    cases = [("decode", c) for c in args.contexts] + [("prefill", t) for t in args.prefill]
    for kind, size in cases:
        times: dict[str, list[float]] = {op: [] for op in OPS}
        for r in range(args.rounds):
            for op in (OPS if r % 2 == 0 else OPS[::-1]):
                s = stacks[op]
                times[op].append(s.decode(size, args.steps) if kind == "decode" else s.prefill(size))
        ms = {op: statistics.median(t) for op, t in times.items()}
        row = {"kind": kind, "positions": size, "ms": ms, "rounds_ms": times, "dmpq_over_ort": ms["dmpq"] / ms["ort"]}
        rows.append(row)
        print(f"{args.model} ({widths[0]} layers) {kind} {size}: onnxruntime {ms['ort']:.2f} ms, dmpq "
              f"{ms['dmpq']:.2f} ms ({row['dmpq_over_ort']:.2f}x)", flush=True)
    write_results(args.out, ROOT / "benchmarks" / "results", "attention", "benchmarks/bench_attention.py", args, rows,
                  commit=commit, machine=machine(), onnxruntime=ort.__version__, kernel=kernels.describe(library),
                  statistic="median over rounds of each round's median call (all layers), ms",
                  uptime_start=start, uptime_end=uptime(),
                  widths=dict(zip(("layers", "heads", "kv_heads", "head_dim"), widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

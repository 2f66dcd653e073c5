"""One fused ``com.microsoft.QMoE`` node per bit-width group vs the per-expert ``gather-if`` dispatch (issue 25).

Builds one routed-MoE layer (router + experts, no attention) with random quantized expert weights
at real widths and times two ONNX models of it side by side on onnxruntime's CPU provider:

* ``gather-if``: what ``backends/onnx_lowering.py`` (``GatherIfDispatch``) and
  ``backends/ort_cpu/matmulnbits.py`` (``MatMulNBitsProjection`` with the fused ``gate_up``)
  emit today, rebuilt node for node with ``onnx.helper``: per expert an ``If`` on "any token
  routed here" whose then-branch gathers the expert's rows, runs gate/up as one ``MatMulNBits``
  (``N = 2 I``) + ``Split``, SwiGLU, the down ``MatMulNBits``, multiplies by the routing weight and
  adds the rows into the running output (``GatherND``/``Add``/``ScatterND``). Float16 scales, so
  at ``accuracy_level`` 4 the products take ``x`` cast to float16, as the artifacts do;
* ``qmoe``: the same router (Softmax, TopK, optional renormalization, ``ScatterElements`` into a
  dense ``[T, E]`` weight matrix: the routing weight at the chosen experts, 0 elsewhere), then one
  ``QMoE`` per bit-width group of experts with ``router_probs = router_weights =`` the group's
  columns of that matrix, ``k = min(top_k, group size)``, ``normalize_routing_weights = 0``; the
  groups' outputs are added. The CPU kernel selects the top ``k`` columns by ``router_probs``,
  takes the mixing weights from ``router_weights`` and skips every (token, expert) whose weight
  is <= 1e-8, so the columns that only fill the ``k`` slots (weight 0) cost nothing: each node
  computes exactly the chosen experts of its group with their routing weights
  (docs/qmoe-findings.md).

Also timed: ``gather-if-f32`` (the same per-expert dispatch with float32 scales, so the products
take float32 activations as QMoE's do: separates the dispatch cost from the float16 casts) and
``router`` (the shared router alone, the floor all share).

Layers (``--layers``): ``olmoe-4bit`` (hidden 2048, 64 experts x 1024, top-8, softmax without
renormalization), ``qwen3-4bit`` (hidden 2048, 128 experts x 768, top-8, renormalized),
``olmoe-mixed`` / ``qwen3-mixed`` (the same with even experts at 4 bits and odd ones at 2 bits:
two QMoE nodes); ``olmoe-2bit`` / ``qwen3-2bit`` (all experts at 2 bits) on request. Block (group) size 64,
asymmetric codes with packed zero points.
Each layer is timed at decode (1 token) and prefill (``--prefill-tokens``, default 128),
interleaved rounds with the order rotating, per-round median of ``--reps`` runs; the table shows
the median over rounds and the spread (min..max of the round medians), and the median (min..max)
over rounds of each round's ratio to the first variant, which is robust to the load drifting
between rounds on a shared machine.

``--check`` first verifies, at small widths and at the benchmark widths: QMoE vs ``gather-if``
and both vs a float64 reference at ``accuracy_level`` 0, mixed-group exactness, that an expert
with weight 0 is not computed (its scales are NaN and the output stays finite), the 1e-8 cut,
and the power-of-two rescaling that moves it.

    python benchmarks/bench_qmoe.py --check                    # checks + all four layers (~10 min on 2 cores)
    python benchmarks/bench_qmoe.py --layers olmoe-4bit --rounds 3
    python benchmarks/bench_qmoe.py --check-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx
import onnxruntime as ort
from dmpq_compile.backends.ort_cpu.matmulnbits import qmoe_attributes
from onnx import TensorProto, helper, numpy_helper

from dmpq_compile.quant import pack_bits, unpack_bits
from dmpq_compile.sysinfo import cpu_model

SHAPES = {  # hidden, expert intermediate, experts, top-k, renormalize the top-k weights
    "olmoe": {"hidden": 2048, "inter": 1024, "experts": 64, "top_k": 8, "norm": False},
    "qwen3": {"hidden": 2048, "inter": 768, "experts": 128, "top_k": 8, "norm": True},
}
LAYERS = {  # name -> (shape, bits of expert e)
    "olmoe-4bit": ("olmoe", lambda e: 4),
    "qwen3-4bit": ("qwen3", lambda e: 4),
    "olmoe-mixed": ("olmoe", lambda e: 4 if e % 2 == 0 else 2),
    "qwen3-mixed": ("qwen3", lambda e: 4 if e % 2 == 0 else 2),
    "olmoe-2bit": ("olmoe", lambda e: 2),  # not in the default set: isolates the 2-bit kernels
    "qwen3-2bit": ("qwen3", lambda e: 2),
}
DEFAULT_LAYERS = ("olmoe-4bit", "qwen3-4bit", "olmoe-mixed", "qwen3-mixed")
VARIANTS = ("gather-if", "gather-if-f32", "qmoe", "router")
QMOE_SKIP = 1e-8  # the CPU kernel drops (token, expert) pairs with routing weight <= this


# --------------------------------------------------------------------------------------------------
# weights: per expert and role, the MatMulNBits tensors the ort-cpu backend stores
# --------------------------------------------------------------------------------------------------
def random_projection(n: int, k: int, bits: int, block: int, rng: np.random.Generator) -> dict[str, Any]:
    """Random group-wise asymmetric ``W [n, k]`` in MatMulNBits layout: codes ``B [n, k/block, block*bits/8]``
    (LSB-first, :func:`pack_bits`), float16 ``scales [n, k/block]``, packed ``zero_points``."""
    blocks = k // block
    b = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)  # uniform random codes
    mid = 2 ** (bits - 1)
    zeros = np.clip(mid + rng.integers(-1, 2, size=(n, blocks)), 0, 2 ** bits - 1).astype(np.uint8)
    scales = (rng.uniform(0.5, 1.5, size=(n, blocks)) / (np.sqrt(k) * mid)).astype(np.float16)
    return {"b": b, "scales": scales, "zp": pack_bits(zeros, bits), "n": n, "k": k, "bits": bits, "block": block}


def dequantize(p: dict[str, Any]) -> np.ndarray:
    """float64 ``W [n, k]`` of a projection: ``(q - zero) * scale`` per block."""
    n, k, bits, block = p["n"], p["k"], p["bits"], p["block"]
    blocks = k // block
    codes = unpack_bits(p["b"].reshape(n, -1), bits, k).reshape(n, blocks, block).astype(np.float64)
    zeros = unpack_bits(p["zp"], bits, blocks).astype(np.float64)
    return ((codes - zeros[..., None]) * p["scales"].astype(np.float64)[..., None]).reshape(n, k)


def random_layer(shape: dict[str, Any], bits_of, block: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    h, i, e = shape["hidden"], shape["inter"], shape["experts"]
    experts = []
    for idx in range(e):
        bits = bits_of(idx)
        experts.append({"bits": bits, "gate": random_projection(i, h, bits, block, rng),
                        "up": random_projection(i, h, bits, block, rng),
                        "down": random_projection(h, i, bits, block, rng)})
    router = (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32)
    return {**shape, "block": block, "experts": experts, "router": router}


# --------------------------------------------------------------------------------------------------
# QMoE repacking (the recipe of docs/qmoe-findings.md)
# --------------------------------------------------------------------------------------------------
def qmoe_weights(experts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """QMoE inputs for one bit-width group, from the per-expert MatMulNBits tensors (byte copies only).

    fc1 rows interleave gate and up (``swiglu_fusion=1``: row ``2j`` = gate row ``j``, row ``2j+1``
    = up row ``j``), each row the MatMulNBits codes of that row flattened over blocks; the scales
    and packed zero points are interleaved the same way. fc2 is the down projection as it is.
    Scales stay float16 here (the model casts them to float32 once, folded at load).
    """
    def rows(p: dict[str, Any], key: str) -> np.ndarray:
        return p[key].reshape(p["n"], -1)

    def interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [n, c] x 2 -> [2n, c]
        return np.stack([a, b], axis=1).reshape(2 * a.shape[0], a.shape[1])

    out = {}
    for key, name in (("b", ""), ("scales", "_scales"), ("zp", "_zero_points")):
        out[f"fc1{name}"] = np.stack([interleave(rows(x["gate"], key), rows(x["up"], key)) for x in experts])
        out[f"fc2{name}"] = np.stack([rows(x["down"], key) for x in experts])
    return out


# --------------------------------------------------------------------------------------------------
# graph construction
# --------------------------------------------------------------------------------------------------
class G:
    """A tiny graph builder: unique names, constants, initializers, nodes (and If-branch node lists)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def init(self, arr: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.require(arr, requirements='C'), name))  # keeps 0-d scalars
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        return self.init(np.asarray(value, dtype=dtype), "c")

    def op(self, op_type: str, inputs: list[str], hint: str = "v", n_out: int = 1, domain: str = "", **attrs: Any):
        outs = [self.name(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs: list[str], outputs: list[str], dims: dict[str, list[Any]]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "moe", [helper.make_tensor_value_info(x, TensorProto.FLOAT, dims[x])
                                                      for x in inputs],
                                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in outputs],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                       helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def router(g: G, layer: dict[str, Any], x: str) -> tuple[str, str]:
    """``_rule_router`` + ``RouteValue.dense``: dense routing weights and the 0/1 selection, ``[T, E]``."""
    probs = g.op("Softmax", [g.op("MatMul", [x, g.init(layer["router"].T, "router")])], axis=-1)
    top_w, top_i = g.op("TopK", [probs, g.const([layer["top_k"]], np.int64)], n_out=2, axis=-1)
    if layer["norm"]:
        top_w = g.op("Div", [top_w, g.op("ReduceSum", [top_w, g.const([-1], np.int64)], keepdims=1)])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [probs])], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    ones = g.op("ConstantOfShape", [g.op("Shape", [top_w])], value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0]))
    dense = g.op("ScatterElements", [zeros, top_i, top_w], axis=1)
    selected = g.op("ScatterElements", [zeros, top_i, ones], axis=1)
    return dense, selected


def nbits_matmul(g: G, x: str, p: list[dict[str, Any]], accuracy_level: int, hint: str, f32: bool = False) -> str:
    """``MatMulNBitsProjection._matmul`` on the row-stacked projections ``p`` (float16 scales; with
    ``f32`` or at accuracy_level 0 cast to float32, folded at load, and ``x`` stays float32)."""
    b = g.init(np.concatenate([q["b"] for q in p]), f"{hint}.qweight")
    s = g.init(np.concatenate([q["scales"] for q in p]), f"{hint}.scales")
    z = g.init(np.concatenate([q["zp"] for q in p]), f"{hint}.qzeros")
    n, k, bits, block = sum(q["n"] for q in p), p[0]["k"], p[0]["bits"], p[0]["block"]
    half = accuracy_level != 0 and not f32
    if not half:
        s = g.op("Cast", [s], to=TensorProto.FLOAT)
    xin = g.op("Cast", [x], to=TensorProto.FLOAT16) if half else x
    y = g.op("MatMulNBits", [xin, b, s, z], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
             accuracy_level=accuracy_level)
    return g.op("Cast", [y], to=TensorProto.FLOAT) if half else y


def gather_if_layer(layer: dict[str, Any], accuracy_level: int, f32: bool = False) -> onnx.ModelProto:
    """The router + ``GatherIfDispatch`` with ``MatMulNBitsProjection`` experts (fused gate_up);
    ``f32``: float32 scales and activations in the products (what accuracy_level 0 does) at any level."""
    g = G()
    dense, selected = router(g, layer, "x")
    counts = g.op("ReduceSum", [selected, g.const([0], np.int64)], keepdims=0)
    active = g.op("Greater", [counts, g.const(0.0)])
    acc = g.op("ConstantOfShape", [g.op("Shape", ["x"])], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    for e, ex in enumerate(layer["experts"]):
        h = f"e{e}"
        e_const = g.const(e, np.int64)
        cond = g.op("Gather", [active, e_const], axis=0)
        outer = g.nodes
        g.nodes = []  # then-branch
        col = g.op("Gather", [selected, e_const], axis=1)
        rows = g.op("Transpose", [g.op("NonZero", [col])], perm=[1, 0])
        flat_rows = g.op("Reshape", [rows, g.const([-1], np.int64)])
        xe = g.op("Gather", ["x", flat_rows], axis=0)
        gate_up = nbits_matmul(g, xe, [ex["gate"], ex["up"]], accuracy_level, f"{h}.gate_up", f32)
        gate, up = g.op("Split", [gate_up], n_out=2, axis=-1, num_outputs=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        y = nbits_matmul(g, act, [ex["down"]], accuracy_level, f"{h}.down", f32)
        w = g.op("Gather", [g.op("Gather", [dense, e_const], axis=1), rows], axis=0)
        y = g.op("Mul", [y, w])
        added = g.op("ScatterND", [acc, rows, g.op("Add", [g.op("GatherND", [acc, rows]), y])])
        then_nodes, g.nodes = g.nodes, []
        kept = g.op("Identity", [acc])
        else_nodes, g.nodes = g.nodes, outer
        branches = {key: helper.make_graph(nodes, f"{h}.{key}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
                    for key, nodes, out in (("then_branch", then_nodes, added), ("else_branch", else_nodes, kept))}
        acc = g.op("If", [cond], **branches)
    return g.model(["x"], [acc], {"x": [None, layer["hidden"]]})


def bit_groups(layer: dict[str, Any]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for e, ex in enumerate(layer["experts"]):
        groups.setdefault(ex["bits"], []).append(e)
    return groups


def qmoe_layer(layer: dict[str, Any], accuracy_level: int, weight_scale_exp: int = 0) -> onnx.ModelProto:
    """The router, then one QMoE per bit-width group fed the group's columns of the dense weights.

    ``weight_scale_exp`` (s): feed ``router_weights * 2**s`` and multiply the sum by ``2**-s``, which
    is exact in float32 (a power of two) and moves the kernel's 1e-8 skip threshold to 1e-8 * 2**-s.
    """
    g = G()
    dense, _ = router(g, layer, "x")
    groups = bit_groups(layer)
    outs = []
    for bits, members in sorted(groups.items()):
        w = dense if len(groups) == 1 else g.op("Gather", [dense, g.const(members, np.int64)], axis=1)
        rw = g.op("Mul", [w, g.const(2.0 ** weight_scale_exp)]) if weight_scale_exp else w
        t = qmoe_weights([layer["experts"][e] for e in members])
        fc1 = g.init(t["fc1"], f"q{bits}.fc1")
        fc2 = g.init(t["fc2"], f"q{bits}.fc2")
        s1 = g.op("Cast", [g.init(t["fc1_scales"], f"q{bits}.fc1_scales")], to=TensorProto.FLOAT)
        s2 = g.op("Cast", [g.init(t["fc2_scales"], f"q{bits}.fc2_scales")], to=TensorProto.FLOAT)
        z1 = g.init(t["fc1_zero_points"], f"q{bits}.fc1_zp")
        z2 = g.init(t["fc2_zero_points"], f"q{bits}.fc2_zp")
        outs.append(g.op("QMoE", ["x", w, fc1, s1, "", fc2, s2, "", "", "", "", z1, z2, "", rw], domain="com.microsoft",
                         k=min(layer["top_k"], len(members)), **qmoe_attributes(bits, layer["block"], accuracy_level)))
    y = outs[0] if len(outs) == 1 else g.op("Sum", outs)
    if weight_scale_exp:
        y = g.op("Mul", [y, g.const(2.0 ** -weight_scale_exp)])
    return g.model(["x"], [y], {"x": [None, layer["hidden"]]})


def router_layer(layer: dict[str, Any]) -> onnx.ModelProto:
    g = G()
    dense, _ = router(g, layer, "x")
    return g.model(["x"], [dense], {"x": [None, layer["hidden"]]})


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def reference(layer: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """float64: softmax router, top-k (lowest index first on ties, as ONNX TopK), SwiGLU experts."""
    x64 = x.astype(np.float64)
    logits = x64 @ layer["router"].T.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :layer["top_k"]]
    w = np.take_along_axis(probs, top, -1)
    if layer["norm"]:
        w /= w.sum(-1, keepdims=True)
    out = np.zeros_like(x64)
    for e, ex in enumerate(layer["experts"]):
        tok, slot = np.nonzero(top == e)
        if len(tok) == 0:
            continue
        xe = x64[tok]
        gate, up = xe @ dequantize(ex["gate"]).T, xe @ dequantize(ex["up"]).T
        out[tok] += w[tok, slot][:, None] * ((gate / (1 + np.exp(-gate)) * up) @ dequantize(ex["down"]).T)
    return out


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------
def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def run_checks(threads: int, big: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    small = {"hidden": 256, "inter": 128, "experts": 16, "top_k": 4}
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 256)).astype(np.float32)
    print("checks (accuracy_level 0, fp32 activations; max |diff| / max |ref|):", flush=True)
    cases = [("4bit norm", {**small, "norm": True}, lambda e: 4, 64),
             ("4bit no-norm", {**small, "norm": False}, lambda e: 4, 64),
             ("mixed 4/2 bs16", {**small, "norm": False}, lambda e: 4 if e % 3 else 2, 16),
             ("mixed 4/8 (QNBIT_GEMM=fp32)", {**small, "norm": True}, lambda e: 8 if e % 2 else 4, 64),
             ("mixed 4/2 bs64 (2-bit LUT)", {**small, "norm": False}, lambda e: 4 if e % 2 else 2, 64)]
    for name, shape, bits_of, block in cases:
        env = "fp32" if "QNBIT_GEMM=fp32" in name else None
        if env:
            os.environ["ORT_QMOE_CPU_QNBIT_GEMM"] = env  # read when the QMoE kernel is created
        layer = random_layer(shape, bits_of, block, seed=11)
        ref = reference(layer, x)
        gi = session(gather_if_layer(layer, 0), threads).run(None, {"x": x})[0]
        qm = session(qmoe_layer(layer, 0), threads).run(None, {"x": x})[0]
        os.environ.pop("ORT_QMOE_CPU_QNBIT_GEMM", None)
        row = {"qmoe_vs_gather_if": rel(qm, gi), "qmoe_vs_fp64": rel(qm, ref), "gather_if_vs_fp64": rel(gi, ref)}
        out[name] = row
        print(f"  {name:30s} qmoe vs gather-if {row['qmoe_vs_gather_if']:.1e}   qmoe vs fp64 {row['qmoe_vs_fp64']:.1e}"
              f"   gather-if vs fp64 {row['gather_if_vs_fp64']:.1e}", flush=True)

    # an expert routed with weight 0 (it only fills one of the k slots) is not computed: its scales are NaN
    layer = random_layer({**small, "norm": False}, lambda e: 4, 64, seed=12)
    dense = np.zeros((9, 16), np.float32)
    dense[:, 0], dense[:, 1] = 0.6, 0.3
    poison = 5
    for part in ("gate", "up", "down"):
        layer["experts"][poison][part]["scales"][:] = np.float16(np.nan)
    probe = {}
    for label, w in (("weight 0", 0.0), ("weight 1e-8", 1e-8), ("weight 2e-8", 2e-8)):
        d = dense.copy()
        d[:, poison] = w
        g = G()
        t = qmoe_weights(layer["experts"])
        ins = ["x", "p", g.init(t["fc1"], "fc1"), g.op("Cast", [g.init(t["fc1_scales"], "s1")], to=TensorProto.FLOAT), "",
               g.init(t["fc2"], "fc2"), g.op("Cast", [g.init(t["fc2_scales"], "s2")], to=TensorProto.FLOAT), "", "", "", "",
               g.init(t["fc1_zero_points"], "z1"), g.init(t["fc2_zero_points"], "z2"), "", "p"]
        y = g.op("QMoE", ins, domain="com.microsoft", k=4, **qmoe_attributes(4, 64, 0))
        res = session(g.model(["x", "p"], [y], {"x": [None, 256], "p": [None, 16]}), threads).run(None, {"x": x, "p": d})[0]
        probe[label] = "computed (NaN in output)" if np.isnan(res).any() else "skipped (output finite)"
        print(f"  NaN-scaled expert routed with {label}: {probe[label]}", flush=True)
    out["zero_weight_probe"] = probe

    # the 1e-8 cut and the power-of-two rescaling that moves it
    layer = random_layer({**small, "norm": False}, lambda e: 4, 64, seed=13)
    layer["router"] *= 60.0  # very peaked softmax: the k-th weight falls below 1e-8 for some tokens
    ref = reference(layer, x)
    plain = session(qmoe_layer(layer, 0), threads).run(None, {"x": x})[0]
    scaled = session(qmoe_layer(layer, 0, weight_scale_exp=40), threads).run(None, {"x": x})[0]
    gi = session(gather_if_layer(layer, 0), threads).run(None, {"x": x})[0]
    logits = x.astype(np.float64) @ layer["router"].T.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kth = np.sort(probs, -1)[:, -layer["top_k"]]
    out["threshold"] = {"tokens_with_weight_below_1e-8": int((kth <= QMOE_SKIP).sum()),
                        "plain_vs_fp64": rel(plain, ref), "scaled_2^40_vs_fp64": rel(scaled, ref),
                        "gather_if_vs_fp64": rel(gi, ref), "plain_vs_gather_if": rel(plain, gi),
                        "scaled_2^40_vs_gather_if": rel(scaled, gi)}
    print(f"  1e-8 cut: {out['threshold']}", flush=True)

    if big:
        for name in ("olmoe", "qwen3"):
            layer = random_layer(SHAPES[name], lambda e: 4, 64, seed=3)
            xb = np.random.default_rng(5).standard_normal((16, layer["hidden"])).astype(np.float32)
            ref = reference(layer, xb)
            for level in (0, 4):  # at 4 gather-if runs float16 activations (float16 scales), QMoE float32
                gi = session(gather_if_layer(layer, level), threads).run(None, {"x": xb})[0]
                qm = session(qmoe_layer(layer, level), threads).run(None, {"x": xb})[0]
                row = {"qmoe_vs_gather_if": rel(qm, gi), "qmoe_vs_fp64": rel(qm, ref), "gather_if_vs_fp64": rel(gi, ref)}
                out[f"{name} full width 4-bit, 16 tokens, accuracy_level {level}"] = row
                print(f"  {name} full width 4-bit, 16 tokens, accuracy_level {level}: "
                      + "  ".join(f"{k} {v:.1e}" for k, v in row.items()), flush=True)
            del layer
    return out


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def build_variant(variant: str, layer: dict[str, Any], accuracy_level: int) -> onnx.ModelProto:
    if variant == "gather-if":
        return gather_if_layer(layer, accuracy_level)
    if variant == "gather-if-f32":
        return gather_if_layer(layer, accuracy_level, f32=True)
    if variant == "qmoe":
        return qmoe_layer(layer, accuracy_level)
    return router_layer(layer)


def time_layer(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    shape_name, bits_of = LAYERS[name]
    t0 = time.perf_counter()
    layer = random_layer(SHAPES[shape_name], bits_of, args.block, seed=1)
    sessions, load_s = {}, {}
    for v in args.variants:
        model = build_variant(v, layer, args.accuracy_level)
        t1 = time.perf_counter()
        sessions[v] = session(model, args.threads)
        load_s[v] = time.perf_counter() - t1
        del model
    del layer
    print(f"{name}: built in {time.perf_counter() - t0:.1f}s; session load s: "
          + ", ".join(f"{v} {s:.1f}" for v, s in load_s.items()), flush=True)
    rng = np.random.default_rng(2)
    rows = []
    for phase, tokens, reps in (("decode", 1, args.reps), ("prefill", args.prefill_tokens, args.prefill_reps)):
        feeds = [{"x": rng.standard_normal((tokens, SHAPES[shape_name]["hidden"])).astype(np.float32)}
                 for _ in range(reps)]  # a different token (so different experts) each repetition
        for v in args.variants:
            sessions[v].run(None, feeds[0])  # warm-up
        per_round: dict[str, list[float]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            order = list(args.variants[r % len(args.variants):]) + list(args.variants[:r % len(args.variants)])
            for v in order:
                times = []
                for f in feeds:
                    t1 = time.perf_counter()
                    sessions[v].run(None, f)
                    times.append((time.perf_counter() - t1) * 1e3)
                per_round[v].append(statistics.median(times))
        first = per_round[args.variants[0]]
        for v in args.variants:
            med = statistics.median(per_round[v])
            paired = [t / f for t, f in zip(per_round[v], first)]  # same round: robust to load drifting between rounds
            rows.append({"layer": name, "phase": phase, "tokens": tokens, "variant": v, "ms": med,
                         "min": min(per_round[v]), "max": max(per_round[v]), "ratio": med / statistics.median(first),
                         "paired_ratio": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired),
                         "load_s": load_s[v], "rounds": per_round[v]})
            print(f"  {phase:8s} {v:14s} {med:9.3f} ms  [{min(per_round[v]):.3f}..{max(per_round[v]):.3f}]"
                  f"  x{statistics.median(paired):.3f} [{min(paired):.3f}..{max(paired):.3f}] of {args.variants[0]}"
                  f" (per-round ratios)", flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), choices=list(LAYERS),
                   help="default: %(default)s; olmoe-2bit / qwen3-2bit isolate the 2-bit kernels")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="timed variants; ratios are to the first (default: all)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=(0, 4),
                   help="MatMulNBits/QMoE accuracy_level (4: int8 activations, the ort-cpu default)")
    p.add_argument("--block", type=int, default=64, help="quantization block (group) size")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=40, help="decode runs per variant per round")
    p.add_argument("--prefill-reps", type=int, default=4, help="prefill runs per variant per round")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--check", action="store_true", help="run the exactness checks first")
    p.add_argument("--check-only", action="store_true", help="run the checks and stop")
    p.add_argument("--check-big", action="store_true", help="also check at the full OLMoE/Qwen3 widths (~1 min)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from dmpq_compile.backends.cost import cpu_flags

    info = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "threads": args.threads,  # noqa: E501
            "loadavg_before": loadavg(), "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"cpu {info['cpu']} ({info['cores']} cores), onnxruntime {ort.__version__}, {args.threads} threads, "
          f"load {info['loadavg_before']}", flush=True)
    result: dict[str, Any] = {"machine": info}
    if args.check or args.check_only:
        result["checks"] = run_checks(args.threads, args.check_big)
    if not args.check_only:
        result["rows"] = [row for name in args.layers for row in time_layer(name, args)]
    info["loadavg_after"] = loadavg()
    print(f"load after {info['loadavg_after']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

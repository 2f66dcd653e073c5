"""Static check of an ONNX model against TensorRT 10.x's documented ONNX support.

:func:`check_model` returns a list of :class:`Issue` (severity, node, rule, message, fix hint).
Sources, all for TensorRT 10.x:

* [OPS] onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 (the latest 10.x table): the
  operator table below (Supported, Supported Types, Restrictions), the opset range ("TensorRT 10.15
  supports operators in the inclusive range of opset 9 to opset 24"; the TensorRT 10.0 edition
  says "opset 9 to opset 20") and the type notes ("INT8, INT4, FP8 and FP4 are treated as
  Quantized Types ... support is available only through quantization"; "UINT8 is only supported as
  network input or output tensor types"; "limited support for DOUBLE ... cast DOUBLE down to FLOAT").
* [LOG] onnx-tensorrt ``docs/Changelog.md``: the release an operator or feature appeared in.
* [PARSER] onnx-tensorrt ``onnxOpImporters.cpp`` ``QuantDequantLinearHelper``: Q/DQ input must not
  be UINT8, scales must be positive build-time constants, zero points all zero, per-channel scales
  1-D with one value per channel, block scales of the input's rank with exactly one blocked axis
  and an integer block size, INT4 tensors with an even element count; in a strongly typed network
  the DQ output type is the scale type.
* [DQ] TensorRT operator docs, ``IDequantizeLayer``: scale "a scalar for per-tensor quantization,
  a 1-D tensor for per-channel quantization, or a 2-D tensor for block quantization (supported for
  DataType::kINT4 only)".
* [QT] TensorRT developer guide, "Working with Quantized Types" / "Explicit Quantization":
  "When using pre-quantized weights, an IDequantizeLayer is required between the weights and the
  linear operator that uses them"; "TensorRT quantizes activations and weights for INT8, FP8, and
  FP4. Weight-only quantization is supported for INT4."
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper, shape_inference

log = logging.getLogger(__name__)

LATEST_10X = (10, 15)
"""The newest TensorRT 10 release whose operators.md table is encoded here; ``"10.x"`` means it."""


def _ops(text: str) -> list[str]:
    return text.split()


F = "FP32 FP16 BF16"
FI = F + " INT32 INT64"
FIB = FI + " BOOL"
# [OPS] Supported Types per operator (None = "N", not supported), TensorRT 10.15.
_TABLE = {
    **dict.fromkeys(_ops("Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv "
                         "ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
                         "GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler "
                         "InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM "
                         "LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
                         "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal "
                         "Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
                         "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"), F),
    **dict.fromkeys(_ops("Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual "
                         "Max Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax "
                         "ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements "
                         "ScatterND Shrink Sign SpaceToDepth Sub Sum TopK"), FI),
    **dict.fromkeys(_ops("Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot "
                         "Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze "
                         "Where"), FIB),
    **dict.fromkeys(_ops("And Not Or Xor"), "BOOL"),
    **dict.fromkeys(_ops("BlackmanWindow HammingWindow HannWindow DeformConv GridSample Mish NonMaxSuppression "
                         "NonZero RoiAlign"), "FP32 FP16"),
    "Attention": F + " INT8 FP8", "Cast": FIB + " UINT8", "CastLike": FIB + " UINT8",
    "Constant": FIB + " FP8 FP4 INT4", "ConstantOfShape": FIB + " FP8 FP4 INT4",
    "DequantizeLinear": "INT8 FP8 FP4 INT4", "Gelu": FI + " INT8", "Mean": FI + " FP8", "STFT": "FP32",
    "TensorScatter": F + " INT32",
    **dict.fromkeys(_ops("AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im "
                         "CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear "
                         "ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial "
                         "NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv "
                         "QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase "
                         "SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence "
                         "StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique"), None),
}
OP_TYPES: dict[str, frozenset[str] | None] = {k: None if v is None else frozenset(v.split()) for k, v in _TABLE.items()}
# [LOG] first 10.x release with the operator (absent: already in 10.0).
OP_SINCE = {"DeformConv": (10, 1), "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
            "STFT": (10, 5), "Attention": (10, 14), "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15),
            "TensorScatter": (10, 15)}
# [OPS] header of each encoded release: (min opset, max opset).
OPSET_RANGE = {(10, 0): (9, 20), (10, 15): (9, 24)}
# [OPS] Restrictions column: inputs that must be build-time constants (op -> input index).
_REDUCE = [f"Reduce{s}" for s in _ops("L1 L2 LogSum LogSumExp Max Mean Min Prod Sum SumSquare")]
CONST_INPUTS = {**dict.fromkeys(_REDUCE, 1), "Squeeze": 1, "Unsqueeze": 1, "CumSum": 1, "OneHot": 1, "TopK": 1,
                "Dropout": 2}
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
PASS_THROUGH = ("Transpose", "Reshape")
QUANTIZED = frozenset({"INT8", "INT4", "FP8", "FP4"})
_TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
               TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
               TensorProto.INT4: "INT4", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
               TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4", TensorProto.DOUBLE: "FP64"}


@dataclass(frozen=True)
class Issue:
    """One finding: ``severity`` is ``"error"`` (TensorRT will refuse it) or ``"warning"``."""

    severity: str
    node: str
    op: str
    rule: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.node else "model"
        fix = f" -- fix: {self.hint}" if self.hint else ""
        return f"{self.severity}: [{self.rule}] {where}: {self.message}{fix}"


def parse_trt_version(text: str) -> tuple[tuple[int, int], bool]:
    """``(major, minor), exact`` for ``"10.x"``, ``"10"``, ``"10.8"``, ``"10.8.0.43"``.

    ``exact`` is False when the release lies between encoded tables (rules then come from the
    changelog and the opset limit from the nearest older table).

    Raises:
        ValueError: Not a TensorRT 10 version.
    """
    m = re.fullmatch(r"\s*(\d+)(?:\.(x|\d+))?(?:\.\d+)*\s*", str(text))
    if not m or int(m.group(1)) != 10:
        raise ValueError(f"trt_version {text!r} is not supported: only TensorRT 10.x tables are encoded "
                         f"(e.g. '10.x' = {LATEST_10X[0]}.{LATEST_10X[1]}, '10.0', '10.8')")
    if m.group(2) in (None, "x"):
        return LATEST_10X, True
    ver = (10, int(m.group(2)))
    return (LATEST_10X, False) if ver > LATEST_10X else (ver, ver in OPSET_RANGE)


def _opset_range(ver: tuple[int, int]) -> tuple[int, int]:
    return OPSET_RANGE[max(v for v in OPSET_RANGE if v <= ver)]


class _Checker:
    def __init__(self, model: onnx.ModelProto, ver: tuple[int, int], exact: bool, base_dir: Path | None) -> None:
        self.model, self.ver, self.exact, self.base_dir = model, ver, exact, base_dir
        self.issues: list[Issue] = []
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.consts = set(self.inits) | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
            for o in n.output:
                self.producer[o] = n
        self.types = self._infer_types()

    def add(self, severity: str, node: onnx.NodeProto | None, rule: str, message: str, hint: str = "") -> None:
        self.issues.append(Issue(severity, node.name if node is not None else "", node.op_type if node else "",
                                 rule, message, hint))

    def _infer_types(self) -> dict[str, int]:
        try:
            g = shape_inference.infer_shapes(self.model, strict_mode=False).graph
        except Exception as e:  # noqa: BLE001 - inference is best effort; types then come from declarations
            log.warning("ONNX shape inference failed (%s); checking declared types only", e)
            g = self.model.graph
        types = {t.name: t.data_type for t in g.initializer}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        return types

    def tname(self, name: str) -> str | None:
        t = self.types.get(name)
        return None if t is None else _TYPE_NAMES.get(t, TensorProto.DataType.Name(t))

    def array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            t = self.inits[name]
            typed = (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data, t.string_data)
            if t.data_location != TensorProto.EXTERNAL and not t.raw_data and not any(typed) and all(t.dims):
                return None  # data not made yet (a deferred initializer of a lowering being emitted)
            if t.data_location == TensorProto.EXTERNAL and not t.raw_data:
                if self.base_dir is None:
                    return None
                t = TensorProto.FromString(t.SerializeToString())  # load a copy, keep the model light
                external_data_helper.load_external_data_for_tensor(t, str(self.base_dir))
            return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def shape(self, name: str) -> list[int] | None:
        if name in self.inits:
            return list(self.inits[name].dims)
        arr = self.array(name)
        return None if arr is None else list(arr.shape)

    # -- rules ---------------------------------------------------------------------------------
    def run(self) -> list[Issue]:
        self.check_opset()
        self.check_tensor_types()
        for node in self.model.graph.node:
            self.check_node(node)
        return self.issues

    def check_opset(self) -> None:
        lo, hi = _opset_range(self.ver)
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
                sev = "error" if self.exact or imp.version < lo else "warning"
                self.add(sev, None, "opset", f"default-domain opset {imp.version} is outside the range {lo}..{hi} "
                         f"documented for TensorRT {self.ver[0]}.{self.ver[1]}",
                         "target a newer TensorRT 10.x (10.15 documents opsets 9..24) or lower the opset")

    def check_tensor_types(self) -> None:
        io = {vi.name for vi in list(self.model.graph.input) + list(self.model.graph.output)}
        for name in self.types:
            tn = self.tname(name)
            if tn == "FP64":
                init = name in self.inits
                self.add("warning" if init else "error", self.producer.get(name), "dtype-double",
                         f"tensor {name!r} is float64; TensorRT has no DOUBLE type"
                         + (" (initializers are cast down with clamping)" if init else ""), "use float32")
            elif tn not in _TYPE_NAMES.values():
                self.add("error", self.producer.get(name), "dtype-unsupported",
                         f"tensor {name!r} has type {tn}, which TensorRT does not support", "cast to a supported type")
            elif tn == "UINT8" and self._is_default_q(name):
                self.add("warning", self.producer[name], "q-uint8-default", f"QuantizeLinear output {name!r} is "
                         "UINT8 by ONNX's default, but TensorRT quantizes it to INT8: the two runtimes disagree",
                         "give QuantizeLinear an INT8 zero point of 0")
            elif tn == "UINT8" and name not in io and not self._only_cast(name):
                self.add("error", self.producer.get(name), "dtype-uint8",
                         f"tensor {name!r} is UINT8, which TensorRT allows only as network input/output",
                         "cast UINT8 network inputs right away; store quantized weights as INT8/INT4")
        for name in self.inits:
            tn = self.tname(name)
            if tn in QUANTIZED:
                for node, port in self.consumers.get(name, []):
                    if node.op_type != "DequantizeLinear" and not (node.op_type == "QuantizeLinear" and port == 2):
                        self.add("error", node, "quantized-type-use", f"{tn} initializer {name!r} feeds "
                                 f"{node.op_type}; quantized types are usable only through DequantizeLinear",
                                 "insert DequantizeLinear between the weight and its consumer")

    def _is_default_q(self, name: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == "QuantizeLinear" and (len(node.input) < 3 or not node.input[2])

    def _only_cast(self, name: str) -> bool:
        users = self.consumers.get(name, [])
        return bool(users) and all(n.op_type == "Cast" for n, _ in users)

    def check_node(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            self.add("error", node, "custom-domain", f"op {node.domain}::{node.op_type} is not an ONNX operator; "
                     "TensorRT would look for a plugin of that name",
                     "lower it to standard ONNX ops or register a TensorRT plugin")
            return
        op = node.op_type
        if op not in OP_TYPES:
            self.add("error", node, "op-unknown", f"{op} is not in TensorRT's ONNX operator table",
                     "replace it with supported ops (see onnx-tensorrt docs/operators.md)")
            return
        if OP_TYPES[op] is None:
            self.add("error", node, "op-unsupported", f"TensorRT does not support {op}",
                     "replace it with supported ops (see onnx-tensorrt docs/operators.md)")
            return
        since = OP_SINCE.get(op)
        if since and self.ver < since:
            self.add("error", node, "op-version", f"{op} needs TensorRT >= {since[0]}.{since[1]}",
                     "target a newer TensorRT or replace the op")
        self.check_input_type(node)
        idx = CONST_INPUTS.get(op)
        if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in self.consts:
            self.add("error", node, "const-input", f"input {idx} ({node.input[idx]!r}) of {op} must be a "
                     "build-time constant (initializer or Constant)", "make it an initializer")
        check = getattr(self, f"check_{op}", None)
        if check is not None:
            check(node)

    def check_input_type(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op in ("Constant", "ConstantOfShape", "DequantizeLinear"):
            return
        idx = 1 if op == "Where" else 0
        if len(node.input) <= idx or not node.input[idx]:
            return
        tn = self.tname(node.input[idx])
        allowed = OP_TYPES[op]
        if tn is not None and tn != "FP64" and allowed is not None and tn not in allowed:
            self.add("error", node, "op-type", f"{op} does not take {tn} inputs (TensorRT supports "
                     f"{', '.join(sorted(allowed))})", "cast the input to a supported type")

    # -- per-op restrictions ([OPS] Restrictions column) -----------------------------------------
    def check_ScatterND(self, node: onnx.NodeProto) -> None:
        red = _attr(node, "reduction", b"none")
        if red not in (b"none", "none"):
            self.add("error", node, "scatternd-reduction", f"ScatterND reduction={_s(red)!r}: TensorRT supports only "
                     "'none'", "scatter each source with unique indices and sum the results")

    def check_ScatterElements(self, node: onnx.NodeProto) -> None:
        red = _attr(node, "reduction", b"none")
        if red not in (b"none", "none"):
            self.add("warning", node, "scatterelements-reduction", f"ScatterElements reduction={_s(red)!r} is "
                     "imported as a TensorRT plugin (ScatterElements plugin), not a core layer",
                     "ship libnvinfer_plugin with the engine, or use reduction 'none'")

    def check_TopK(self, node: onnx.NodeProto) -> None:
        if _attr(node, "sorted", 1) != 1:
            self.add("error", node, "topk-sorted", "TopK sorted must be 1", "set sorted=1")
        k = self.array(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(np.max(k)) >= 3840:
            self.add("error", node, "topk-k", f"TopK K={int(np.max(k))} must be less than 3840", "reduce K")

    def check_QuantizeLinear(self, node: onnx.NodeProto) -> None:
        self._check_zero_point(node)

    def check_DequantizeLinear(self, node: onnx.NodeProto) -> None:
        x, scale_name = node.input[0], node.input[1]
        xt = self.tname(x)
        if (xt == "UINT8" and not self._is_default_q(x)) or (xt is not None and xt not in QUANTIZED | {"UINT8"}):
            self.add("error", node, "dq-input-type", f"DequantizeLinear input is {xt}; TensorRT dequantizes "
                     "INT8, INT4, FP8 and FP4 only (UINT8 is rejected)", "store signed INT8/INT4 codes")
        if scale_name not in self.consts:
            self.add("error", node, "dq-scale-const", "the scale must be a build-time constant",
                     "make it an initializer")
        scale = self.array(scale_name)
        if scale is not None and not np.all(scale.astype(np.float32) > 0):
            self.add("error", node, "dq-scale-positive", "scale coefficients must all be positive",
                     "replace zero/negative scales")
        self._check_zero_point(node)
        self._check_granularity(node, xt)
        if x in self.inits:
            self._check_weight_placement(node, xt)

    def _check_zero_point(self, node: onnx.NodeProto) -> None:
        if len(node.input) < 3 or not node.input[2]:
            return
        zp = self.array(node.input[2])
        if zp is None or np.any(zp.astype(np.int64) != 0):
            self.add("error", node, "qdq-zero-point", "zero point must be a constant of zeros: TensorRT "
                     "quantization is symmetric", "fold the zero point into the weights/scale (see docs/trt-a100.md)")

    def _check_granularity(self, node: onnx.NodeProto, xt: str | None) -> None:
        xs, ss = self.shape(node.input[0]), self.shape(node.input[1])
        if xs is None or ss is None:
            return
        rank, axis, block = len(xs), int(_attr(node, "axis", 1)), int(_attr(node, "block_size", 0))
        axis = axis + rank if axis < 0 else axis
        size = int(np.prod(ss)) if ss else 1
        if xt == "INT4" and int(np.prod(xs)) % 2:
            self.add("error", node, "int4-even", "INT4 tensors need an even number of elements", "pad the weight")
        if block or (size > 1 and len(ss) == rank and rank > 1):
            self._check_block(node, xt, xs, ss, axis, block)
        elif size > 1 and (len(ss) != 1 or not 0 <= axis < rank or ss[0] != xs[axis]):
            self.add("error", node, "dq-per-channel", f"per-channel scale {ss} must be 1-D with one value per "
                     f"channel of axis {axis} of the input {xs}", "fix the scale shape or axis")

    def _check_block(self, node: onnx.NodeProto, xt: str | None, xs: list[int], ss: list[int], axis: int,
                     block: int) -> None:
        if xt != "INT4":
            self.add("error", node, "block-int4-only", f"block quantization (block_size={block}) is supported "
                     f"for INT4 only, not {xt}", "use per-channel scales for INT8 weights")
        if len(xs) != 2 or len(ss) != 2:
            self.add("error", node, "block-2d", f"block quantization needs a 2-D weight and 2-D scale, got "
                     f"{xs} and {ss}", "reshape the weight to [K, N]")
            return
        blocked = [i for i in range(2) if ss[i] != xs[i]]
        if len(blocked) > 1 or (blocked and blocked[0] != axis) or not 0 <= axis < 2:
            self.add("error", node, "block-axis", f"exactly one axis (the 'axis' attribute, {axis}) may be "
                     f"blocked; input {xs}, scale {ss}", "block along K only")
            return
        if block < 1 or xs[axis] % block or ss[axis] * block != xs[axis]:
            self.add("error", node, "block-size", f"block_size={block} does not tile axis {axis} of length "
                     f"{xs[axis]} into the scale's {ss[axis]} blocks", "use a block size that divides K and set "
                     "scale.shape[axis] = K / block_size")

    def _check_weight_placement(self, node: onnx.NodeProto, xt: str | None) -> None:
        out, hops = node.output[0], 0
        while True:
            users = self.consumers.get(out, [])
            if len(users) == 1 and users[0][0].op_type in PASS_THROUGH and hops < 4:
                out, hops = users[0][0].output[0], hops + 1
                continue
            break
        bad = [u for u, i in users if WEIGHT_INPUT.get(u.op_type) != i] or not users
        if bad:
            what = ", ".join(f"{u.op_type} input {i}" for u, i in users) or "nothing"
            self.add("error", node, "dq-weight-placement", f"a dequantized weight must feed the weight input of "
                     f"MatMul/Gemm/Conv (directly or through {'/'.join(PASS_THROUGH)}); it feeds {what}",
                     "connect the DequantizeLinear output to the weight input of the linear op")
            return
        if xt == "INT8":
            for u, i in users:
                act = u.input[1 - i] if u.op_type in ("MatMul", "Gemm") else u.input[0]
                src = self.producer.get(act)
                if src is None or src.op_type != "DequantizeLinear":
                    self.add("warning", u, "int8-weight-only", "INT8 weights without a quantized activation: "
                             "TensorRT documents weight-only quantization for INT4 only, so this GEMM may run "
                             "in floating point on dequantized weights", "add activation Q/DQ or use INT4")


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_model(model: onnx.ModelProto | str | Path, trt_version: str = "10.x") -> list[Issue]:
    """Check an ONNX model (proto or path; external data is not loaded) against TensorRT ``trt_version``.

    Returns:
        Issues, errors first.

    Raises:
        ValueError: ``trt_version`` is not a TensorRT 10 version.
    """
    ver, exact = parse_trt_version(trt_version)
    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not an ONNX file")
        model, base_dir = onnx.load(str(path), load_external_data=False), path.parent
    issues = _Checker(model, ver, exact, base_dir).run()
    return sorted(issues, key=lambda i: i.severity != "error")


def errors(issues: Iterable[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity == "error"]

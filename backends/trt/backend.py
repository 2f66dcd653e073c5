"""The ``trt-a100`` backend: a TensorRT-ready ONNX model (explicit Q/DQ, strongly typed).

``emit`` lowers the IR with the backend-neutral lowering and :class:`~.qdq.TrtQdqProjection`
(INT4 block / INT8 per-channel / FP16 expert weights, written from the stored codes of the
formats the target declares in :mod:`.formats`). The gather dispatch's combine needs no
rewrite: the shared lowering already adds experts with ``ScatterND(reduction="none")`` on each
expert's unique rows (TensorRT 10.x rejects ``reduction="add"``; see ``GatherDispatch``). With
``precision="fp16"`` every other matrix weight (attention, shared experts, embeddings, lm_head)
is stored in FP16 and its GEMM/Gather runs in FP16 between ``Cast`` nodes; routers, norms,
softmax, rotary tables and the KV cache stay FP32 (routing decisions are the most
precision-sensitive part of an MoE model).

The result is checked with :func:`~.compat.check_model` (errors refuse the emit) and
``onnx.checker``, and written as ``model.onnx`` + ``model.onnx.data``. ``dmpq-compile build``
turns it into ``engine.plan`` on a GPU machine (:mod:`.build`).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ir.graph import Graph
from ..base import Backend, BackendError, ExpertCostRow
from ..onnx_io import (
    DATA_FILE,
    MODEL_FILE,
    initializer_bytes,
    io_fields,
    owned_weights,
    quantized_nonexpert_ids,
    require_folder,
    save_checked,
)
from ..onnx_lowering import OPSET, LoweringOptions, lower
from .compat import check_model, errors, parse_trt_version
from .cost import TRT_BITS
from .formats import TRT_WEIGHT_FORMATS
from .qdq import PRECISIONS, TrtQdqProjection, emitted_formats

log = logging.getLogger(__name__)

DEFAULT_TRT_VERSION = "10.x"
TRT_DISPATCHES = ("gather", "dense")  # the lowering's dispatches TensorRT parses (no If, no com.microsoft)


class TrtA100Backend(Backend):
    """TensorRT 10.x on an NVIDIA A100: INT4/INT8/FP16 experts as explicit Q/DQ ONNX."""

    name: ClassVar[str] = "trt-a100"
    supported_bits: ClassVar[tuple[int, ...]] = TRT_BITS
    # llama.cpp's Q4_K_M (about 4.8); INT4 block weights are the smallest this target runs and the
    # embedding stays fp16, so the samples cannot reach it (docs/defaults.md)
    default_budget_bits: ClassVar[float] = 4.8
    description: ClassVar[str] = ("TensorRT 10.x (A100): INT4 block / INT8 per-channel / FP16 experts, "
                                  "strongly typed Q/DQ ONNX; engine built on the GPU with `dmpq-compile build`")

    def cost_table(self, graph: Graph, **options: Any) -> dict[str, dict[int, ExpertCostRow]]:
        """Analytical A100 roofline costs (see :mod:`.cost`); ``group_size`` defaults to the graph's."""
        from .cost import DEFAULT_GROUP_SIZE, trt_a100_cost_table

        options.setdefault("group_size", int(graph.meta.get("group_size", DEFAULT_GROUP_SIZE)))
        options.pop("progress", None)  # analytical: nothing slow to show
        return trt_a100_cost_table(graph, **options)

    def weight_bytes(self, n: int, k: int, bits: int, group_size: int, kind: str | None = None) -> int:
        """INT4/INT8 codes with fp16 scales (and the INT4 zero-point correction), or the fp16
        weight at 16 bits: what :meth:`emit` writes with its default ``precision="fp16"``."""
        from .cost import trt_weight_bytes

        return trt_weight_bytes(n, k, bits, group_size)

    def float_bytes(self, kind: str, role: str) -> int:
        """fp16 for the matrices ``weights_to_fp16`` converts (embedding, float linear weights, the
        shared expert's gate); fp32 for routers, norms and biases."""
        if kind in ("router", "norm") or role in ("q_norm", "k_norm") or role.endswith("_bias"):
            return 4
        return 2

    def weight_format(self, bits: int):
        """4 bits group-wise asymmetric, 8 bits per-channel symmetric INT8 ``[-127, 127]`` (:mod:`.formats`)."""
        return TRT_WEIGHT_FORMATS[bits] if bits in TRT_WEIGHT_FORMATS else super().weight_format(bits)

    def emit(self, graph: Graph, out_dir: Path, *, precision: str = "fp16", dispatch: str = "gather",
             trt_version: str = DEFAULT_TRT_VERSION) -> dict[str, Any]:
        """Write ``model.onnx`` + ``model.onnx.data`` into ``out_dir`` and return manifest fields.

        Args:
            graph: The IR with ``bits`` in (4, 8, 16) on every expert and ``quant`` on 4- and 8-bit
                ones, in the formats :meth:`weight_format` declares.
            out_dir: An existing folder (the artifact writer's temporary folder).
            precision: ``"fp16"`` (FP16 weights and GEMMs) or ``"fp32"``.
            dispatch: ``"gather"`` (each expert computes its own tokens) or ``"dense"``.
            trt_version: TensorRT release to validate against (``"10.x"`` = newest encoded table).

        Raises:
            BackendError: Unsupported bits, bad options, missing quantized tensors or codes of
                another format, or a model TensorRT would reject (the message lists the compat
                errors).
        """
        self.check_bits(graph)
        self.check_formats(graph)
        if precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if dispatch not in TRT_DISPATCHES:  # If (gather-if) and com.microsoft ops (fused) are not for TensorRT
            raise BackendError(f"trt-a100 dispatch must be one of {TRT_DISPATCHES}, got {dispatch!r}")
        try:
            checked_against, _ = parse_trt_version(trt_version)
        except ValueError as e:
            raise BackendError(str(e)) from None
        out_dir = require_folder(out_dir)
        with tempfile.TemporaryFile(dir=out_dir) as spill:  # large eager initializers wait here until written
            projection = TrtQdqProjection(precision)
            lowered = lower(graph, projection, LoweringOptions(dispatch=dispatch, opset=OPSET), defer=True,
                            spill=spill)
            model = lowered.model
            converted = weights_to_fp16(model, keep_fp32_names(graph), lowered.deferred) if precision == "fp16" else 0
            issues = check_model(model, trt_version)
            oldest = "10.0" if not errors(check_model(model, "10.0")) else f"{checked_against[0]}.{checked_against[1]}"
            if errors(issues):
                listed = "\n  ".join(str(i) for i in errors(issues)[:10])
                raise BackendError(f"the emitted model breaks {len(errors(issues))} TensorRT rule(s):\n  {listed}")
            size = initializer_bytes(model)
            path = save_checked(model, out_dir, external=True, deferred=lowered.deferred)
            log.info("emitted %s: %.1f MB weights, precision=%s, dispatch=%s, %d weights fp16",
                     path, size / 1e6, precision, dispatch, converted)
        from .build import default_profile, trtexec_command

        io = io_fields(lowered)
        # weights_to_fp16 renames what it converts (NAME -> NAME.fp16): they keep their owners
        owners = {**lowered.owners, **{f"{k}.fp16": v for k, v in lowered.owners.items()}}
        profile = default_profile(io, int(graph.meta.get("max_position_embeddings") or 4096))
        return {
            "format": "onnx",
            "model_file": MODEL_FILE,
            "external_data_file": DATA_FILE,
            "opset": OPSET,
            "precision": precision,
            "dispatch": lowered.dispatch,
            "strongly_typed": True,
            "weight_bytes": size,
            "weight_formats": emitted_formats(projection),
            "io": io,
            "tensorrt": {"checked_against": f"{checked_against[0]}.{checked_against[1]}", "requested": trt_version,
                         "compat": dict(Counter(f"{i.severity}:{i.rule}" for i in issues))},
            "profile": profile,
            "build": {"command": "dmpq-compile build ARTIFACT", "trtexec": trtexec_command(profile)},
            "engine": None,
            # the oldest encoded TensorRT table the model passes (10.0 documents opsets <= 20 only)
            "requires": {"tensorrt": f">={oldest},<11", "gpu": "NVIDIA A100 (sm_80); engines are GPU-specific"},
            "expert_weights": owned_weights(model, owners, {n.id for n in graph.experts()}),
            "nonexpert_weights": owned_weights(model, owners, quantized_nonexpert_ids(graph)),
        }


def keep_fp32_names(graph: Graph) -> frozenset[str]:
    """Initializer names the fp16 pass leaves alone: the routers' weights (both layouts)."""
    keys = {n.params["weight"] for n in graph.nodes("router")}
    return frozenset(keys | {f"{k}.T" for k in keys})


# -- model rewrites -----------------------------------------------------------------------------
def weights_to_fp16(model: onnx.ModelProto, keep: frozenset[str] = frozenset(),
                    deferred: dict | None = None) -> int:
    """Store fp32 matrix weights of ``MatMul``/``Gemm`` (B, C) and ``Gather`` (data) as fp16.

    The op then runs in fp16: its activation input is cast to fp16 and its output back to fp32,
    so the rest of the graph is unchanged. Initializers named in ``keep`` stay fp32. A deferred
    initializer (``deferred``, see ``Builder.add_deferred``) is re-declared as fp16 and converted
    when it is written (its range is checked then).

    Returns:
        The number of nodes converted.

    Raises:
        BackendError: A weight does not fit in fp16.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    slots = {"MatMul": (1,), "Gemm": (1, 2), "Gather": (0,)}

    def convertible(node: onnx.NodeProto) -> bool:
        if node.op_type not in slots or node.input[slots[node.op_type][0]] in keep:
            return False
        t = inits.get(node.input[slots[node.op_type][0]])
        return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2

    fp16_names: dict[str, str] = {}
    casts: dict[str, str] = {}
    new_nodes, count = [], 0
    for node in g.node:
        if not convertible(node):
            new_nodes.append(node)
            continue
        inputs = list(node.input)
        for i, name in enumerate(inputs):
            if not name:
                continue
            if i in slots[node.op_type] and name in inits and inits[name].data_type == TensorProto.FLOAT:
                inputs[i] = fp16_names.setdefault(name, _fp16_initializer(g, inits[name], deferred))
            elif node.op_type != "Gather":  # activation operand of MatMul/Gemm
                if name not in casts:
                    casts[name] = f"{name}.fp16"
                    new_nodes.append(helper.make_node("Cast", [name], [casts[name]], name=f"{name}.to_fp16",
                                                      to=TensorProto.FLOAT16))
                inputs[i] = casts[name]
        out = node.output[0]
        del node.input[:]
        node.input.extend(inputs)
        node.output[0] = f"{out}.fp16"
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], name=f"{node.name}.to_fp32",
                                          to=TensorProto.FLOAT))
        count += 1
    _replace_nodes(g, new_nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return count


def _fp16_initializer(g: onnx.GraphProto, t: TensorProto, deferred: dict | None = None) -> str:
    name = f"{t.name}.fp16"
    if deferred is not None and t.name in deferred:
        copy = g.initializer.add()
        copy.name, copy.data_type = name, TensorProto.FLOAT16
        copy.dims.extend(t.dims)
        deferred[name] = deferred.pop(t.name)
        return name
    arr = numpy_helper.to_array(t)
    if np.abs(arr).max(initial=0.0) > float(np.finfo(np.float16).max):
        raise BackendError(f"weight {t.name!r} has values beyond the fp16 range; emit with precision='fp32'")
    g.initializer.append(numpy_helper.from_array(arr.astype(np.float16), name))
    return name


def _replace_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Set the graph's nodes, dropping nodes none of whose outputs are used (dead Concats)."""
    outputs = {o.name for o in g.output}
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]  # detach before clearing g.node
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del g.node[:]
    g.node.extend(nodes)

"""Writing an ONNX model into an artifact folder: the external-data decision, saving, the
``onnx.checker`` gate, and the byte count of ONNX weights.

Every producer of an ONNX artifact (both backends' ``emit`` and the ORT-quantizer peer baseline)
goes through these functions, so the 2 GB rule, the manifest's file fields and each expert's
recorded bytes are stated once. The file names themselves (``MODEL_FILE``, ``DATA_FILE``) live in
:mod:`dmpq_compile.fileio`, which the runtime can import without onnx.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..fileio import DATA_FILE, MODEL_FILE
from .base import BackendError

PROTOBUF_LIMIT = 1_800_000_000  # stay clear of protobuf's 2 GiB message limit
DEFAULT_EXTERNAL_MB = 16.0  # weights above this stream to DATA_FILE (below: one model.onnx) unless the caller decides


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (each as :func:`tensor_bytes` counts it)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


_PACKED_4BIT = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                         if hasattr(onnx.TensorProto, n))  # two elements per byte


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Stored bytes of one initializer: the ``length`` of its external data, else its ``raw_data``,
    else (data not made yet, see :func:`save_model`'s ``deferred``) elements x item size, 4-bit
    types packed two to a byte. The one byte count of every ONNX weight, on disk or in memory."""
    external = {e.key: e.value for e in t.external_data}
    if t.data_location == onnx.TensorProto.EXTERNAL and "length" in external:
        return int(external["length"])
    if t.raw_data:
        return len(t.raw_data)
    if not t.dims:
        return 0
    count = int(np.prod(t.dims))
    if t.data_type in _PACKED_4BIT:
        return -(-count // 2)
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def owned_weights(model: onnx.ModelProto, owners: Mapping[str, Any],
                  keep: Container[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{owner: {"tensors": [initializer names], "bytes": their stored bytes}}``.

    ``owners`` maps initializer names to who they belong to (an expert's IR node id, from
    :attr:`Builder.owners`), or to a tuple of ids for a tensor that stacks several experts of the
    same size (a fused MoE op's weights), whose bytes each of them gets an equal share of, or to
    ``{id: weight}`` for a tensor that concatenates experts of different sizes (``MixedMoE``'s
    codes, 2/4/8 bits), whose bytes are shared in proportion to the weights;
    ``keep`` restricts the result to those owners. Call it on the model that :func:`save_model`
    wrote, so the bytes are what is on disk. This is what the manifest records per expert, and what
    the bench and the allocator's hardware measurement read.
    """
    out: dict[str, dict[str, Any]] = {}
    for t in model.graph.initializer:
        owner = owners.get(t.name)
        shares = {} if owner is None else {owner: 1} if isinstance(owner, str) else \
            dict(owner) if isinstance(owner, Mapping) else dict.fromkeys(owner, 1)
        total = sum(shares.values())
        for key, weight in shares.items():
            if keep is not None and key not in keep:
                continue
            entry = out.setdefault(key, {"tensors": [], "bytes": 0})
            entry["tensors"].append(t.name)
            entry["bytes"] += tensor_bytes(t) * weight // total
    return out


def quantized_nonexpert_ids(graph: Any) -> set[str]:
    """Ids of the non-expert nodes the ``precision`` policy gave fewer than 16 bits (whose tensors
    the manifest's ``nonexpert`` entries list with their bytes)."""
    from ..ir.graph import NONEXPERT_QUANTIZABLE_KINDS

    return {n.id for n in graph.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS and n.ann.get("bits", 16) < 16}


def use_external(external_data: bool | None, size: int, threshold_mb: float = DEFAULT_EXTERNAL_MB) -> bool:
    """Whether ``size`` weight bytes go to :data:`DATA_FILE`.

    Args:
        external_data: force (True) or forbid (False); None decides by size.
        size: the model's weight bytes.
        threshold_mb: with ``external_data=None``, weights above this many MB go external.

    Raises:
        BackendError: external data forbidden for weights over the protobuf limit, or a
            negative threshold.
    """
    if external_data is False and size > PROTOBUF_LIMIT:
        raise BackendError(f"the weights take {size / 1e9:.2f} GB, over protobuf's 2 GB limit for one file; "
                           "allow external data (external_data=None or True)")
    if external_data is not None:
        return external_data
    if threshold_mb < 0:
        raise BackendError(f"external_data_threshold_mb must be >= 0, got {threshold_mb}")
    return size > threshold_mb * 1e6 or size > PROTOBUF_LIMIT


def require_folder(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; refuses anything but an existing folder (the writer makes it)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BackendError(f"{out_dir} is not a folder; the artifact writer creates it before emit")
    return out_dir


EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside model.onnx
ALIGN = 4096  # external tensors start at page boundaries (onnxruntime can map them)


def save_model(model: onnx.ModelProto, folder: str | Path, *, external: bool,
               deferred: Mapping[str, Callable[[], np.ndarray]] | None = None) -> Path:
    """Write ``folder/model.onnx``; with ``external``, tensors over 1 KiB go to ``model.onnx.data``.

    ``deferred`` (from :meth:`Builder.add_deferred`) maps initializer names to functions making
    their data; each is called once, converted to the proto's element type, written and
    dropped, so writing holds one tensor at a time whatever the model's size. The ModelProto
    itself never carries the external tensors' bytes (no 2 GB protobuf limit).
    """
    path = Path(folder) / MODEL_FILE
    deferred = dict(deferred or {})
    if not external:
        for t in model.graph.initializer:
            if t.name in deferred:
                t.raw_data = _bytes(_as_proto_type(deferred.pop(t.name)(), t))
        onnx.save_model(model, str(path))
        return path
    with open(Path(folder) / DATA_FILE, "wb") as f:
        for t in model.graph.initializer:
            if t.name in deferred:
                data = _buffer(_as_proto_type(deferred.pop(t.name)(), t))
                if len(data) < EXTERNAL_MIN_BYTES:  # small constants stay inline (shape inference reads them)
                    t.raw_data = bytes(data)
                    continue
            elif t.raw_data and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                data = t.raw_data
            else:
                continue
            f.seek(-f.tell() % ALIGN, 1)
            offset = f.tell()
            f.write(data)
            t.ClearField("raw_data")
            del t.external_data[:]
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=k, value=v)
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(path))
    return path


def _bytes(data: np.ndarray | bytes) -> bytes:
    return data if isinstance(data, bytes) else data.tobytes()


def _buffer(data: np.ndarray | bytes) -> bytes | memoryview:
    """``data``'s bytes without a copy where it is an array (``len`` is its size in bytes)."""
    return data if isinstance(data, bytes) else memoryview(np.ascontiguousarray(data)).cast("B")


def _as_proto_type(arr: np.ndarray | bytes, t: onnx.TensorProto) -> np.ndarray | bytes:
    if isinstance(arr, bytes):  # already in the proto's storage format (e.g. packed INT4)
        return arr
    want = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    arr = np.asarray(arr)
    if tuple(arr.shape) != tuple(t.dims):
        raise BackendError(f"initializer {t.name!r}: made {arr.shape}, declared {tuple(t.dims)} (a lowering bug)")
    if arr.dtype != want:
        if want == np.float16 and np.abs(arr).max(initial=0.0) > float(np.finfo(np.float16).max):
            raise BackendError(f"initializer {t.name!r} has values beyond fp16's range; keep it fp32")
        arr = arr.astype(want)
    return np.ascontiguousarray(arr)


def save_checked(model: onnx.ModelProto, folder: str | Path, *, external: bool,
                 deferred: Mapping[str, Callable[[], np.ndarray]] | None = None) -> Path:
    """:func:`save_model`, then ``onnx.checker`` (full check) on the written file.

    Raises:
        BackendError: the checker rejects the written model.
    """
    path = save_model(model, folder, external=external, deferred=deferred)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise BackendError(f"the emitted ONNX model fails onnx.checker: {e}") from e
    return path


def custom_domains(model: onnx.ModelProto) -> dict[str, int]:
    """``{domain: version}`` of the model's non-default opset imports (e.g. com.microsoft)."""
    return {d.domain: d.version for d in model.opset_import if d.domain not in ("", "ai.onnx")}


def file_fields(model: onnx.ModelProto, external: bool) -> dict[str, Any]:
    """The manifest's target fields that describe a model saved by :func:`save_model`: format, file
    names (``external_data_file`` None for a single file), default-domain opset, custom domains."""
    return {"format": "onnx", "model_file": MODEL_FILE, "external_data_file": DATA_FILE if external else None,
            "opset": next(d.version for d in model.opset_import if d.domain in ("", "ai.onnx")),
            "custom_domains": custom_domains(model)}


def io_fields(lowered: Any) -> dict[str, Any]:
    """The manifest's ``io`` entry of a lowered model: input/logits names, KV-cache specs and the optional
    ``logits_to_keep`` input (None where the graph has none: every position's logits)."""
    io = {"input_ids": lowered.input_ids, "logits": lowered.logits, "logits_to_keep": lowered.logits_to_keep,
          "kv_cache": [asdict(kv) for kv in lowered.kv_cache]}
    if lowered.attention_mask:  # the genai contract (LoweringOptions.genai); absent from other graphs' manifests
        io["attention_mask"] = lowered.attention_mask
    return io


def decoder_feed(session: Any, ids: np.ndarray, past: Sequence[np.ndarray] | None = None,
                 logits_to_keep: int = 0) -> dict[str, np.ndarray]:
    """A feed for an ``onnxruntime.InferenceSession`` of a lowered decoder, by its input names:
    ``input_ids``, the KV inputs in the session's order (``past``, or empty caches), and where the graph
    has them an ``attention_mask`` of ones (no padding) and ``logits_to_keep`` (default 0: every
    position). For tests and benchmarks that drive a model file without the runtime."""
    ids = np.asarray(ids, dtype=np.int64)
    kv_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feed: dict[str, np.ndarray] = {"input_ids": ids}
    for j, inp in enumerate(kv_inputs):
        feed[inp.name] = past[j] if past is not None else \
            np.zeros((ids.shape[0], inp.shape[1], 0, inp.shape[3]), np.float32)
    names = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    if "attention_mask" in names:
        cached = int(feed[kv_inputs[0].name].shape[2]) if kv_inputs else 0
        feed["attention_mask"] = np.ones((ids.shape[0], cached + ids.shape[1]), np.int64)
    if "logits_to_keep" in names:
        feed["logits_to_keep"] = np.array(logits_to_keep, np.int64)
    return feed

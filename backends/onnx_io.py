"""Writing an ONNX model into an artifact folder: the one place for the file names, the
external-data decision, saving and the ``onnx.checker`` gate.

Every producer of an ONNX artifact (both backends' ``emit`` and the ORT-quantizer peer baseline)
goes through these functions, so ``model.onnx`` / ``model.onnx.data`` and the 2 GB rule are
stated once.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .base import BackendError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PROTOBUF_LIMIT = 1_800_000_000  # stay clear of protobuf's 2 GiB message limit
DEFAULT_EXTERNAL_MB = 100.0  # weights above this go to DATA_FILE unless the caller decides


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (``raw_data`` where set, else element count x item size)."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    if not t.dims:
        return 0
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims)) * itemsize


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


def save_model(model: onnx.ModelProto, folder: str | Path, *, external: bool) -> Path:
    """Write ``folder/model.onnx`` (tensors over 1 KiB to ``model.onnx.data`` when ``external``)."""
    path = Path(folder) / MODEL_FILE
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def save_checked(model: onnx.ModelProto, folder: str | Path, *, external: bool) -> Path:
    """:func:`save_model`, then ``onnx.checker`` (full check) on the written file.

    Raises:
        BackendError: the checker rejects the written model.
    """
    path = save_model(model, folder, external=external)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise BackendError(f"the emitted ONNX model fails onnx.checker: {e}") from e
    return path


def custom_domains(model: onnx.ModelProto) -> dict[str, int]:
    """``{domain: version}`` of the model's non-default opset imports (e.g. com.microsoft)."""
    return {d.domain: d.version for d in model.opset_import if d.domain not in ("", "ai.onnx")}


def io_fields(lowered: Any) -> dict[str, Any]:
    """The manifest's ``io`` entry of a lowered model: input/logits names and KV-cache specs."""
    return {"input_ids": lowered.input_ids, "logits": lowered.logits,
            "kv_cache": [asdict(kv) for kv in lowered.kv_cache]}

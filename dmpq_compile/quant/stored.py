"""Quantized tensors as they live in a weight store: codes bit-packed along K, scales, zeros.

The ``quant`` annotation of a node records, per role (gate/up/down), the store keys of the
packed codes ``[N, ceil(K*bits/8)]`` (uint8, LSB-first, see :mod:`.packing`), scales
``[N, G]`` (float32) and zero points ``[N, G]`` (uint8), with the :class:`QuantSpec` that made
them. Backends read exactly these tensors, and the interpreter dequantizes them, so the
reference and the artifact see the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .packing import pack_bits, unpack_bits
from .rtn import QuantizedTensor, dequantize
from .spec import QuantSpec


def store_quantized(weights: Any, prefix: str, qt: QuantizedTensor) -> dict[str, Any]:
    """Add ``qt`` to ``weights`` under ``prefix.{q,scale,zero}`` (replacing old ones) and return the entry."""
    if len(qt.shape) != 2:
        raise ValueError(f"{prefix}: only 2-D weights [N, K] are stored, got shape {qt.shape}")
    packed = torch.from_numpy(pack_bits(qt.q.cpu().numpy(), qt.spec.bits))  # [N, ceil(K*b/8)]
    entry = {
        "q": f"{prefix}.q",
        "scale": f"{prefix}.scale",
        "zero": f"{prefix}.zero",
        "shape": list(qt.shape),
    }
    for name, tensor in (("q", packed), ("scale", qt.scale.cpu()), ("zero", qt.zero.cpu())):
        if entry[name] in weights:
            weights.remove(entry[name])
        weights.add(entry[name], tensor.contiguous())
    return entry


def load_quantized(weights: Any, quant: Mapping[str, Any], role: str) -> QuantizedTensor:
    """Rebuild the :class:`QuantizedTensor` of one role from a ``quant`` annotation."""
    spec = QuantSpec.from_dict(quant["spec"])
    entry = quant["tensors"][role]
    n, k = entry["shape"]
    q = torch.from_numpy(unpack_bits(weights[entry["q"]].numpy(), spec.bits, k))
    return QuantizedTensor(
        q=q, scale=weights[entry["scale"]], zero=weights[entry["zero"]], spec=spec, shape=(n, k)
    )


def dequantize_stored(weights: Any, quant: Mapping[str, Any], role: str) -> torch.Tensor:
    """float32 ``[N, K]`` weights of one role, exactly as the backends will see them."""
    return dequantize(load_quantized(weights, quant, role))

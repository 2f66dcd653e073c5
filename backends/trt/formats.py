"""The weight formats the ``trt-a100`` target declares, per bit-width.

TensorRT's explicit quantization is symmetric and its block quantization is INT4-only
(:mod:`.qdq` cites both), so:

* 4 bits: group-wise asymmetric codes, the compile's ``group_size`` along K. TensorRT runs them
  exactly as symmetric INT4 blocks plus a zero-point correction GEMM (:mod:`.qdq`).
* 8 bits: per-output-channel symmetric narrow-range INT8, codes in ``[-127, 127]``: TensorRT's
  per-channel INT8 ``DequantizeLinear``, written from the stored codes unchanged.
* 16 bits: not quantized (FP16 or FP32 weights).

The ``quantize`` and ``sensitivity`` passes, the reference interpreter and the cost table
(:mod:`.cost`) all use these, so what the allocator measured is what the backend emits.
"""

from __future__ import annotations

from ...quant.formats import WeightFormat

TRT_WEIGHT_FORMATS: dict[int, WeightFormat] = {
    4: WeightFormat(4),
    8: WeightFormat(8, symmetric=True, per_channel=True),
    16: WeightFormat(16),
}

"""Quantization kernels shared by the ``quantize`` pass, the reference interpreter, QAT and
the ONNX backends.

Public API:
    :class:`QuantSpec` -- bits / group_size / scheme / method, serialisable.
    :class:`WeightFormat`, :func:`declare_formats`, :func:`declared_format` -- the format a
        target runs per bit-width, as recorded in ``graph.meta`` (see :mod:`.formats`).
    :class:`QuantizedTensor`, :func:`quantize`, :func:`dequantize` -- round-to-nearest
        quantization, group-wise affine asymmetric or per-channel symmetric (see :mod:`.rtn`).
    :func:`fake_quantize`, :func:`fake_quantize_spec`, :func:`fake_quantize_ste`,
        :func:`init_scale_multiplier` -- fake quantization for evaluation and quantization-aware
        training.
    :func:`pack_bits`, :func:`unpack_bits`, :func:`packed_size` -- LSB-first bit packing.
    :func:`gptq_quantize`, :func:`accumulate_hessian`, :func:`output_error` -- GPTQ
        Hessian-aware rounding (needs calibration activations).
    :func:`hqq_quantize`, :class:`HQQConfig` -- calibration-free HQQ zero/scale optimisation.
"""

from dmpq_compile.quant.formats import WeightFormat, declare_formats, declared_format
from dmpq_compile.quant.gptq import accumulate_hessian, gptq_quantize, output_error
from dmpq_compile.quant.hqq import HQQConfig, hqq_quantize
from dmpq_compile.quant.packing import pack_bits, packed_size, unpack_bits
from dmpq_compile.quant.rtn import (
    QuantizedTensor,
    dequantize,
    fake_quantize,
    fake_quantize_change,
    fake_quantize_spec,
    fake_quantize_ste,
    init_scale_multiplier,
    num_groups,
    quantize,
)
from dmpq_compile.quant.spec import SPEC_VERSION, VALID_BITS, VALID_METHODS, VALID_SCHEMES, QuantSpec

__all__ = [
    "SPEC_VERSION",
    "VALID_BITS",
    "VALID_METHODS",
    "VALID_SCHEMES",
    "HQQConfig",
    "QuantSpec",
    "QuantizedTensor",
    "WeightFormat",
    "accumulate_hessian",
    "declare_formats",
    "declared_format",
    "dequantize",
    "fake_quantize",
    "fake_quantize_change",
    "fake_quantize_spec",
    "fake_quantize_ste",
    "gptq_quantize",
    "hqq_quantize",
    "init_scale_multiplier",
    "num_groups",
    "output_error",
    "pack_bits",
    "packed_size",
    "quantize",
    "unpack_bits",
]

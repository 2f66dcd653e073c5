"""ONNX Runtime CPU backend (``ort-cpu``): see :class:`OrtCpuBackend` and ``docs/ort-cpu.md``.

Importing this package does not import onnxruntime; only the runtime and cost measurements do.
"""

from ..onnx_io import DATA_FILE, MODEL_FILE
from .backend import OrtCpuBackend
from .matmulnbits import MatMulNBitsProjection, NBitsWeight, pack_weight

__all__ = ["DATA_FILE", "MODEL_FILE", "MatMulNBitsProjection", "NBitsWeight", "OrtCpuBackend", "pack_weight"]

"""Settings of the ORT-quantizer peer baseline and the errors it raises (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass

ALGOS = ("default", "hqq")
SCOPES = ("all", "experts")
QUANT_BITS = (2, 4, 8)
EXPORT_ONLY = 16  # bits=16: export without quantizing (an fp32 torch.onnx artifact)
BLOCK_SIZES = (16, 32, 64, 128, 256)


class BaselineError(RuntimeError):
    """The baseline cannot be built for this model or these settings; the message says why."""


class ExportMismatchError(BaselineError):
    """The exported ONNX graph computes other logits than the PyTorch model it came from."""


@dataclass(frozen=True)
class OrtQuantizerConfig:
    """Settings of the ORT-quantizer peer baseline.

    Defaults follow dmpq-compile's ``ort-cpu`` defaults (group size 64, asymmetric codes,
    ``accuracy_level`` 4), so that the peer and a compiled artifact differ only in the graph
    and the rounding. ORT's own defaults are block size 128 and ``accuracy_level`` unset (0).
    """

    bits: int = 4  # 2, 4 or 8; 16 = export only, no quantization
    block_size: int = 64
    is_symmetric: bool = False
    accuracy_level: int = 4  # MatMulNBits accuracy_level: 0 = fp32 activations, 4 = int8 activations
    algo: str = "default"  # "default" (RTN-style min/max) or "hqq"
    scope: str = "all"  # "all" MatMuls with constant weights, or "experts" only
    opset: int = 21
    calib_corpus: str | None = "pydoc"  # text for the routing-frequency profile; None: assume uniform
    calib_sequences: int = 32
    seq_len: int = 128
    tolerance: float = 1e-4  # export check: max |onnx - torch| <= tolerance * max(1, max |torch|)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS + (EXPORT_ONLY,):
            raise BaselineError(f"bits must be one of {QUANT_BITS} (MatMulNBits) or {EXPORT_ONLY} (export only), "
                                f"got {self.bits!r}")
        if self.block_size not in BLOCK_SIZES:
            raise BaselineError(f"block_size must be one of {BLOCK_SIZES} (a power of two >= 16, which "
                                f"MatMulNBits needs), got {self.block_size!r}")
        if self.algo not in ALGOS:
            raise BaselineError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.scope not in SCOPES:
            raise BaselineError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise BaselineError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        if self.algo == "hqq" and self.is_symmetric:
            raise BaselineError("ORT's HQQ quantizer has no symmetric mode; drop is_symmetric / --symmetric")
        if not self.tolerance > 0:
            raise BaselineError(f"tolerance must be > 0, got {self.tolerance!r}")


DEFAULT_CONFIG = OrtQuantizerConfig()

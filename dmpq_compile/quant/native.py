"""Group-wise affine RTN in C++ (``csrc/rtn.cc``): scales, zero points, codes and fake-quantized weights in one
pass per group, bit-identical to :mod:`.rtn`'s torch path, which stays the reference and the fallback.

The sensitivity pass fake-quantizes every expert at every measured bit-width and the quantize pass quantizes it
once: at the OLMoE-1B-7B shape that is about 3 billion weights, which the torch path reads and writes eight
times or so (each op of ``affine_params`` and ``quantize_codes`` is a pass over the tensor). Here each group
is read once and each output written once, on the calling thread.

The sensitivity pass prices each of those fake quantizations in bf16 products from the change of the weights:
:func:`affine_change` makes the change, the fake-quantized weights and the change's sum of squares in bf16 in
the same one pass (torch took a pass per op and a float32 weight-sized tensor each: 16.7 against 8.7 ms an
OLMoE expert and width with the products, on a 2-core Xeon with AMX).

The library is compiled the first time a process asks for it (``dmpq_compile.native``, ``-march=native``:
it runs where it was built and is never shipped), and cached like the kernel library. Where it cannot be built
(no compiler, not Linux x86-64) or ``DMPQ_NATIVE_RTN=0`` asks, :func:`affine` returns None and the caller runs
the torch path; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LIBRARY = "libdmpq_rtn.so"
SOURCES = ("rtn.cc",)
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-march=native", "-ffp-contract=off", "-fno-math-errno",
         "-fvisibility=hidden", "-Wall", "-Wno-uninitialized", "-Wno-maybe-uninitialized")

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or "error": why there is none


def enabled() -> bool:
    return os.environ.get("DMPQ_NATIVE_RTN", "1") != "0"


def _library() -> ctypes.CDLL | None:
    if "lib" in _state or "error" in _state:
        return _state.get("lib")
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        from ..native import NativeBuildError, build_library

        try:
            path = build_library(LIBRARY, Path(__file__).resolve().parent / "csrc", SOURCES, FLAGS,
                                 "dmpq's RTN library", native_cpu=True)
            lib = ctypes.CDLL(str(path))
        except (NativeBuildError, OSError) as e:
            _state["error"] = str(e)
            log.info("RTN runs in torch (slower, the same values): %s", e)
            return None
        f = lib.dmpq_rtn_affine
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        f = lib.dmpq_rtn_affine_change
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
        _state["lib"] = lib
        return lib


def available() -> bool:
    """Whether :func:`affine` runs natively in this process (building the library if needed)."""
    return enabled() and _library() is not None


def _runnable(w: torch.Tensor, bits: int) -> ctypes.CDLL | None:
    """The library, where it runs ``w`` at ``bits`` (enabled, built, a non-empty CPU tensor, 1-8 bits); else None."""
    if not enabled() or not 1 <= bits <= 8 or w.numel() == 0 or w.device.type != "cpu":
        return None
    return _library()


def _rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` as the library reads it: ``[rows, K]``, contiguous (bfloat16 rows are widened there, exactly)."""
    return w.detach().contiguous().reshape(-1, w.shape[-1])


def affine(w: torch.Tensor, group: int, bits: int, scale_f16: bool, codes: bool = False, fake: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(scale, zero, codes, fake)`` of ``w`` (``[..., K]``) in groups of ``group`` along K: scale and zero
    float32 ``[..., G]``, codes uint8 ``[..., K]`` when asked, the dequantized weights float32 ``[..., K]`` when
    asked; None where the native path does not run (the caller runs torch, which also raises the errors: a
    NaN or infinite weight, a scale above float16's range)."""
    lib = _runnable(w, bits)
    if lib is None:
        return None
    k = w.shape[-1]
    x = _rows(w if w.dtype == torch.bfloat16 else w.to(torch.float32))
    rows, groups = x.shape[0], -(-k // group)
    scale = torch.empty((rows, groups), dtype=torch.float32)
    zero = torch.empty((rows, groups), dtype=torch.float32)
    q = torch.empty((rows, k), dtype=torch.uint8) if codes else None
    f = torch.empty((rows, k), dtype=torch.float32) if fake else None

    # one call on this thread: a pool of its own would share the cores with torch's OpenMP workers, which
    # spin for a while after each op (slower in a compile's mix of products and quantization)
    status = lib.dmpq_rtn_affine(x.data_ptr(), int(x.dtype == torch.bfloat16), rows, k, group, bits, int(scale_f16),
                                 scale.data_ptr(), zero.data_ptr(), None if q is None else q.data_ptr(),
                                 None if f is None else f.data_ptr())
    if status != 0:
        return None
    lead = w.shape[:-1]
    return (scale.reshape(*lead, groups), zero.reshape(*lead, groups),
            None if q is None else q.reshape(*lead, k), None if f is None else f.reshape(*lead, k))


def affine_change(w: torch.Tensor, group: int, bits: int, scale_f16: bool, fake: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """``(change, fake, sum of squares)`` of :func:`affine`'s fake quantization of ``w`` (``[..., K]``, float32
    or bfloat16), as the sensitivity pass prices it in bf16 products: ``change`` is the fake-quantized weights
    minus ``w``, computed in float32 and rounded to bfloat16 (as torch's ``.to(torch.bfloat16)`` rounds it),
    ``fake`` the fake-quantized weights in bfloat16 when asked, and the sum of the squared float32 changes (a
    double). One pass per row, where the torch ops it replaces read and write each weight-sized tensor once per
    op (fake quantization, difference, square sum, two roundings). None where the native path does not run."""
    lib = _runnable(w, bits) if w.dtype in (torch.float32, torch.bfloat16) else None
    if lib is None:
        return None
    k = w.shape[-1]
    x = _rows(w)
    change = torch.empty(x.shape, dtype=torch.bfloat16)
    dq = torch.empty(x.shape, dtype=torch.bfloat16) if fake else None
    total = ctypes.c_double(0.0)
    status = lib.dmpq_rtn_affine_change(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], k, group, bits,
                                        int(scale_f16), change.data_ptr(), None if dq is None else dq.data_ptr(),
                                        ctypes.byref(total))
    if status != 0:
        return None
    return change.reshape(w.shape), None if dq is None else dq.reshape(w.shape), total.value

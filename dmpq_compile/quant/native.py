"""Group-wise affine RTN in C++ (``csrc/rtn.cc``): scales, zero points, codes and fake-quantized weights in one
pass per group, bit-identical to :mod:`.rtn`'s torch path, which stays the reference and the fallback.

The sensitivity pass fake-quantizes every expert at every measured bit-width and the quantize pass quantizes it
once: at the OLMoE-1B-7B shape that is about 3 billion weights, which the torch path reads and writes eight
times or so (each op of ``affine_params`` and ``quantize_codes`` is a pass over the tensor). Here each group
is read once and each output written once, on the calling thread.

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
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _state["lib"] = lib
        return lib


def available() -> bool:
    """Whether :func:`affine` runs natively in this process (building the library if needed)."""
    return enabled() and _library() is not None


def affine(w: torch.Tensor, group: int, bits: int, scale_f16: bool, codes: bool = False, fake: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(scale, zero, codes, fake)`` of ``w`` (``[..., K]``) in groups of ``group`` along K: scale and zero
    float32 ``[..., G]``, codes uint8 ``[..., K]`` when asked, the dequantized weights float32 ``[..., K]`` when
    asked; None where the native path does not run (the caller runs torch, which also raises the errors: a
    NaN or infinite weight, a scale above float16's range)."""
    if not enabled() or not 1 <= bits <= 8 or w.numel() == 0 or w.device.type != "cpu":
        return None
    lib = _library()
    if lib is None:
        return None
    k = w.shape[-1]
    x = w.detach().to(torch.float32).contiguous().reshape(-1, k)
    rows, groups = x.shape[0], -(-k // group)
    scale = torch.empty((rows, groups), dtype=torch.float32)
    zero = torch.empty((rows, groups), dtype=torch.float32)
    q = torch.empty((rows, k), dtype=torch.uint8) if codes else None
    f = torch.empty((rows, k), dtype=torch.float32) if fake else None

    # one call on this thread: a pool of its own would share the cores with torch's OpenMP workers, which
    # spin for a while after each op (slower in a compile's mix of products and quantization)
    status = lib.dmpq_rtn_affine(x.data_ptr(), rows, k, group, bits, int(scale_f16), scale.data_ptr(),
                                 zero.data_ptr(), None if q is None else q.data_ptr(),
                                 None if f is None else f.data_ptr())
    if status != 0:
        return None
    lead = w.shape[:-1]
    return (scale.reshape(*lead, groups), zero.reshape(*lead, groups),
            None if q is None else q.reshape(*lead, k), None if f is None else f.reshape(*lead, k))

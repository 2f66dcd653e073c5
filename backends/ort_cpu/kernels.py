"""dmpq's onnxruntime custom-op library: ``ai.dmpq.MixedMoE``, ``ai.dmpq.PanelMatMul`` and
``ai.dmpq.GroupQueryAttention`` (``csrc/dmpq_moe.cc``, ``csrc/gqa.h``).

One ``MixedMoE`` node per layer runs all of the layer's 2/4/8-bit routed SwiGLU experts, whatever their mix of
widths, on the stored codes as they are (``--dispatch kernel``; the graph side is
:meth:`.matmulnbits.MatMulNBitsProjection.mixed_moe`); ``PanelMatMul`` runs the quantized projections outside
the experts (attention, the LM head) in the same layout (:meth:`.matmulnbits.MatMulNBitsProjection.panel_matmul`);
``GroupQueryAttention`` is attention over onnxruntime-genai's KV cache that reads each KV head's rows once for its
group of query heads (:meth:`.matmulnbits.MatMulNBitsProjection.attention`; its paths follow the CPU's features,
not ``DMPQ_KERNEL_PATH``, and agree to float rounding).
The library is C++ compiled here, from the sources this package ships, the first time a compile asks
for it (a few seconds with ``g++``), and cached by the hash of its sources, flags and compiler; each
artifact that uses it carries a copy (``kernels/libdmpq_kernels.so``), which onnxruntime and onnxruntime-genai load by path (the
manifest's ``target.custom_ops_library``, ``genai_config.json``'s ``session_options``).

It declares only the parts of onnxruntime's C ABI it calls (``csrc/ort_abi.h``: version 1 of the
API table, which every onnxruntime serves), so it needs no onnxruntime headers to build (checked
with onnxruntime 1.32 and onnxruntime-genai 0.18 on Linux x86-64). It picks its dot-product path at load: AVX-512
VNNI where the CPU has it, else AVX2 (with FMA and F16C), else portable C++; all three compute the same
logits, bit for bit (the portable path 75-150 times slower than AVX2, ``benchmarks/bench_kernel_paths.py``;
the attention op takes the CPU's path whatever is forced). ``DMPQ_KERNEL_PATH=avx512-vnni|avx2|portable``
forces one: a path the CPU lacks, or a name that is no path, makes the library's registration fail with
the reason (the missing CPU features). The op runs on onnxruntime's intra-op threads (onnxruntime 1.17 on); with
``DMPQ_KERNEL_POOL=own``, on a pool of its own of ``DMPQ_KERNEL_THREADS`` threads (default: the CPUs this
process may run on). The path is chosen once per process, when first used.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
from pathlib import Path
from typing import Any

from ..base import BackendError

log = logging.getLogger(__name__)

DOMAIN = "ai.dmpq"
OP = "MixedMoE"
LIBRARY = "libdmpq_kernels.so"
ARTIFACT_PATH = f"kernels/{LIBRARY}"  # where an artifact keeps its copy, relative to its folder
SOURCES = ("dmpq_moe.cc", "gqa.h", "ort_abi.h")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-Wall",
         "-Wno-uninitialized", "-Wno-maybe-uninitialized")


def source_dir() -> Path:
    return Path(__file__).resolve().parent / "csrc"


def build(cache_dir: Path | None = None) -> Path:
    """The library built for this machine's compiler (compiled now if the cache lacks it); its path.

    Raises:
        BackendError: not Linux x86-64, no C++ compiler, or the compile failed (with its output).
    """
    from ...native import NativeBuildError, build_library

    try:
        return build_library(LIBRARY, source_dir(), SOURCES, FLAGS, "dmpq's kernel library", cache_dir)
    except NativeBuildError as e:
        raise BackendError(f"{e}; choose --dispatch fused") from e


def describe(library: Path) -> dict[str, Any]:
    """What the library does on this CPU: its dot-product path (``avx512-vnni``, ``avx2`` or ``portable``)
    and the threads its pool starts.

    Raises:
        BackendError: ``DMPQ_KERNEL_PATH`` forces a path this CPU lacks, or names none (the library's reason).
    """
    lib = ctypes.CDLL(str(library))
    lib.dmpq_kernel_path.restype = ctypes.c_char_p
    lib.dmpq_kernel_path_error.restype = ctypes.c_char_p
    error = lib.dmpq_kernel_path_error().decode()
    if error:
        raise BackendError(error)
    return {"path": lib.dmpq_kernel_path().decode(), "threads": int(lib.dmpq_kernel_threads())}


def register(options: Any, library: Path) -> None:
    """Make onnxruntime session ``options`` load ``library`` (an artifact's copy)."""
    if not Path(library).is_file():
        raise BackendError(f"the artifact's kernel library {library} is missing; recompile the artifact or copy "
                           f"its {ARTIFACT_PATH}")
    options.register_custom_ops_library(str(library))


def install(out_dir: Path) -> str:
    """Copy the built library into artifact folder ``out_dir``; the path relative to it."""
    dest = out_dir / ARTIFACT_PATH
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build(), dest)
    return ARTIFACT_PATH

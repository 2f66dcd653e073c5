"""Compilation targets. Built-ins are listed here; plugins come from the entry-point group
``dmpq_compile.backends``. Backend modules import onnxruntime/tensorrt lazily, inside methods.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..registry import BACKENDS, PluginError
from .base import Backend, BackendError, ExpertCostRow

# name -> "module:Class" of the built-in backends (imported on first use)
BUILTIN_BACKENDS = {
    "ort-cpu": "dmpq_compile.backends.ort_cpu.backend:OrtCpuBackend",
    "trt-a100": "dmpq_compile.backends.trt.backend:TrtA100Backend",
}


def _register_builtins() -> None:
    """Import and register every built-in backend; one that fails to import is an error, not skipped."""
    registered = {n for n, _, _ in BACKENDS.items()}
    for name, target in BUILTIN_BACKENDS.items():
        if name in registered:
            continue
        module, cls = target.split(":")
        try:
            BACKENDS.register(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError) as e:
            raise PluginError(f"built-in backend {name!r} ({target}) failed to load: {type(e).__name__}: {e}; "
                              "the installation is broken (reinstall dmpq-compile)") from e


def get_backend(name: str, **options: Any) -> Backend:
    """A fresh instance of the backend called ``name``, constructed with ``options`` (e.g. ort-cpu's
    ``scale_dtype``)."""
    _register_builtins()
    try:
        cls = BACKENDS.get(name)
    except KeyError as e:
        raise BackendError(str(e).strip("'\"")) from None
    if options:
        params = inspect.signature(cls).parameters
        unknown = sorted(k for k in options if k not in params)
        if unknown:
            raise BackendError(f"backend {name!r} takes no option {unknown} (its options: "
                               f"{sorted(k for k in params if k not in ('args', 'kwargs')) or 'none'})")
    return cls(**options)


def available_backends() -> list[tuple[str, type, str]]:
    _register_builtins()
    return BACKENDS.items()


__all__ = ["BUILTIN_BACKENDS", "Backend", "BackendError", "ExpertCostRow", "available_backends", "get_backend"]

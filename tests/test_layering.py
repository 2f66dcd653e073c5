"""Imports run downward only; the runtime stays free of torch, onnx and transformers.

Every module's imports are read with ``ast`` (lazy imports inside functions included), so a
violation is found without importing anything. ``LAYERS`` is the one statement of the layer map:
a module may import its own layer and the layers listed before it, never one listed after.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name -> folder, as pyproject's package-dir maps them
ROOTS = {"dmpq_compile": REPO / "dmpq_compile", "dmpq_compile.passes": REPO / "passes",
         "dmpq_compile.backends": REPO / "backends"}

# Lowest first. Pipeline order is frontend -> IR -> passes -> backends -> artifact/runtime; the
# foundation (formats, kernels, metrics, file helpers) sits under all of it, and the drivers
# (compiler, peer baseline), the bench and the CLI sit on top and inject what passes need.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("dmpq_compile", "dmpq_compile.fileio", "dmpq_compile.registry", "dmpq_compile.sysinfo",
                    "dmpq_compile.quant", "dmpq_compile.eval", "dmpq_compile.testing", "dmpq_compile.rare_counts",
                    "dmpq_compile.native")),
    ("ir", ("dmpq_compile.ir",)),
    ("frontend", ("dmpq_compile.frontend",)),
    ("passes", ("dmpq_compile.passes",)),
    ("backends", ("dmpq_compile.backends",)),
    ("artifact/runtime", ("dmpq_compile.artifact", "dmpq_compile.runtime", "dmpq_compile.engine")),
    ("tools", ("dmpq_compile.bench",)),
    ("driver", ("dmpq_compile.compiler", "dmpq_compile.config", "dmpq_compile.pipeline", "dmpq_compile.extra_passes",
                "dmpq_compile.baselines", "dmpq_compile.distributed")),
    ("cli", ("dmpq_compile.commands", "dmpq_compile.cli")),
)
RUNTIME_FORBIDDEN = ("torch", "onnx", "transformers")
# what the runtime may import from outside itself: the artifact's file names and file helpers,
# which import nothing but the standard library (checked below)
RUNTIME_MAY_IMPORT = ("dmpq_compile.fileio",)


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest listed prefix of ``module``."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (module.startswith(p + ".") and p != "dmpq_compile")  # root: itself only
            if inside and len(p) > best:
                best, index = len(p), i
    if index is None:
        raise AssertionError(f"{module} is in no layer; add its package to LAYERS in {Path(__file__).name}")
    return index


def module_files() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def imports(module: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


MODULES = module_files()


def _project(names: set[str]) -> set[str]:
    """The project modules among ``names`` (``from pkg import function`` counts as ``pkg``)."""
    return {n if n in MODULES else n.rpartition(".")[0] for n in names
            if n.startswith("dmpq_compile") and (n in MODULES or n.rpartition(".")[0] in MODULES)}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = layer_of(module)
    upward = sorted(f"{name} ({LAYERS[layer_of(name)][0]})" for name in _project(imports(module, MODULES[module]))
                    if layer_of(name) > mine)
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports upward: {upward}"


def test_runtime_imports_no_heavy_framework():
    for module, path in MODULES.items():
        if layer_of(module) == layer_of("dmpq_compile.runtime") and module.startswith("dmpq_compile.runtime"):
            heavy = sorted(n for n in imports(module, path) if n.split(".")[0] in RUNTIME_FORBIDDEN)
            assert not heavy, f"{module} imports {heavy}; the runtime needs only numpy, onnxruntime, tokenizers"
            inside = sorted(n for n in _project(imports(module, path))
                            if not n.startswith("dmpq_compile.runtime") and n not in RUNTIME_MAY_IMPORT)
            assert not inside, f"{module} imports {inside}; the runtime imports only its own modules and " \
                               f"{RUNTIME_MAY_IMPORT}"


@pytest.mark.parametrize("module", RUNTIME_MAY_IMPORT)
def test_what_the_runtime_may_import_needs_only_the_standard_library(module):
    found = {n.split(".")[0] for n in imports(module, MODULES[module])} - {"__future__"}
    assert found <= set(sys.stdlib_module_names), f"{module} imports {sorted(found - set(sys.stdlib_module_names))}"


def test_loading_the_runtime_loads_no_heavy_framework():
    code = ("import sys, dmpq_compile.runtime, dmpq_compile.runtime.session\n"
            f"print(sorted(m for m in {RUNTIME_FORBIDDEN!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_checker_sees_an_upward_import(tmp_path):
    fake = tmp_path / "measure.py"
    fake.write_text("def f():\n    from ...artifact import write_artifact\n    from ...runtime import load\n")
    found = _project(imports("dmpq_compile.passes.allocate.measure", fake))
    assert found == {"dmpq_compile.artifact", "dmpq_compile.runtime"}
    assert all(layer_of(n) > layer_of("dmpq_compile.passes.x") for n in found)

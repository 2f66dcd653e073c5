"""The repository layout: top-level passes/ and backends/ install inside dmpq_compile."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"dmpq_compile": "dmpq_compile", "dmpq_compile.passes": "passes", "dmpq_compile.backends": "backends"}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = _config()
    assert cfg["package-dir"] == MAPPED
    found = set()
    for pkg, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert set(cfg["packages"]) == found, "pyproject [tool.setuptools] packages must list every package folder"


def test_passes_and_backends_are_top_level_folders_imported_under_dmpq_compile():
    import dmpq_compile.backends
    import dmpq_compile.passes

    assert Path(dmpq_compile.passes.__file__).parent == ROOT / "passes"
    assert Path(dmpq_compile.backends.__file__).parent == ROOT / "backends"
    assert not (ROOT / "dmpq_compile" / "passes").exists()


def test_wheel_installs_no_top_level_passes_or_backends(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dmpq_compile"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "dmpq_compile/passes/allocate/rl.py" in names and "dmpq_compile/backends/trt/qdq.py" in names
    # the kernel library's sources, which --dispatch kernel compiles on first use
    assert {"dmpq_compile/backends/ort_cpu/csrc/dmpq_moe.cc", "dmpq_compile/backends/ort_cpu/csrc/ort_abi.h"} <= {*names}

"""The TensorRT engine of a ``trt-a100`` artifact: build it into the folder, record it, open it.

This is the artifact-level half of :mod:`dmpq_compile.backends.trt.build`: it reads and updates
the manifest (artifact/runtime layer), while the backend module only parses, builds and runs
TensorRT and never imports the runtime.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .backends.trt.build import BACKEND_NAME, ENGINE_FILE, TIMING_CACHE_FILE, TrtEngineRunner, build_plan
from .fileio import atomic_write_bytes
from .runtime.manifest import MANIFEST_NAME, ArtifactError, load_manifest

log = logging.getLogger(__name__)


def build_engine(artifact_dir: str | Path, workspace_gb: float = 8.0, timing_cache: str | Path | bool | None = None,
                 fp16: bool = True, strongly_typed: bool = True, max_sequence: int | None = None,
                 max_context: int | None = None, verbose: bool = False) -> Path:
    """Build ``engine.plan`` next to the artifact's manifest and record it in the manifest.

    Args:
        artifact_dir: A ``trt-a100`` artifact folder.
        workspace_gb: Builder workspace memory pool limit (GiB).
        timing_cache: Timing-cache file (default ``ARTIFACT/timing.cache``; loaded when present,
            saved after the build); False disables it.
        fp16: With ``strongly_typed=False``, allow FP16 kernels (``BuilderFlag.FP16``). A strongly
            typed network takes its types from the ONNX (emit ``precision``) and ignores it.
        strongly_typed: Build with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (recommended
            for explicit quantization).
        max_sequence: Largest new-token count per call (profile max of ``sequence``).
        max_context: Largest total context (past + new tokens).
        verbose: TensorRT logger at VERBOSE instead of WARNING.

    Returns:
        The path of ``engine.plan``.

    Raises:
        TensorRTNotInstalled: ``tensorrt`` does not import.
        ArtifactError: Not a ``trt-a100`` artifact, or its files do not verify.
        BackendError: Parser errors (with node names) or a failed build.
    """
    root = Path(artifact_dir)
    manifest = load_manifest(root, verify=True)
    target = manifest["target"]
    if target.get("backend") != BACKEND_NAME:
        raise ArtifactError(f"{root} targets {target.get('backend')!r}; `build` makes TensorRT engines for "
                            f"{BACKEND_NAME!r} artifacts (compile with --target {BACKEND_NAME})")
    if strongly_typed and fp16 and target.get("precision") == "fp32":
        log.warning("%s was emitted with precision=fp32: a strongly typed engine runs it in FP32/TF32", root)
    cache = None if timing_cache is False else Path(timing_cache or root / TIMING_CACHE_FILE)
    engine = build_plan(root / target["model_file"], target["io"],
                        int(manifest["model"].get("max_position_embeddings") or 4096), root / ENGINE_FILE,
                        workspace_gb=workspace_gb, timing_cache=cache, fp16=fp16, strongly_typed=strongly_typed,
                        max_sequence=max_sequence, max_context=max_context, verbose=verbose)
    update_manifest(root, engine)
    return root / ENGINE_FILE


def update_manifest(root: Path, engine: Mapping[str, Any]) -> None:
    """Record ``engine`` under ``target.engine`` and list the plan in ``files`` (atomic replace)."""
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["target"]["engine"] = dict(engine)
    manifest["files"][engine["file"]] = {"sha256": engine["sha256"], "bytes": engine["bytes"]}
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def open_engine(artifact_dir: str | Path) -> TrtEngineRunner:
    """A :class:`TrtEngineRunner` for the artifact's built engine (manifest verified first).

    Raises:
        ArtifactError: The artifact has no engine yet.
    """
    root = Path(artifact_dir)
    manifest = load_manifest(root, verify=True)
    engine = manifest["target"].get("engine")
    if not engine:
        raise ArtifactError(f"{root} has no engine yet; run `dmpq-compile build {root}` first")
    return TrtEngineRunner(root / engine["file"], manifest)

"""The artifact manifest: reading it, and verifying every file it lists (stdlib only).

An artifact folder holds ``manifest.json`` and the files it lists under ``files`` (relative
path -> ``{"sha256", "bytes"}``): the backend's model files, tokenizer files and
``report.json``. The manifest is what ties them together, so a file that is missing, truncated
or changed is refused before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fileio import DATA_FILE, MODEL_FILE

FORMAT = "dmpq-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
REQUIRED_KEYS = ("format", "format_version", "target", "model", "files")
ARTIFACT_FILES = (MODEL_FILE, DATA_FILE, REPORT_NAME)  # what backends and the writer put beside it
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact folder is missing, corrupt or of an unsupported kind; the message names the file."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "bytes"}}`` of every regular file under ``root``."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Parse and structurally check ``root/manifest.json``.

    Raises:
        ArtifactError: the folder or manifest is missing, not JSON, of another format or
            version, or lacks required keys.
    """
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder: give the path of an artifact made by `dmpq-compile compile`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        found = [name for name in ARTIFACT_FILES if (root / name).is_file()]
        if found and not (root / "config.json").is_file():
            raise ArtifactError(f"{path} is missing: {root} holds artifact files ({', '.join(found)}) but not the "
                                "manifest that lists and verifies them; copy the whole artifact folder again or "
                                "re-create it with `dmpq-compile compile`")
        raise ArtifactError(f"{path} is missing: {root} is not a dmpq-compile artifact (or it is incomplete)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is corrupt, re-create it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} manifest (format={_get(manifest, 'format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r} is not supported by this "
                            f"runtime (it reads version {FORMAT_VERSION}); re-create the artifact or upgrade")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks required keys {missing}; the artifact is corrupt, re-create it")
    return manifest


def looks_like_artifact(root: str | Path) -> bool:
    """True for a folder with a manifest, or with artifact files (model.onnx, report.json) and no
    ``config.json`` (which a Hugging Face checkpoint folder has): an artifact, maybe incomplete."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return True
    return not (root / "config.json").is_file() and any((root / name).is_file() for name in ARTIFACT_FILES)


def verify_files(root: str | Path, manifest: Mapping[str, Any]) -> None:
    """Check that every file the manifest lists exists with the recorded size and sha256.

    Raises:
        ArtifactError: naming the first file that is missing, truncated/grown or changed.
    """
    root = Path(root)
    files = manifest["files"]
    if not isinstance(files, Mapping) or not files:
        raise ArtifactError(f"{root / MANIFEST_NAME}: 'files' must list the artifact's files; re-create it")
    for rel, entry in files.items():
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ArtifactError(f"{root / MANIFEST_NAME} lists {rel!r}, which is outside the artifact folder")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact (listed in {MANIFEST_NAME}); "
                                "copy the whole artifact folder again")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ArtifactError(f"{path} has {size} bytes but the manifest records {entry.get('bytes')}: the file is "
                                "truncated or was replaced; copy the artifact again or re-create it")
        if sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST_NAME}: the file is corrupt or was "
                                "modified; copy the artifact again or re-create it")


def load_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """:func:`read_manifest`, then :func:`verify_files` unless ``verify`` is False."""
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    return manifest


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None

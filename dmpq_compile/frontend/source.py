"""Where a checkpoint is: a local folder, or a Hugging Face hub id already in the local cache.

dmpq-compile never downloads: a hub id is looked up offline in the Hugging Face cache
(``HF_HUB_CACHE`` / ``HF_HOME``, as ``huggingface_hub`` defines them), where ``huggingface-cli
download`` or any ``from_pretrained`` call on a connected machine put it.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """MODEL is neither a folder nor a hub id in the local cache; the message says where we looked."""


def resolve_model(model: str | Path) -> Path:
    """The local folder holding ``model`` (a folder path, or ``owner/name`` found in the HF cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{model} is a file; give the checkpoint's folder (config.json + *.safetensors)")
    text = str(model)
    if not HUB_ID.match(text) or text.startswith((".", "/")):
        raise ModelNotFoundError(f"{model} is not a folder; give a local checkpoint folder or a Hugging Face hub "
                                 "id (owner/name) that is in the local Hugging Face cache")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{text} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"dmpq-compile works offline: download it first (huggingface-cli download {text}) on a connected "
            "machine, or give the checkpoint's folder") from None

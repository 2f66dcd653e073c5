"""Text corpora for training, calibrating and evaluating models.

A corpus *spec* is the name of a built-in corpus or a path of the user's own: a single text file,
a folder, or a folder saved with Hugging Face ``datasets.Dataset.save_to_disk``. Built-in corpora:

* ``pydoc``: the reStructuredText sources of the Python 3.11 documentation shipped by the Debian
  ``python3.11-doc`` package (the samples' training text);
* ``pystdlib``: the standard library's own ``.py`` files shipped with the running interpreter
  (``sysconfig.get_paths()["stdlib"]``), without test packages (``test``, ``tests``,
  ``idle_test``), ``site-packages`` / ``dist-packages`` and machine-generated files (codec tables,
  ``pydoc_data``'s copy of the documentation, ...: ``auto-generated``, ``generated from``,
  ``do not edit`` or ``Character Mapping Codec`` in the first 1500 characters), a second,
  held-out domain (code, not prose).

In a folder every file counts whatever its name: ``*.jsonl`` / ``*.json`` are read as records
with a ``text`` field, every other file as one document of UTF-8 text. Whether a file is text is
decided by its content (no NUL byte, valid UTF-8), never by its suffix; a binary file is an
error naming the file. Hidden files and folders (``.git``) and ``__pycache__`` are skipped.

Every document carries a stable *key* (its path relative to the corpus root, plus a record index
for multi-record files). The ``train`` / ``calib`` / ``dev`` / ``test`` split is decided by the
sha256 of that key (90 / 5 / 2.5 / 2.5 % of the hash range), so it is deterministic, independent of
file order, and a document never moves between splits when other documents are added. ``dev`` and
``test`` are the two halves of what was once a single held-out ``test`` range ([0, 0.05)):
the bundled samples were trained on ``train`` and calibrated on ``calib``, which stay as they were;
``dev`` (for choices) holds the documents that the earlier tables were read on. See
docs/evaluation.md. Which split a command reads by default (:func:`resolve_split`):
for the built-in corpus the one for the purpose (``calib`` for calibration, ``test`` for
evaluation); for a user's own corpus the whole of it, since it was chosen for the purpose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PYDOC_ENV = "DMPQ_PYDOC_DIR"
PYDOC_DEFAULT_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYSTDLIB_ENV = "DMPQ_PYSTDLIB_DIR"
SPLITS = ("train", "calib", "dev", "test")
# Fractions of the hash range [0, 1) given to each split, in order: dev, test, calib, then train.
# dev + test is the old held-out "test" range [0, 0.05); calib [0.05, 0.10) and train are unchanged.
SPLIT_FRACTIONS = {"dev": 0.025, "test": 0.025, "calib": 0.05, "train": 0.90}
BUILTIN_CORPORA = ("pydoc", "pystdlib")
# pystdlib: folders that hold tests or third-party packages, and the marks of a machine-generated file
PYSTDLIB_SKIPPED_FOLDERS = ("test", "tests", "idle_test", "site-packages", "dist-packages")
GENERATED_MARK = re.compile(r"auto-?generated|generated from|do not edit|character mapping codec", re.IGNORECASE)
GENERATED_SCAN_CHARS = 1500
AUTO_SPLIT = "auto"  # the default split: see resolve_split
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")  # only where no content is read: a datasets folder's fallback
JSON_SUFFIXES = (".jsonl", ".json")
SKIPPED_FOLDERS = ("__pycache__",)  # Python's bytecode cache, never text; hidden folders are skipped too
SINGLE_FILE_BLOCK_CHARS = 4096
DEFAULT_SEPARATOR = "<|endoftext|>"


class CorpusError(ValueError):
    """A corpus cannot be found or read; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Document:
    """One text document of a corpus.

    Attributes:
        key: Stable identifier (relative path, ``#index`` for records of one file); it decides the split.
        text: The document text.
    """

    key: str
    text: str


# --------------------------------------------------------------------------------------------- split
def split_fraction(key: str) -> float:
    """Map a document key to a deterministic number in ``[0, 1)`` (first 8 bytes of its sha256)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str) -> str:
    """Return the split (``train``, ``calib``, ``dev`` or ``test``) a key falls in by hash alone."""
    u, edge = split_fraction(key), 0.0
    for split in ("dev", "test", "calib"):
        edge += SPLIT_FRACTIONS[split]
        if u < edge:
            return split
    return "train"


def assign_splits(keys: Sequence[str]) -> dict[str, str]:
    """Assign every key to a split, making ``test``, ``calib`` and ``dev`` non-empty when there are enough keys.

    Keys are first placed by :func:`split_of`. If ``test`` (then ``calib``, then ``dev``) came out
    empty and at least 3 (for ``dev``: 4) keys exist, the ``train`` key with the smallest hash value
    moves there, so small corpora still get held-out documents while the assignment stays
    deterministic.

    Args:
        keys: Unique document keys.

    Returns:
        Mapping from key to split name.
    """
    assignment = {k: split_of(k) for k in keys}
    if len(assignment) < 3:
        return assignment
    for split in ("test", "calib", "dev"):
        if split == "dev" and len(assignment) < 4:
            break
        if split not in assignment.values():
            train_keys = [k for k, s in assignment.items() if s == "train"]
            assignment[min(train_keys, key=split_fraction)] = split
    return assignment


def split_documents(docs: Sequence[Document], split: str | None) -> list[Document]:
    """Keep the documents of one split (all of them when ``split`` is None), in their original order.

    Raises:
        CorpusError: ``split`` is not one of :data:`SPLITS`.
    """
    if split is None:
        return list(docs)
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}: use one of {SPLITS} or None for the whole corpus")
    assignment = assign_splits([d.key for d in docs])
    return [d for d in docs if assignment[d.key] == split]


def is_builtin(spec: str | Path) -> bool:
    """Whether ``spec`` names a built-in corpus (``pydoc``) rather than the user's own text."""
    return str(spec) in BUILTIN_CORPORA


def resolve_split(spec: str | Path, split: str | None, builtin_split: str) -> str | None:
    """The split to read from ``spec``: ``split`` itself, unless it is ``"auto"``.

    ``"auto"`` means ``builtin_split`` (``calib`` for calibration, ``test`` for reports) for a
    built-in corpus, and the whole corpus (None) for a user's own corpus: the project's hash split
    exists to keep the built-in corpus's evaluation text out of training and calibration, while a
    user who hands over a corpus for one purpose means all of it.
    """
    if split != AUTO_SPLIT:
        return split
    return builtin_split if is_builtin(spec) else None


# --------------------------------------------------------------------------------------------- loaders
def pydoc_dir() -> Path:
    """Return the folder of the python-doc corpus (``$DMPQ_PYDOC_DIR`` or the Debian default).

    Raises:
        CorpusError: The folder does not exist, with the commands that install it.
    """
    override = os.environ.get(PYDOC_ENV)
    path = Path(override) if override else PYDOC_DEFAULT_DIR
    if path.is_dir() and any(path.rglob("*.txt")):
        return path
    where = f"${PYDOC_ENV}={override}" if override else f"{PYDOC_DEFAULT_DIR} (default location)"
    raise CorpusError(
        f"python-doc corpus not found at {where}. Install it as root with "
        f"`apt-get install -y python3.11-doc`, or without root: "
        f"`apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb DIR` and then "
        f"`export {PYDOC_ENV}=DIR/usr/share/doc/python3.11/html/_sources`.")


def pystdlib_dir() -> Path:
    """The folder of the interpreter's standard library (``$DMPQ_PYSTDLIB_DIR`` or ``sysconfig``'s ``stdlib``).

    Raises:
        CorpusError: The folder does not exist or holds no ``.py`` file.
    """
    override = os.environ.get(PYSTDLIB_ENV)
    path = Path(override) if override else Path(sysconfig.get_paths()["stdlib"])
    if path.is_dir() and any(path.glob("*.py")):
        return path
    raise CorpusError(f"no Python standard library found at {path} ({'$' + PYSTDLIB_ENV if override else 'sysconfig'}); "
                      f"set ${PYSTDLIB_ENV} to a folder of the standard library's .py files")


def pystdlib_version() -> str:
    """Which standard library ``pystdlib`` reads: the interpreter's version, or the override folder."""
    override = os.environ.get(PYSTDLIB_ENV)
    return f"{PYSTDLIB_ENV}={override}" if override else f"python {sys.version.split()[0]}"


def load_pystdlib() -> list[Document]:
    """Every ``.py`` file of the standard library, sorted by relative path, without tests, third-party
    packages and machine-generated files (see the module docstring)."""
    root = pystdlib_dir()
    docs = []
    for p in _sorted_files(root, (".py",)):
        rel = p.relative_to(root)
        if any(part in PYSTDLIB_SKIPPED_FOLDERS for part in rel.parts[:-1]):
            continue
        try:
            text = _read_text(p)
        except BinaryFileError:
            continue  # a stray non-UTF-8 file is not part of the domain
        if text.strip() and not GENERATED_MARK.search(text[:GENERATED_SCAN_CHARS]):
            docs.append(Document(rel.as_posix(), text))
    return docs


def load_pydoc() -> list[Document]:
    """Load every ``*.txt`` file of the python-doc corpus, sorted by relative path."""
    root = pydoc_dir()
    return [Document(p.relative_to(root).as_posix(), _read_text(p)) for p in _sorted_files(root, (".txt",))]


def load_text_file(path: str | Path) -> list[Document]:
    """Load one text file as documents: blocks of about 4 KiB cut at blank lines.

    A single file is cut into blocks so that it can still be split into train/calib/test; the
    block keys are ``NAME#INDEX``.

    Raises:
        CorpusError: the file is not UTF-8 text (:class:`BinaryFileError`) or holds only whitespace.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise CorpusError(f"corpus file {path} holds no text (it is empty)")
    blocks, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= SINGLE_FILE_BLOCK_CHARS:
            blocks.append("\n\n".join(current))
            current, size = [], 0
    if current and any(p.strip() for p in current):
        blocks.append("\n\n".join(current))
    return [Document(f"{path.name}#{i}", b) for i, b in enumerate(blocks)]


def load_folder(root: str | Path) -> list[Document]:
    """Load a folder recursively: ``*.jsonl``/``*.json`` one document per record, any other file whole.

    Files are visited in sorted relative-path order; hidden files and folders and ``__pycache__``
    are skipped, and so are files holding only whitespace.

    Raises:
        CorpusError: a file is not UTF-8 text (all such files are named), or no file holds text.
    """
    root = Path(root)
    if _is_hf_dataset(root):
        return load_hf_dataset(root)
    return _load_plain_folder(root)


def load_hf_dataset(root: str | Path) -> list[Document]:
    """Load a folder written by ``datasets`` ``save_to_disk`` (needs the optional ``datasets`` package).

    Every split of a ``DatasetDict`` is read in sorted split-name order; keys are ``SPLIT/INDEX``.
    Without ``datasets`` installed, the json/jsonl/txt files of the folder are read instead.

    Raises:
        CorpusError: No ``text`` column, or an arrow-only folder while ``datasets`` is not installed.
    """
    root = Path(root)
    try:
        import datasets  # optional: not a dependency of dmpq-compile
    except ImportError:
        if any(p.name not in _HF_METADATA_FILES for p in _sorted_files(root, TEXT_SUFFIXES + JSON_SUFFIXES)):
            log.info("datasets is not installed; reading the json/jsonl/txt files of %s", root)
            return _load_plain_folder(root, TEXT_SUFFIXES + JSON_SUFFIXES)
        raise CorpusError(f"{root} is a Hugging Face datasets folder (arrow files) but the `datasets` package "
                          "is not installed; `pip install datasets` (it is optional, not a dependency of "
                          "dmpq-compile), or export the data as *.jsonl with a 'text' field") from None
    loaded = datasets.load_from_disk(str(root))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("data", loaded)]
    docs = []
    for name, part in sorted(parts, key=lambda kv: kv[0]):
        if "text" not in part.column_names:
            raise CorpusError(f"{root} split {name!r} has columns {part.column_names}; a 'text' column is needed")
        docs.extend(Document(f"{name}/{i}", t) for i, t in enumerate(part["text"]) if t)
    return docs


def _load_plain_folder(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Document]:
    """Every file of ``root`` (only ``suffixes`` in a datasets folder read without ``datasets``)."""
    docs: list[Document] = []
    binary: list[str] = []
    files = [p for p in _sorted_files(root, suffixes) if p.name not in _HF_METADATA_FILES]
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.suffix in JSON_SUFFIXES:
            docs.extend(Document(f"{rel}#{i}", t) for i, t in enumerate(_json_texts(path)))
            continue
        try:
            text = _read_text(path)
        except BinaryFileError as e:
            binary.append(f"{rel} ({e.why})")
            continue
        if text.strip():
            docs.append(Document(rel, text))
    if binary:
        shown = "; ".join(binary[:5]) + (f"; and {len(binary) - 5} more" if len(binary) > 5 else "")
        raise CorpusError(f"corpus folder {root} holds {len(binary)} file(s) that are not UTF-8 text: {shown}. "
                          "Every file of a corpus folder is read as text (json/jsonl as records with a 'text' "
                          "field): move these files out, or give a folder that holds only text")
    if not docs:
        what = f"its {len(files)} file(s) are empty" if files else "it has no files (hidden ones are skipped)"
        raise CorpusError(f"{root} holds no text: {what}. Give a folder of text files (any name: .txt, .py, ...) "
                          "or json/jsonl files whose records have a 'text' field")
    return docs


def load_documents(spec: str | Path) -> list[Document]:
    """Load all documents of a corpus spec (``pydoc``, ``pystdlib``, a text file, or a folder).

    Raises:
        CorpusError: The spec names neither a built-in corpus nor an existing file or folder.
    """
    if str(spec) == "pydoc":
        return load_pydoc()
    if str(spec) == "pystdlib":
        return load_pystdlib()
    path = Path(spec).expanduser()
    if path.is_file():
        return load_text_file(path)
    if path.is_dir():
        return load_folder(path)
    raise CorpusError(f"corpus {str(spec)!r} not found: give 'pydoc', 'pystdlib', a text file, or a folder of "
                      f"text/jsonl files or a saved Hugging Face dataset")


def load_corpus(spec: str | Path, split: str | None = None) -> list[str]:
    """Load the texts of one split of a corpus.

    Args:
        spec: ``pydoc``, ``pystdlib`` or a path to a text file / folder / saved ``datasets`` folder.
        split: ``train``, ``calib``, ``dev``, ``test``, or None for every document.

    Returns:
        The document texts in deterministic (sorted key) order.
    """
    docs = split_documents(load_documents(spec), split)
    log.info("corpus %s %s: %d documents, %d chars", spec, f"split {split}" if split else "(whole)", len(docs),
             sum(len(d.text) for d in docs))
    return [d.text for d in docs]


# ------------------------------------------------------------------------------------------- tokenize
def tokenize_corpus(texts: Iterable[str], tokenizer: Any, separator: str = DEFAULT_SEPARATOR,
                    max_tokens: int | None = None, batch_docs: int = 64) -> np.ndarray:
    """Tokenize documents into one long 1-D ``int64`` array, each document followed by ``separator``.

    Args:
        texts: Document texts.
        tokenizer: A ``tokenizers.Tokenizer`` (or a transformers fast tokenizer, whose backend is used).
        separator: Special token appended after every document (EOS).
        max_tokens: Stop after this many tokens (the array is cut to exactly this length).
        batch_docs: Documents encoded per ``encode_batch`` call.

    Raises:
        CorpusError: ``separator`` is not in the tokenizer's vocabulary.
    """
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    sep_id = tok.token_to_id(separator)
    if sep_id is None:
        raise CorpusError(f"separator token {separator!r} is not in the tokenizer vocabulary; pass the "
                          "tokenizer's EOS token as `separator`")
    pieces: list[np.ndarray] = []
    total, batch = 0, []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_docs:
            total += _encode_into(tok, batch, sep_id, pieces)
            batch = []
            if max_tokens is not None and total >= max_tokens:
                break
    if batch and (max_tokens is None or total < max_tokens):
        _encode_into(tok, batch, sep_id, pieces)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return ids[:max_tokens] if max_tokens is not None else ids


def _encode_into(tok: Any, batch: list[str], sep_id: int, pieces: list[np.ndarray]) -> int:
    n = 0
    for enc in tok.encode_batch(batch, add_special_tokens=False):
        arr = np.asarray(enc.ids + [sep_id], dtype=np.int64)
        pieces.append(arr)
        n += arr.size
    return n


# ------------------------------------------------------------------------------------------- helpers
_HF_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}


def _is_hf_dataset(root: Path) -> bool:
    if any((root / name).is_file() for name in _HF_METADATA_FILES):
        return True
    return any(p.suffix == ".arrow" for p in _sorted_files(root, None))


def _sorted_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is None or name.endswith(suffixes):
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


class BinaryFileError(CorpusError):
    """A corpus file is not text; ``why`` says what in its content shows it."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = path, why
        super().__init__(f"corpus file {path} is not UTF-8 text ({why}); give a text file, or convert it "
                         "to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)")


def decode_text(data: bytes) -> str:
    """``data`` as text if its content is text: no NUL byte and valid UTF-8 (a BOM is dropped).

    Raises:
        ValueError: what shows the content is binary (the NUL byte or the bad byte and its offset).
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"NUL byte at offset {nul}: a binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"byte 0x{data[e.start]:02x} at offset {e.start} is not valid UTF-8") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from None
    try:
        return decode_text(data)
    except ValueError as e:
        raise BinaryFileError(path, str(e)) from None


def _json_texts(path: Path) -> list[str]:
    raw = _read_text(path)
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            data = json.loads(raw)
            records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {e}") from None
    texts = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            texts.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        elif isinstance(rec, dict) and isinstance(rec.get("text"), list):
            texts.extend(str(t) for t in rec["text"])
        else:
            raise CorpusError(f"{path} record {i} has no string 'text' field (got {type(rec).__name__} "
                              f"with keys {list(rec) if isinstance(rec, dict) else '-'})")
    return [t for t in texts if t]

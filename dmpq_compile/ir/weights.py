"""The weight store: named tensors that IR nodes reference by key.

Nodes never hold tensors in their attributes; they hold keys into a :class:`WeightStore`. That
keeps the graph small to copy, diff and serialise, and lets a transform (QAT, packing) replace a
tensor without touching the graph structure.

A store entry is either a tensor in memory or a :class:`TensorRef`: a byte range of a
safetensors file on disk, read on every access and never kept. A checkpoint is loaded as refs,
so a compile holds in memory only the tensors that the current step uses (one decoder layer),
whatever the model's size; passes that make large new tensors (quantized codes) move them to
disk with :meth:`WeightStore.spill`. A read maps the tensor's bytes (private, copy-on-write) rather
than copying them, so a weight the page cache holds costs no copy; the map goes with the tensor, so
its pages are not counted in the process's resident memory after the tensor is freed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointFileError(ValueError):
    """A safetensors file is missing, truncated or malformed; the message names it and what to do."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored at ``offset`` (bytes from the start of ``path``) with ``shape`` and ``dtype``."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def read(self) -> torch.Tensor:
        """The tensor, as a private copy-on-write map of its bytes in the file (:func:`_map`): pages
        the page cache holds are mapped, not copied, and writes to the tensor stay in this process.
        Where the file cannot be mapped it is read into a fresh buffer instead (:meth:`read_copy`)."""
        size = self.nbytes
        if size == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        try:
            buf = _map(self.path, self.offset, size)
        except CheckpointFileError:
            raise
        except (OSError, ValueError):  # a file system without mmap: the same bytes, read
            return self.read_copy()
        return buf.view(self.dtype).reshape(self.shape)

    def read_copy(self) -> torch.Tensor:
        """The tensor read into a fresh buffer with ``os.preadv`` (no map)."""
        size = self.nbytes
        if size == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buf = torch.empty(size, dtype=torch.uint8)  # not zero-filled: every byte is read into it
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(buf.numpy()), 0
            while done < size:
                got = os.preadv(fd, [view[done:]], self.offset + done)
                if got <= 0:
                    raise CheckpointFileError(_truncated(self.path, self.offset + size))
                done += got
        finally:
            os.close(fd)
        return buf.view(self.dtype).reshape(self.shape)

    def rows(self, start: int, stop: int) -> TensorRef:
        """The ref of ``tensor[start:stop]`` (rows along the first axis are contiguous)."""
        row = self.nbytes // self.shape[0]
        return TensorRef(self.path, self.offset + start * row, (stop - start, *self.shape[1:]), self.dtype)


def _truncated(path: str, end: int) -> str:
    return f"{path} ends before byte {end}: the file is truncated; download or copy it again"


def _map(path: str, offset: int, size: int) -> torch.Tensor:
    """Bytes ``[offset, offset + size)`` of ``path`` as a uint8 tensor over a private (copy-on-write)
    memory map, with the kernel asked to read the range ahead (``MADV_WILLNEED``).

    Why a map: a weight read many times in a compile (a layer's experts: by the profile, the
    sensitivity pass's backward, its flip probe and measured KL, the quantize pass) is in the page
    cache after the first read, and a map hands those pages to the products as they are, where a
    read copies them into freshly zeroed anonymous pages: 0.45-0.5 s for one OLMoE-1B-7B layer's
    0.8 GB of bf16 experts against 0.01-0.03 s mapped, and from a cold cache 0.65-0.7 s read
    against 0.3 s mapped with the read-ahead. The map lives as long as the tensor (and its views):
    when the last goes, it is unmapped, so the pages count in the process's resident memory only
    while a tensor uses them, as a read copy's would. The file's size is checked first (a map past
    the end would fault on first use instead of raising)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < offset + size:
            raise CheckpointFileError(_truncated(path, offset + size))
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(f.fileno(), offset - start + size, access=mmap.ACCESS_COPY, offset=start)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        m.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(m, dtype=torch.uint8, count=size, offset=offset - start)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none); nothing else is read.

    Raises:
        CheckpointFileError: as :func:`index_safetensors`.
    """
    return _header(Path(path))[0].get("__metadata__") or {}


def index_safetensors(path: str | Path) -> dict[str, TensorRef]:
    """Refs to every tensor of one safetensors file, checked against the file's size (nothing is read).

    Raises:
        CheckpointFileError: the file is missing, not safetensors, or shorter than its header says.
    """
    path = Path(path)
    header, n, size = _header(path)
    refs, start, end_max = {}, 8 + n, 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise CheckpointFileError(f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}, which dmpq-compile "
                                      f"does not read (supported: {sorted(DTYPES)})")
        lo, hi = info["data_offsets"]
        ref = TensorRef(str(path), start + lo, tuple(int(d) for d in info["shape"]), DTYPES[info["dtype"]])
        if hi - lo != ref.nbytes:
            raise CheckpointFileError(f"{path}: tensor {key!r} spans {hi - lo} bytes but its shape and dtype need "
                                      f"{ref.nbytes}; the file is damaged")
        refs[key], end_max = ref, max(end_max, hi)
    if start + end_max > size:
        raise CheckpointFileError(f"{path} is truncated: its header describes {start + end_max} bytes but the file "
                                  f"has {size}; download or copy it again")
    return refs


def _header(path: Path) -> tuple[dict, int, int]:
    """A safetensors file's header, its length and the file's size (:func:`index_safetensors`'s checks)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFileError(f"{path} is empty or truncated ({size} bytes); copy it again")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointFileError(f"{path} is not a safetensors file or is truncated (header of {n} bytes "
                                          f"in a {size}-byte file); copy it again")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointFileError(f"{path} is missing; the checkpoint is incomplete: download it again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"{path} has a damaged safetensors header ({e}); copy it again") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path} has a damaged safetensors header (not a JSON object); copy it again")
    return header, n, size


class WeightStore(Mapping[str, torch.Tensor]):
    """A mapping from weight key to tensor with explicit, checked mutation.

    Keys are strings (HF parameter names or names made by passes). ``set`` refuses to change a
    tensor's shape unless ``allow_reshape`` is given, because a shape change under a node's feet
    is almost always a bug in a transform. Entries added with :meth:`add_ref` live on disk and
    are read on each access: callers that need a tensor several times keep their own reference.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self._t: dict[str, torch.Tensor | TensorRef] = {}
        self._versions: dict[str, int] = {}
        self._clock = 0
        for key, value in (tensors or {}).items():
            self.add(key, value)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            value = self._t[key]
        except KeyError:
            raise KeyError(f"weight {key!r} is not in the weight store ({len(self._t)} tensors)") from None
        return value.read() if isinstance(value, TensorRef) else value

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._t

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` without reading it."""
        value = self._t[key] if key in self._t else self[key]
        return tuple(value.shape)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype ``key`` is stored in, without reading it."""
        value = self._t[key] if key in self._t else self[key]
        return value.dtype

    def version(self, key: str) -> int:
        """A number that changes whenever ``key`` is replaced (for caches of derived tensors)."""
        return self._versions.get(key, 0)

    def _touch(self, key: str) -> None:
        self._clock += 1
        self._versions[key] = self._clock

    def is_on_disk(self, key: str) -> bool:
        return isinstance(self._t.get(key), TensorRef)

    def ref(self, key: str) -> TensorRef | None:
        """Where ``key`` lies on disk, or None when it is held in memory."""
        value = self._t[key]
        return value if isinstance(value, TensorRef) else None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Add a new tensor; the key must not exist yet."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if key in self._t:
            raise KeyError(f"weight {key!r} already exists; use set() to replace it")
        self._t[key] = tensor.detach()
        self._touch(key)

    def add_ref(self, key: str, ref: TensorRef) -> None:
        """Add a tensor that stays on disk until read."""
        if key in self._t:
            raise KeyError(f"weight {key!r} already exists; use set() to replace it")
        self._t[key] = ref
        self._touch(key)

    def set(self, key: str, tensor: torch.Tensor, allow_reshape: bool = False) -> None:
        """Replace an existing tensor, keeping its shape unless ``allow_reshape``."""
        old = self.shape(key)
        if not allow_reshape and old != tuple(tensor.shape):
            raise ValueError(f"weight {key!r}: new shape {tuple(tensor.shape)} differs from {old}")
        self._t[key] = tensor.detach()
        self._touch(key)

    def remove(self, key: str) -> None:
        del self._t[key]
        self._touch(key)

    def nbytes(self, keys: list[str] | None = None) -> int:
        """Bytes held by the given keys (all by default), without reading refs."""
        keys = list(self._t) if keys is None else keys
        total = 0
        for k in keys:
            v = self._t[k]
            total += v.nbytes if isinstance(v, TensorRef) else v.numel() * v.element_size()
        return total

    def spill(self, keys: list[str], path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the in-memory tensors ``keys`` to the safetensors file ``path`` (atomically: through a
        temporary file renamed into place; with ``metadata`` in its header) and keep refs instead."""
        tensors = {k: self._t[k].contiguous() for k in keys if not isinstance(self._t[k], TensorRef)}
        if not tensors:
            return
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for key, ref in index_safetensors(path).items():
            self._t[key] = ref

    def relocate(self, moves: Mapping[str, str | Path]) -> None:
        """Point the refs into each file ``old`` of ``moves`` at ``moves[old]``, the same file moved
        (in place: the store's order and versions stay)."""
        moves = {str(old): str(new) for old, new in moves.items()}
        for key, value in self._t.items():
            if isinstance(value, TensorRef) and value.path in moves:
                self._t[key] = dataclasses.replace(value, path=moves[value.path])

    def copy(self) -> WeightStore:
        """A shallow copy: new mapping, same (immutable by convention) tensors and refs."""
        out = WeightStore()
        out._t = dict(self._t)
        out._versions, out._clock = dict(self._versions), self._clock
        return out

    def save(self, path: Path) -> None:
        """Write all tensors to one safetensors file (shared storage is de-duplicated by cloning)."""
        seen: set[int] = set()
        tensors = {}
        for key in self._t:
            t = self[key]
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            t = t.contiguous()
            if ptr in seen and ptr != -1:
                t = t.clone()
            seen.add(ptr)
            tensors[key] = t
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path) -> WeightStore:
        """A store whose tensors stay in ``path`` (a safetensors file) until read."""
        out = cls()
        for key, ref in index_safetensors(path).items():
            out.add_ref(key, ref)
        return out

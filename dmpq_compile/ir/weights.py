"""The weight store: named tensors that IR nodes reference by key.

Nodes never hold tensors in their attributes; they hold keys into a :class:`WeightStore`. That
keeps the graph small to copy, diff and serialise, and lets a transform (QAT, packing) replace a
tensor without touching the graph structure.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class WeightStore(Mapping[str, torch.Tensor]):
    """A mapping from weight key to tensor with explicit, checked mutation.

    Keys are strings (HF parameter names or names made by passes). ``set`` refuses to change a
    tensor's shape unless ``allow_reshape`` is given, because a shape change under a node's feet
    is almost always a bug in a transform.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self._t: dict[str, torch.Tensor] = {}
        for key, value in (tensors or {}).items():
            self.add(key, value)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._t[key]
        except KeyError:
            raise KeyError(f"weight {key!r} is not in the weight store ({len(self._t)} tensors)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Add a new tensor; the key must not exist yet."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if key in self._t:
            raise KeyError(f"weight {key!r} already exists; use set() to replace it")
        self._t[key] = tensor.detach()

    def set(self, key: str, tensor: torch.Tensor, allow_reshape: bool = False) -> None:
        """Replace an existing tensor, keeping its shape unless ``allow_reshape``."""
        old = self[key]
        if not allow_reshape and tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(
                f"weight {key!r}: new shape {tuple(tensor.shape)} differs from {tuple(old.shape)}"
            )
        self._t[key] = tensor.detach()

    def remove(self, key: str) -> None:
        del self._t[key]

    def nbytes(self, keys: list[str] | None = None) -> int:
        """Bytes held by the given keys (all by default)."""
        keys = list(self._t) if keys is None else keys
        return sum(self[k].numel() * self[k].element_size() for k in keys)

    def copy(self) -> WeightStore:
        """A shallow copy: new mapping, same (immutable by convention) tensors."""
        out = WeightStore()
        out._t = dict(self._t)
        return out

    def save(self, path: Path) -> None:
        """Write all tensors to one safetensors file (shared storage is de-duplicated by cloning)."""
        seen: set[int] = set()
        tensors = {}
        for key, t in self._t.items():
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            t = t.contiguous()
            if ptr in seen and ptr != -1:
                t = t.clone()
            seen.add(ptr)
            tensors[key] = t
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path) -> WeightStore:
        return cls(load_file(str(path)))

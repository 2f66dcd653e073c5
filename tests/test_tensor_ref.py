"""TensorRef.read: a private map of the tensor's bytes; the same values as a read copy; writes stay in
the process; the map goes with the tensor; a truncated file is an error, not a crash."""

import gc
import os

import pytest
import torch
from safetensors.torch import save_file

from dmpq_compile.ir import weights as W
from dmpq_compile.ir.weights import CheckpointFileError, index_safetensors


@pytest.fixture()
def shard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(300, 70, generator=gen).bfloat16(), "b": torch.randn(5, generator=gen),
               "c": torch.arange(24, dtype=torch.int32).reshape(2, 3, 4), "empty": torch.zeros(0, 8)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _maps(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


def test_read_maps_the_same_values_as_a_copy(shard):
    path, tensors = shard
    refs = index_safetensors(path)
    for key, t in tensors.items():
        mapped, copied = refs[key].read(), refs[key].read_copy()
        assert mapped.dtype == copied.dtype == t.dtype and mapped.shape == copied.shape == t.shape
        assert torch.equal(mapped, t) and torch.equal(copied, t)
    rows = refs["a"].rows(100, 130).read()
    assert torch.equal(rows, tensors["a"][100:130])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_writes_stay_private_and_the_map_goes_with_the_tensor(shard):
    path, tensors = shard
    before = path.read_bytes()
    ref = index_safetensors(path)["a"]
    base = _maps(path)
    t = ref.read()
    view = t[10:20]
    assert _maps(path) == base + 1
    t.mul_(3)  # copy-on-write: the file and a second read keep the stored values
    assert path.read_bytes() == before
    assert torch.equal(ref.read(), tensors["a"])
    del t
    gc.collect()
    assert _maps(path) == base + 1  # a view keeps it mapped
    assert torch.equal(view, tensors["a"][10:20] * 3)
    del view
    gc.collect()
    assert _maps(path) == base


def test_a_file_truncated_after_indexing_is_an_error_both_ways(shard):
    path, _ = shard
    ref = index_safetensors(path)["a"]
    with open(path, "r+b") as f:
        f.truncate(ref.offset + 10)
    with pytest.raises(CheckpointFileError, match="truncated; download or copy it again"):
        ref.read()
    with pytest.raises(CheckpointFileError, match="truncated; download or copy it again"):
        ref.read_copy()


def test_where_the_file_cannot_be_mapped_it_is_read(shard, monkeypatch):
    path, tensors = shard

    def refuse(*args):
        raise OSError(19, "No such device")  # what mmap says on a file system without it

    monkeypatch.setattr(W, "_map", refuse)
    assert torch.equal(index_safetensors(path)["a"].read(), tensors["a"])

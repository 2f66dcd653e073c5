import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> path of a tiny random checkpoint saved with save_pretrained (built lazily)."""
    from dmpq_compile.testing import make_tiny_checkpoint

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get

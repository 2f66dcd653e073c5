import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and two threads thrash when another
# process shares the two cores (measured: 63 s vs 0.7 s for one QAT test).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_pass_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty pass cache (command-line compiles use it by default)."""
    from dmpq_compile.passes.infra import cache

    folder = tmp_path_factory.mktemp("pass-cache")
    monkeypatch.setattr(cache, "default_folder", lambda: folder)


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


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    from dmpq_compile.testing import write_tiny_corpus

    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def calib_ids(tiny_dirs, tiny_corpus):
    """family -> [8, 32] calibration token ids from the tiny corpus with that model's tokenizer."""
    from dmpq_compile.compiler import calibration_ids

    return lambda family: calibration_ids(tiny_dirs(family), str(tiny_corpus), 8, 32, split="train")


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    """dmpq's kernel library (``backends/ort_cpu/kernels.py``), built once per test session into a fresh cache;
    the test skips, with the reason, where it cannot be built."""
    from dmpq_compile.backends.base import BackendError
    from dmpq_compile.backends.ort_cpu import kernels

    try:
        return kernels.build(tmp_path_factory.mktemp("kernel-cache"))
    except BackendError as e:
        pytest.skip(f"dmpq's kernel library cannot be built here: {e}")

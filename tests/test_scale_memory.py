"""Peak memory of a compile grows with the largest layer, not with the number of layers."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmpq_compile.testing import write_tiny_corpus
from dmpq_compile.testing.scale import write_random_checkpoint

# 8 experts of 512 x 3072 per layer: 37.7 M parameters = 144 MiB in fp32 (72 MiB in bf16) per layer,
# so six more layers add at least 432 MiB if anything keeps the whole model (the checkpoint, fp32
# copies, codes, the ONNX proto). Both models exceed the interpreter's cache, so both stream.
WIDTHS = {"hidden_size": 512, "intermediate_size": 3072, "num_local_experts": 8, "num_experts_per_tok": 2,
          "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 256}


def _peak_mb(cmd: list[str]) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    return hwm / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to sample memory")
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus")
    peaks, reports = {}, {}
    for layers in (2, 8):
        ckpt = write_random_checkpoint("mixtral", tmp_path / f"L{layers}", num_hidden_layers=layers,
                                       shard_bytes=64 * 2**20, **WIDTHS)
        out = tmp_path / f"out{layers}"
        peaks[layers] = _peak_mb([sys.executable, "-m", "dmpq_compile.cli", "compile", str(ckpt), "--target",
                                  "ort-cpu", "--allocator", "optimal", "--budget-code-bits", "3", "--calib-corpus",
                                  str(corpus), "--calib-sequences", "8", "--seq-len", "64", "-o", str(out),
                                  "--no-progress"])
        reports[layers] = json.loads((out / "report.json").read_text())
    layer_mb = 8 * 3 * 512 * 3072 * 4 / 2**20  # one layer's experts in fp32
    assert peaks[8] - peaks[2] < 1.5 * layer_mb, (peaks, layer_mb)  # whole-model copies would add >= 3 layers' worth
    assert {r["name"] for r in reports[8]["passes"]} >= {"profile", "sensitivity", "quantize"}


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="VmRSS and malloc_trim: Linux with glibc")
def test_pass_boundaries_hand_freed_heap_back():
    """A pass that freed many small tensors must not leave their heap resident for the next one."""
    from dmpq_compile.sysinfo import release_free_heap, reset_peak_rss

    def rss_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    release_free_heap()  # free heap left by earlier tests would absorb the allocations below
    base = rss_mb()
    chunks = [torch.ones(2500) for _ in range(40000)]  # 400 MB in 10 KB heap blocks
    keep = chunks[::1000]  # survivors pin the heap's top, so free() alone cannot shrink it
    del chunks
    freed = rss_mb()
    reset_peak_rss()
    assert freed - base > 200
    assert rss_mb() - base < 0.25 * (freed - base)
    del keep


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_spilled_initializers_leave_no_bytes_in_memory(tmp_path):
    """Initializers the lowering spills must not stay resident in their protobuf messages (clearing
    a field does not free the bytes of a upb message's arena; a layer's codes stayed in memory)."""
    import tempfile

    import numpy as np
    from dmpq_compile.backends.onnx_lowering import Builder
    from onnx import numpy_helper

    from dmpq_compile.sysinfo import release_free_heap

    def rss_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    with tempfile.TemporaryFile(dir=tmp_path) as spill:
        b = Builder(spill)
        release_free_heap()
        base = rss_mb()
        for i in range(150):  # 300 MB of 2 MiB tensors
            b.add_proto(numpy_helper.from_array(np.full((512, 1024), i, np.float32), f"w{i}"))
        release_free_heap()
        grown = rss_mb() - base
        assert len(b.deferred) == 150 and b.deferred["w7"]()[0, 0] == 7
    assert grown < 60, f"{grown:.0f} MB stayed resident after spilling 300 MB"

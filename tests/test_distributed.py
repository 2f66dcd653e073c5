"""compile --ray: the per-layer sensitivity and quantization tasks on a local two-worker Ray cluster
write an artifact byte-identical to the serial compile (dmpq_compile/distributed.py)."""

import json

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dmpq-compile[ray]')")


def _files(folder):
    """Every file's bytes but the report's (timings) and the manifest's creation time."""
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "report.json"}
    manifest = json.loads(out.pop("manifest.json"))
    manifest.pop("created")
    manifest["files"].pop("report.json")  # the report holds timings
    out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()  # with every file's size and hash
    return out


@pytest.mark.slow
def test_two_worker_ray_compile_is_byte_identical_to_serial(tiny_dirs, tiny_corpus, tmp_path):
    from dmpq_compile.cli import main

    common = [str(tiny_dirs("qwen3_moe")), "--target", "ort-cpu", "--no-progress", "--no-cache",
              "--calib-corpus", str(tiny_corpus), "--calib-sequences", "4", "--seq-len", "32",
              "--budget-code-bits", "3"]
    assert main(["compile", *common, "-o", str(tmp_path / "serial")]) == 0
    try:
        assert main(["compile", *common, "-o", str(tmp_path / "ray"), "--ray", "local:2"]) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    stats = {p["name"]: p["stats"] for p in report["passes"]}
    assert stats["sensitivity"]["remote_tasks"] == 2 and stats["quantize"]["remote_tasks"] == 2  # both layers ran remote
    serial, distributed = _files(tmp_path / "serial"), _files(tmp_path / "ray")
    assert sorted(serial) == sorted(distributed) and "model.onnx" in serial
    for name in serial:
        assert serial[name] == distributed[name], name
    a = json.loads((tmp_path / "serial" / "report.json").read_text())["experts"]
    assert a == report["experts"]  # the same sensitivities, to the last bit, and bits


def test_bad_ray_address_is_refused():
    from dmpq_compile.distributed import RayExecutor

    with pytest.raises(ValueError, match="local:N"):
        RayExecutor("local:zero")

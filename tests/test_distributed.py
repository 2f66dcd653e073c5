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


@pytest.mark.slow  # about 30 s
def test_interrupted_ray_compile_resumes_without_redoing_finished_layers(tiny_corpus, tmp_path, monkeypatch):
    """``compile --ray local:2`` interrupted in the sensitivity pass, then in the quantize pass, then run
    to the end: the layers finished before each interruption are not submitted again, and the artifact
    is byte-identical to an uninterrupted serial compile's. The three compiles share one two-worker
    cluster, started here as ``--ray local:2`` starts it (each compile then joins it): one start
    instead of three (a cluster's start is slow, and can time out, on a loaded 2-core machine); the
    tasks an interruption abandons run on, touching no file that a later compile reads."""
    from dmpq_compile.passes import quantize_resume
    from dmpq_compile.passes.infra import cache as cache_mod
    from dmpq_compile.passes.sensitivity import resume

    from dmpq_compile.cli import main
    from dmpq_compile.distributed import RayExecutor
    from dmpq_compile.testing import make_tiny_checkpoint

    layers = 4
    model = make_tiny_checkpoint("qwen3_moe", tmp_path / "m", num_hidden_layers=layers)
    common = [str(model), "--target", "ort-cpu", "--no-progress", "--calib-corpus", str(tiny_corpus),
              "--calib-sequences", "4", "--seq-len", "32", "--budget-code-bits", "3"]
    assert main(["compile", *common, "--no-cache", "-o", str(tmp_path / "serial")]) == 0

    submitted: list[tuple[str, int]] = []  # (task, layer) as the driver submits them
    submit = RayExecutor.submit

    def counted(self, fn, *args):
        layer = args[2] if fn.__name__ == "layer_expert_scores" else int(args[3].rsplit("-L", 1)[1].split(".")[0])
        submitted.append((fn.__name__, layer))
        return submit(self, fn, *args)

    def tasks(name):
        return [layer for fn, layer in submitted if fn == name]

    monkeypatch.setattr(RayExecutor, "submit", counted)
    folder = cache_mod.default_folder()
    ray_args = ["compile", *common, "-o", str(tmp_path / "ray"), "--ray", "local:2"]
    cluster = RayExecutor("local:2")
    try:
        # 1. Ctrl-C once the scores of the backward's first two layers (3, 2) are kept
        deliver, delivered = resume.PartialState.deliver, []

        def interrupt_in_sensitivity(state, sample, layer, *args):
            deliver(state, sample, layer, *args)
            delivered.append(layer)
            if len(delivered) == 2:
                raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(resume.PartialState, "deliver", interrupt_in_sensitivity)
            assert main(ray_args) == 130
        (partial,) = folder.glob("sensitivity-*.partial")
        assert sorted(p.name for p in partial.glob("b*.pt")) == ["b0-2.pt", "b0-3.pt"]

        # 2. the rerun scores layers 1 and 0 only; Ctrl-C once the first quantize task's layer is kept
        submitted.clear()
        keep = quantize_resume.QuantizeState.keep

        def interrupt_in_quantize(state, name, path):
            keep(state, name, path)
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(quantize_resume.QuantizeState, "keep", interrupt_in_quantize)
            assert main(ray_args) == 130
        assert tasks("layer_expert_scores") == [1, 0] and tasks("layer_quantize") == list(range(layers))
        (partial,) = folder.glob("quantize-*.partial")
        (kept,) = [int(p.name[len("quantized-L"):-len(".safetensors")]) for p in partial.glob("quantized-*")]

        # 3. the rerun submits the other layers only, and finishes
        submitted.clear()
        assert main(ray_args) == 0
        assert tasks("layer_expert_scores") == []  # the finished pass: from the pass cache
        assert tasks("layer_quantize") == [i for i in range(layers) if i != kept]
    finally:
        cluster.close()
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    stats = {p["name"]: p["stats"] for p in report["passes"]}
    assert stats["quantize"]["remote_tasks"] == layers - 1 and stats["quantize"]["resumed_units"] == 1
    assert not list(folder.glob("*.partial"))
    serial, distributed = _files(tmp_path / "serial"), _files(tmp_path / "ray")
    assert sorted(serial) == sorted(distributed) and "model.onnx" in serial
    for name in serial:
        assert serial[name] == distributed[name], name
    assert json.loads((tmp_path / "serial" / "report.json").read_text())["experts"] == report["experts"]

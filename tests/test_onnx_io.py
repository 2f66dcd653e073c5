"""The shared ONNX writer: file names, external-data rule, byte count, checker gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from dmpq_compile.backends import BackendError
from dmpq_compile.backends.onnx_io import (
    DATA_FILE,
    MODEL_FILE,
    PROTOBUF_LIMIT,
    custom_domains,
    initializer_bytes,
    require_folder,
    save_checked,
    use_external,
)
from onnx import TensorProto, helper, numpy_helper


def _model(weight: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(weight, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize(("forced", "size", "threshold", "expected"), [
    (None, 10, 100.0, False), (None, 200_000_000, 100.0, True), (None, 10, 0.0, True),
    (True, 10, 100.0, True), (False, 200_000_000, 100.0, False),
])
def test_use_external(forced, size, threshold, expected):
    assert use_external(forced, size, threshold) is expected


def test_use_external_refuses_what_cannot_be_one_file():
    with pytest.raises(BackendError, match="2 GB"):
        use_external(False, PROTOBUF_LIMIT + 1)
    with pytest.raises(BackendError, match=">= 0"):
        use_external(None, 10, -1.0)


def test_initializer_bytes_counts_raw_and_typed_tensors():
    model = _model(np.ones((4, 3), np.float32))
    model.graph.initializer.append(helper.make_tensor("k", TensorProto.INT64, [2], [1, 2]))  # typed, not raw
    assert initializer_bytes(model) == 4 * 3 * 4 + 2 * 8


@pytest.mark.parametrize("external", [False, True])
def test_save_checked_writes_the_named_files(tmp_path, external):
    model = _model(np.ones((64, 32), np.float32))
    path = save_checked(model, tmp_path, external=external)
    assert path == tmp_path / MODEL_FILE and path.is_file()
    assert (tmp_path / DATA_FILE).is_file() is external
    assert custom_domains(model) == {"com.microsoft": 1}


def test_save_checked_and_require_folder_refuse(tmp_path):
    bad = _model(np.ones((4, 3), np.float32))
    bad.graph.node[0].input[1] = "missing"
    with pytest.raises(BackendError, match="onnx.checker"):
        save_checked(bad, tmp_path, external=False)
    with pytest.raises(BackendError, match="not a folder"):
        require_folder(tmp_path / "nope")


@pytest.mark.parametrize("target", ["ort-cpu", "trt-a100"])
def test_spilled_and_deferred_weights_write_the_same_model(tmp_path, tiny_dirs, monkeypatch, target):
    """Emission holds no weight in memory (every initializer deferred or spilled); the files it
    writes hold exactly the tensors of an in-memory lowering."""
    from dmpq_compile.backends import get_backend, onnx_lowering
    from dmpq_compile.passes import PassContext, PassManager, make_pass

    from dmpq_compile.frontend import load

    g = load(tiny_dirs("olmoe"))
    bits = {"ort-cpu": (2, 4, 8, 16), "trt-a100": (4, 8, 16)}[target]
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", bits[i % len(bits)])
    backend = get_backend(target)
    g = PassManager([make_pass("quantize")]).run(g, PassContext(progress=False, backend=backend))
    reference = {}
    for spill_min, folder in ((1 << 60, tmp_path / "plain"), (0, tmp_path / "spilled")):
        monkeypatch.setattr(onnx_lowering, "SPILL_MIN_BYTES", spill_min)
        folder.mkdir()
        backend.emit(g, folder, external_data=True) if target == "ort-cpu" else backend.emit(g, folder)
        assert not [p for p in folder.iterdir() if p.name not in (MODEL_FILE, DATA_FILE, "genai_config.json")]  # no spill
        model = onnx.load(str(folder / MODEL_FILE))  # loads external data into raw_data
        tensors = {t.name: t.raw_data if t.data_type == TensorProto.INT4 else numpy_helper.to_array(t)
                   for t in model.graph.initializer}
        if not reference:
            reference = tensors
            continue
        assert tensors.keys() == reference.keys()
        for name, value in tensors.items():
            assert np.array_equal(np.asarray(value), np.asarray(reference[name])), name

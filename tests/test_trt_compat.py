"""TensorRT ONNX compatibility checks (dmpq_compile.backends.trt.compat) on hand-built graphs."""

import numpy as np
import onnx
import pytest
from dmpq_compile.backends.trt.compat import check_model, errors, parse_trt_version
from dmpq_compile.backends.trt.qdq import int4_initializer
from onnx import TensorProto, helper, numpy_helper

K, N = 64, 8


def _model(nodes, inits, inputs=None, outputs=None, opset=21):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _rules(model, version="10.x"):
    return {i.rule for i in errors(check_model(model, version))}


def _int4_matmul(block=32, scale_shape=None, consumer="MatMul", port=1):
    codes = np.random.default_rng(0).integers(-8, 8, size=(K, N)).astype(np.int8)
    scale = np.full(scale_shape or (K // block, N), 0.01, np.float32)
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq", axis=0, block_size=block)
    ins = ["x", "wd"] if port == 1 else ["wd", "x"]
    use = helper.make_node(consumer, ins, ["y"], name="use")
    return _model([dq, use], [int4_initializer("w", codes), numpy_helper.from_array(scale, "s")])


def _int8_matmul(**dq_attrs):
    codes = np.ones((K, N), np.int8)
    scale = np.full(N, 0.01, np.float32)
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq", **({"axis": 1} | dq_attrs))
    mm = helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")
    return _model([dq, mm], [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scale, "s")])


# -- graphs that must pass ------------------------------------------------------------------------
def test_int4_block_weight_into_matmul_passes():
    model = _int4_matmul()
    onnx.checker.check_model(model, full_check=True)
    assert check_model(model) == []


def test_int8_per_channel_passes_with_a_weight_only_warning():
    issues = check_model(_int8_matmul())
    assert not errors(issues)
    assert [i.rule for i in issues] == ["int8-weight-only"]


def test_dq_through_transpose_into_gemm_weight_passes():
    codes = np.ones((N, K), np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq", axis=0),
             helper.make_node("Transpose", ["wd"], ["wt"], name="t", perm=[1, 0]),
             helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"], name="dqx"),
             helper.make_node("Gemm", ["xd", "wt"], ["y"], name="gemm")]
    inits = [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.full(N, 0.1, np.float32), "s"),
             numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz")]
    assert check_model(_model(nodes, inits)) == []
    nodes[2] = helper.make_node("QuantizeLinear", ["x", "xs"], ["xq"], name="q")  # ONNX default: UINT8
    assert [i.rule for i in check_model(_model(nodes, inits[:3]))] == ["q-uint8-default"]


def test_supported_plain_ops_pass():
    nodes = [helper.make_node("Softmax", ["x"], ["p"], name="sm", axis=-1),
             helper.make_node("TopK", ["p", "k"], ["y", "i"], name="topk", axis=-1)]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "k")]
    assert check_model(_model(nodes, inits)) == []


# -- graphs that must fail ------------------------------------------------------------------------
def test_unsupported_and_unknown_and_custom_ops_fail():
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="u")]
    assert "op-unsupported" in _rules(_model(nodes, []))
    nodes = [helper.make_node("MatMulNBits", ["x"], ["y"], name="mnb", domain="com.microsoft")]
    model = _model(nodes, [])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert "custom-domain" in _rules(model)
    assert "op-version" in _rules(_model([helper.make_node("RMSNormalization", ["x", "x"], ["y"], name="r")],
                                         [], opset=23), "10.8")


def test_block_size_on_int8_weight_fails():
    codes = np.ones((K, N), np.int8)
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq", axis=0, block_size=32)
    mm = helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")
    model = _model([dq, mm], [numpy_helper.from_array(codes, "w"),
                              numpy_helper.from_array(np.full((2, N), 0.1, np.float32), "s")])
    assert "block-int4-only" in _rules(model)


@pytest.mark.parametrize("consumer, port", [("Add", 1), ("MatMul", 0)])
def test_dq_not_feeding_a_matmul_weight_fails(consumer, port):
    assert "dq-weight-placement" in _rules(_int4_matmul(consumer=consumer, port=port))


def test_bad_block_sizes_fail():
    assert "block-size" in _rules(_int4_matmul(block=24, scale_shape=(3, N)))  # 24 does not divide 64
    assert "block-size" in _rules(_int4_matmul(block=16, scale_shape=(2, N)))  # scale says 32
    assert "block-axis" in _rules(_int4_matmul(block=32, scale_shape=(2, N // 2)))


def test_float64_tensor_fails():
    nodes = [helper.make_node("Cast", ["x"], ["x64"], name="c", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x64"], ["y"], name="c2", to=TensorProto.FLOAT)]
    assert "dtype-double" in _rules(_model(nodes, []))


def test_zero_points_and_uint8_codes_fail():
    codes = np.ones((K, N), np.uint8)
    dq = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], name="dq", axis=1)
    mm = helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")
    inits = [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.full(N, 0.1, np.float32), "s"),
             numpy_helper.from_array(np.full(N, 8, np.uint8), "z")]
    rules = _rules(_model([dq, mm], inits))
    assert {"qdq-zero-point", "dq-input-type", "dtype-uint8"} <= rules


def test_scatternd_add_and_nonconstant_topk_fail():
    nodes = [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="sc", reduction="add")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K]),
              helper.make_tensor_value_info("i", TensorProto.INT64, [2, 1]),
              helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, K])]
    assert "scatternd-reduction" in _rules(_model(nodes, [], inputs=inputs))
    nodes = [helper.make_node("TopK", ["x", "k"], ["y", "j"], name="t")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K]),
              helper.make_tensor_value_info("k", TensorProto.INT64, [1])]
    assert "const-input" in _rules(_model(nodes, [], inputs=inputs))


def test_int4_feeding_a_non_dq_op_and_wrong_input_type_fail():
    model = _model([helper.make_node("Cast", ["w"], ["y"], name="c", to=TensorProto.FLOAT)],
                   [int4_initializer("w", np.zeros((K, N), np.int8))])
    assert "quantized-type-use" in _rules(model)
    inputs = [helper.make_tensor_value_info("x", TensorProto.BOOL, [4])]
    assert "op-type" in _rules(_model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [], inputs=inputs))


def test_opset_range_per_version():
    model = _int4_matmul()
    assert "opset" in _rules(model, "10.0")  # TensorRT 10.0 documents opsets 9..20
    assert not _rules(model, "10.15")
    assert [i.severity for i in check_model(model, "10.8") if i.rule == "opset"] == ["warning"]


def test_versions_and_issue_text():
    assert parse_trt_version("10.x") == ((10, 15), True)
    assert parse_trt_version("10.8.0.43") == ((10, 8), False)
    with pytest.raises(ValueError, match="only TensorRT 10.x"):
        check_model(_int4_matmul(), "8.6")
    issue = errors(check_model(_int4_matmul(consumer="Add"), "10.x"))[0]
    text = str(issue)
    assert issue.node == "dq" and "dq-weight-placement" in text and "fix:" in text


def test_checks_a_saved_model_with_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_int4_matmul(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert check_model(path) == []

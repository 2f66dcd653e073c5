"""dmpq's ``ai.dmpq.GroupQueryAttention`` (backends/ort_cpu/csrc/gqa.h) against onnxruntime's own
``com.microsoft.GroupQueryAttention`` on the same inputs: decode and prefill rows, group sizes 1 to 8 (and 3, the
head-at-a-time branch), head sizes the AVX2 loop takes and one it does not (portable), a batch whose rows are
padded differently, the growing cache and a buffer shared between past and present (genai's
past_present_share_buffer); and the lowering: the kernel dispatch's artifacts use it, the others do not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from dmpq_compile.backends.ort_cpu import kernels
from onnx import TensorProto, helper

LOWEST = np.finfo(np.float32).min


def _session(library, ours: bool, heads: int, kv_heads: int, threads: int = 2) -> ort.InferenceSession:
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("q", "k", "v", "past_key", "past_value")]
    if ours:
        inputs += [helper.make_tensor_value_info("total", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info("bias", f, None)]
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "total", "bias"],
                                ["out", "present_key", "present_value"], domain=kernels.DOMAIN, num_heads=heads,
                                kv_num_heads=kv_heads)
    else:
        inputs += [helper.make_tensor_value_info("seqlens", TensorProto.INT32, None),
                   helper.make_tensor_value_info("total32", TensorProto.INT32, []),
                   helper.make_tensor_value_info("bias", f, None)]
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens", "total32",
                                                        "", "", "", "bias"],
                                ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                                kv_num_heads=kv_heads)
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_key", "present_value")]
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1),
                                             helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if ours:
        kernels.register(opts, library)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _case(batch, tokens, past, heads, kv_heads, hd, pad=(), seed=0):
    """Random q/k/v and a past of ``past`` positions; the bias is causal, and row ``b`` of the batch cannot see
    its first ``pad[b]`` positions (left padding)."""
    rng = np.random.default_rng(seed)
    total = past + tokens
    q = rng.standard_normal((batch, tokens, heads * hd), np.float32)
    k, v = (rng.standard_normal((batch, tokens, kv_heads * hd), np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((batch, kv_heads, past, hd), np.float32) for _ in range(2))
    allowed = np.arange(total)[None, None, :] <= (past + np.arange(tokens))[None, :, None]  # [1, T, S]
    allowed = np.repeat(allowed, batch, 0)
    for b, n in enumerate(pad):
        allowed[b, :, :n] = False
    bias = np.where(allowed, 0.0, LOWEST).astype(np.float32)[:, None]  # [B, 1, T, S]
    return {"q": q, "k": k, "v": v, "past_key": pk, "past_value": pv, "bias": bias}, total


def _run(sess, ours, feed, total):
    feed = dict(feed)
    if ours:
        feed["total"] = np.array([total], np.int64)
    else:
        feed["seqlens"] = np.full(len(feed["q"]), total - 1, np.int32)
        feed["total32"] = np.array(total, np.int32)
    return sess.run(None, feed)


def _reference(feed, total, heads, kv_heads):
    """float64 numpy: each query head h against KV head h // group, scores scaled by 1/sqrt(hd) plus the bias."""
    q, bias = feed["q"].astype(np.float64), feed["bias"].astype(np.float64)
    batch, tokens = q.shape[:2]
    hd = q.shape[2] // heads
    keys = [np.concatenate([feed[f"past_{r}"], feed[r[0]].reshape(batch, tokens, kv_heads, hd).transpose(0, 2, 1, 3)],
                           axis=2).astype(np.float64) for r in ("key", "value")]
    q = q.reshape(batch, tokens, heads, hd).transpose(0, 2, 1, 3)  # [B, heads, T, hd]
    group = heads // kv_heads
    k, v = (np.repeat(t, group, axis=1) for t in keys)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias  # [B, heads, T, S]
    s = np.where(np.arange(total)[None, None, None, :] <= (total - tokens + np.arange(tokens))[None, None, :, None],
                 s, -np.inf)  # causal
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * hd), keys[0], keys[1]


# heads, kv heads, head_dim: group sizes 1, 2, 4, 8 and 3 (a head at a time); head_dim 12 takes the portable loop
# (onnxruntime's op refuses head sizes that are not multiples of 8, so that one is checked against numpy only)
SHAPES = [(4, 4, 16), (8, 4, 32), (8, 2, 64), (32, 4, 128), (6, 2, 24), (4, 2, 12)]


@pytest.mark.parametrize("heads,kv_heads,hd", SHAPES)
# decode and prompt rows; several key tiles; many rows
@pytest.mark.parametrize("tokens,past", [(1, 0), (1, 37), (9, 0), (23, 41), (1, 300), (20, 250), (70, 100)])
def test_it_computes_what_onnxruntimes_group_query_attention_computes(library, heads, kv_heads, hd, tokens, past):
    feed, total = _case(1, tokens, past, heads, kv_heads, hd)
    got = _run(_session(library, True, heads, kv_heads), True, feed, total)
    ref = _reference(feed, total, heads, kv_heads)
    wants = [ref] if hd % 8 else [ref, _run(_session(library, False, heads, kv_heads), False, feed, total)]
    for want in wants:
        for name, w, g in zip(("out", "present_key", "present_value"), want, got):
            assert g.shape == w.shape, name
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=name)


def test_padded_rows_and_a_broadcast_bias(library):
    """Two rows padded differently (numpy's attention with the same bias: onnxruntime's op needs query_seqlens
    for a batch of several new tokens after a cache); a [1, 1, T, S] bias serves both rows."""
    heads, kv_heads, hd = 8, 2, 32
    feed, total = _case(2, 6, 291, heads, kv_heads, hd, pad=(0, 200))  # row 1: its first two tiles all padding
    got = _run(_session(library, True, heads, kv_heads), True, feed, total)
    for w, g in zip(_reference(feed, total, heads, kv_heads), got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)
    alone = {k: v[1:] for k, v in feed.items()}  # the padded row alone: the same output
    np.testing.assert_allclose(_run(_session(library, True, heads, kv_heads), True, alone, total)[0], got[0][1:],
                               rtol=1e-6, atol=1e-7)
    feed, total = _case(2, 6, 11, heads, kv_heads, hd)
    one = dict(feed, bias=feed["bias"][:1])
    np.testing.assert_array_equal(_run(_session(library, True, heads, kv_heads), True, one, total)[0],
                                  _run(_session(library, True, heads, kv_heads), True, feed, total)[0])


def test_a_buffer_shared_by_past_and_present_is_written_in_place(library):
    """genai's shared buffer: past and present bound to one [B, kv, capacity, hd] buffer; the op writes the new
    rows at [past, total) and leaves the rest; the output is the growing cache's."""
    heads, kv_heads, hd, capacity = 8, 2, 32, 64
    feed, total = _case(1, 3, 20, heads, kv_heads, hd)
    sess = _session(library, True, heads, kv_heads)
    want = _run(sess, True, feed, total)
    bufs = {}
    binding = sess.io_binding()
    binding.bind_output("out")
    for name, out in (("past_key", "present_key"), ("past_value", "present_value")):
        buf = np.full((1, kv_heads, capacity, hd), 7.0, np.float32)
        buf[:, :, :20] = feed[name]
        bufs[name] = ort.OrtValue.ortvalue_from_numpy(buf)
        binding.bind_ortvalue_input(name, bufs[name])
        binding.bind_ortvalue_output(out, bufs[name])
    for name in ("q", "k", "v", "bias"):
        binding.bind_cpu_input(name, feed[name])
    binding.bind_cpu_input("total", np.array([total], np.int64))
    sess.run_with_iobinding(binding)
    np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], want[0])
    for name, present in (("past_key", want[1]), ("past_value", want[2])):
        buf = bufs[name].numpy()
        np.testing.assert_array_equal(buf[:, :, :total], present)
        assert (buf[:, :, total:] == 7.0).all()


def test_bad_inputs_are_refused_with_the_reason(library):
    heads, kv_heads, hd = 4, 2, 16
    feed, total = _case(1, 2, 3, heads, kv_heads, hd)
    sess = _session(library, True, heads, kv_heads)
    with pytest.raises(Exception, match="total .* must be the past's length plus the 2 new positions"):
        _run(sess, True, feed, total + 5)
    with pytest.raises(Exception, match=r"bias must be \[batch or 1, 1, tokens, total\]"):
        _run(sess, True, dict(feed, bias=feed["bias"][..., :-1]), total)
    with pytest.raises(Exception, match="key and value must be"):
        _run(sess, True, dict(feed, k=feed["k"][..., :-1]), total)
    with pytest.raises(Exception, match="num_heads must be a positive multiple of kv_num_heads"):
        _session(library, True, 6, 4)


def test_only_the_kernel_dispatch_lowers_attention_to_it(library, tiny_dirs, tmp_path):
    from dmpq_compile.backends.ort_cpu import MODEL_FILE, OrtCpuBackend
    from dmpq_compile.passes.infra.base import PassContext
    from dmpq_compile.passes.quantize import QuantizePass

    from dmpq_compile.frontend import load

    graph = load(tiny_dirs("qwen3_moe"))
    for node in graph.experts():
        graph.annotate(node.id, "bits", 4)
    QuantizePass().call(graph, PassContext(progress=False, backend=OrtCpuBackend()))
    ops = {}
    for dispatch in ("kernel", "fused"):
        (tmp_path / dispatch).mkdir()
        OrtCpuBackend().emit(graph, tmp_path / dispatch, dispatch=dispatch)
        model = onnx.load(str(tmp_path / dispatch / MODEL_FILE), load_external_data=False)
        ops[dispatch] = {(n.domain, n.op_type) for n in model.graph.node if n.op_type == "GroupQueryAttention"}
    assert ops == {"kernel": {(kernels.DOMAIN, "GroupQueryAttention")},
                   "fused": {("com.microsoft", "GroupQueryAttention")}}

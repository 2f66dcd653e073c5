"""``logits_to_keep`` drops positions at the last layer's attention residual, not only at the head.

Everything after that residual (post-attention norm, routing, experts, combine, the final norm and the
head) works position by position, so a prefill that keeps N of T positions runs the last layer's MoE on N
rows, as llama.cpp does (its ``inp_out_ids`` before the last layer's feed-forward part). The logits must
not change (tests/test_runtime.py checks them against every position); here: where it happens, that the
MoE really sees the kept rows only, under both contracts, and where it must not happen.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.backends.onnx_lowering import LoweringOptions, keep_point, lower

from dmpq_compile.frontend import load
from dmpq_compile.ir.graph import Graph
from dmpq_compile.testing import TINY_FAMILIES


def _last_residual(graph: Graph) -> str:
    last_attn = list(graph.nodes("attention"))[-1]
    (res,) = [c for c in graph.consumers(last_attn.id) if c.kind == "add"]
    return res.id


def _session_with_router_rows(graph: Graph, genai: bool) -> tuple[ort.InferenceSession, str]:
    """The lowered model with the last router's probabilities ``[rows, experts]`` as a second output."""
    lowered = lower(graph, options=LoweringOptions(dispatch="gather", logits_to_keep=True, genai=genai))
    model = lowered.model
    router = [n for n in graph.nodes("router")][-1].id
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax" and n.name.startswith(f"{router}/")]
    model.graph.output.append(onnx.helper.make_tensor_value_info(softmax.output[0], onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), softmax.output[0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_keep_point_is_the_last_attention_residual(family, tiny_dirs):
    graph = load(tiny_dirs(family))
    assert keep_point(graph) == _last_residual(graph)


@pytest.mark.parametrize("genai", [False, True], ids=["plain", "genai"])
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])  # qwen2_moe: a shared expert beside the routed ones
def test_the_last_layers_moe_runs_on_the_kept_positions_only(family, genai, tiny_dirs):
    graph = load(tiny_dirs(family))
    sess, probs = _session_with_router_rows(graph, genai)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11]], np.int64)
    full_logits, full_rows = sess.run(["logits", probs], decoder_feed(sess, ids, logits_to_keep=0))
    assert full_rows.shape[0] == 7
    for keep in (1, 3):
        logits, rows = sess.run(["logits", probs], decoder_feed(sess, ids, logits_to_keep=keep))
        assert rows.shape[0] == keep  # the last layer routed `keep` positions, not 7
        assert np.abs(rows - full_rows[-keep:]).max() <= 1e-6
        if not genai:
            assert np.abs(logits - full_logits[:, -keep:]).max() <= 1e-5
    if genai:  # genai never feeds the input: the default (-1) keeps the last real position, spread into [B, T, V]
        feed = decoder_feed(sess, ids)
        del feed["logits_to_keep"]
        logits, rows = sess.run(["logits", probs], feed)
        assert rows.shape[0] == 1 and logits.shape == full_logits.shape
        assert np.abs(logits[:, -1] - full_logits[:, -1]).max() <= 1e-5 and not logits[:, :-1].any()


def _toy(stream_read_late: bool, after_head: bool = False) -> Graph:
    g = Graph()
    g.add("ids", "input")
    g.add("emb", "embed", ["ids"])
    g.add("attn", "attention", ["emb"])
    g.add("res", "add", ["emb", "attn"])
    g.add("n", "norm", ["res"])
    g.add("mlp", "mlp", ["n"])
    g.add("out", "add", ["emb" if stream_read_late else "res", "mlp"])
    g.add("fn", "norm", ["out"])
    g.add("head", "lm_head", ["fn"])
    if after_head:
        g.add("later", "norm", ["head"])
    return g


def test_no_earlier_keep_point_where_a_later_node_reads_from_before_it():
    assert keep_point(_toy(stream_read_late=False)) == "res"
    # the block's output adds the stream from before the residual: that needs every position of it, so the
    # earliest point is the block's output
    assert keep_point(_toy(stream_read_late=True)) == "out"
    assert keep_point(_toy(stream_read_late=False, after_head=True)) is None

"""Parity of emitted ort-cpu models with the reference interpreter on the same quantized tensors.

Tolerances (measured on the tiny models of all four families, experts at 2/4/8/16 bits):

* ``accuracy_level=0`` (fp32 activations): max |logit diff| ~1.5e-6; asserted <= 1e-4.
* ``accuracy_level=4`` (the default; MatMulNBits quantizes activations to int8 per block):
  mean |diff| <= 4e-3 and perplexity within 0.2 % measured; asserted mean <= 1e-2 and
  perplexity within 0.5 %. The max |diff| is not bounded (up to ~0.6 measured): a token whose
  top-k router scores nearly tie can pick a different expert.
* Incremental decoding (prefill, then one token at a time) vs one full pass: ~1e-6; <= 1e-4.
"""

import numpy as np
import pytest
import torch
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.backends.ort_cpu import MODEL_FILE, OrtCpuBackend
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile import runtime
from dmpq_compile.artifact import write_artifact
from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter
from dmpq_compile.testing import TINY_FAMILIES
from dmpq_compile.testing.tiny import tiny_text

BITS_CYCLE = (2, 4, 8, 16)


def mixed_graph(path):
    graph = load(path)
    for i, node in enumerate(graph.experts()):
        graph.annotate(node.id, "bits", BITS_CYCLE[i % len(BITS_CYCLE)])
    QuantizePass(group_size=32).call(graph, PassContext(progress=False))
    return graph


@pytest.fixture(scope="module")
def quantized(tiny_dirs):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = mixed_graph(tiny_dirs(family))
        return cache[family]

    return get


def emitted(graph, folder, accuracy_level):
    folder.mkdir()
    OrtCpuBackend().emit(graph, folder, accuracy_level=accuracy_level)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])


def run(sess, ids, past=None):
    out = sess.run(None, decoder_feed(sess, ids, past))
    return out[0], out[1:]


def mean_nll(logits, ids):
    lg = logits[:, :-1].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - top).sum(-1)) + top[..., 0]
    return float(np.mean(lse - np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0]))


def reference(graph, ids):
    with torch.no_grad():
        return Interpreter(graph, quantize=True)(torch.from_numpy(ids)).numpy()


def random_ids(graph, shape, seed=0):
    return np.random.default_rng(seed).integers(0, graph.meta["vocab_size"], shape, dtype=np.int64)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mixed_bits_match_interpreter_exactly_at_accuracy_level_0(family, quantized, tmp_path):
    graph = quantized(family)
    assert {n.ann["bits"] for n in graph.experts()} == set(BITS_CYCLE)
    ids = random_ids(graph, (2, 24))
    logits, _ = run(emitted(graph, tmp_path / "m", 0), ids)
    assert np.abs(logits - reference(graph, ids)).max() <= 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_accuracy_level_4_keeps_perplexity(family, quantized, tmp_path):
    graph = quantized(family)
    ids = random_ids(graph, (2, 64), seed=1)
    logits, _ = run(emitted(graph, tmp_path / "m", 4), ids)
    ref = reference(graph, ids)
    assert np.abs(logits - ref).mean() <= 1e-2
    assert abs(np.exp(mean_nll(logits, ids) - mean_nll(ref, ids)) - 1) <= 5e-3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_incremental_decoding_matches_full_pass(family, quantized, tmp_path):
    graph = quantized(family)
    sess = emitted(graph, tmp_path / "m", 4)
    ids = random_ids(graph, (1, 30), seed=2)
    full, _ = run(sess, ids)
    logits, past = run(sess, ids[:, :18])
    steps = [logits]
    for t in range(18, 30):
        logits, past = run(sess, ids[:, t:t + 1], past)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_runtime_perplexity_matches_interpreter(family, tiny_dirs, tmp_path):
    """Text -> tokenizer -> artifact (default options) perplexity vs the interpreter's, within 0.5 %."""
    graph = mixed_graph(tiny_dirs(family))  # tiny checkpoints come with a tokenizer.json
    assert "tokenizer.json" in graph.meta["tokenizer_files"]
    model = runtime.load(write_artifact(graph, OrtCpuBackend(), tmp_path / "art"))
    text = tiny_text(10, seed=5)
    score = model.score(text, chunk=48)  # chunked through the KV cache
    ids = np.asarray(model.encode(text), dtype=np.int64)[None, :]
    assert score.tokens == ids.shape[1] - 1 > 48
    ref_ppl = float(np.exp(mean_nll(reference(graph, ids), ids)))
    assert abs(score.perplexity / ref_ppl - 1) <= 5e-3

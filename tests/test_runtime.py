"""The artifact runtime: verification, logits/KV cache, scoring, generation, CLI, dependencies."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from dmpq_compile.backends.ort_cpu import OrtCpuBackend
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile import runtime
from dmpq_compile.artifact import write_artifact
from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter
from dmpq_compile.runtime import ArtifactError, sample

PROMPT = "the expert router sends"


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    graph = load(tiny_dirs("qwen3_moe"))
    for i, node in enumerate(graph.experts()):
        graph.annotate(node.id, "bits", (2, 4, 8, 16)[i % 4])
    QuantizePass(group_size=32).call(graph, PassContext(progress=False, backend=OrtCpuBackend()))
    return write_artifact(graph, OrtCpuBackend(), tmp_path_factory.mktemp("rt") / "art")


@pytest.fixture(scope="module")
def model(artifact):
    return runtime.load(artifact, threads=1)


@pytest.fixture
def copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


def test_a_float16_overflow_is_an_error_not_a_number(tiny_dirs, tmp_path):
    """ort-cpu's per-expert quantized products run on float16 activations: an expert whose output exceeds
    65504 overflows. The session refuses the non-finite logits and names the fix, --scale-dtype float32,
    which runs the same model in fp32 activations. The fused dispatch's QMoE takes fp32 activations
    (its float16 scales are widened), so the same 4-bit experts fused do not overflow."""
    sessions = {}
    for scales in ("float16", "float32"):
        graph = load(tiny_dirs("qwen3_moe"))
        for node in graph.experts():
            graph.annotate(node.id, "bits", 4)
            key = node.params["down"]
            graph.weights.set(key, graph.weights[key] * 1e6)  # outputs far beyond float16's range
        backend = OrtCpuBackend(scale_dtype=scales)
        QuantizePass(group_size=32).call(graph, PassContext(progress=False, backend=backend))
        with torch.no_grad():  # in fp32 the model is fine: the norms undo the scale
            assert torch.isfinite(Interpreter(graph)(torch.tensor([[1, 2, 3]]))).all()
        sessions[scales] = runtime.load(write_artifact(graph, backend, tmp_path / scales,
                                                       emit_options={"dispatch": "gather-if"}), threads=1)
        if scales == "float16":
            fused = runtime.load(write_artifact(graph, backend, tmp_path / "fused"), threads=1)
            assert np.isfinite(fused.logits([1, 2, 3])).all()
    with pytest.raises(FloatingPointError, match="float16 activations.*--scale-dtype float32"):
        sessions["float16"].logits([1, 2, 3])
    assert np.isfinite(sessions["float32"].logits([1, 2, 3])).all()


def test_logits_shapes_and_kv_cache(model):
    v = model.vocab_size
    assert model.logits([1, 2, 3]).shape == (3, v)
    both = model.logits(np.array([[1, 2, 3], [4, 5, 6]]))
    assert both.shape == (2, 3, v)
    assert np.abs(both[0] - model.logits([1, 2, 3])).max() <= 1e-5
    _, past = model.forward([[1, 2, 3]])
    assert past.length == 3 and past.batch == 1
    step, past = model.forward([[4]], past)
    assert past.length == 4
    assert np.abs(step[0, 0] - model.logits([1, 2, 3, 4])[-1]).max() <= 1e-4
    assert np.abs(model.logits([4], past=model.forward([1, 2, 3])[1]) - step[0]).max() <= 1e-4


def test_a_kv_buffer_decodes_in_place_as_the_growing_cache_does(model):
    """Decode steps on a KVBuffer bind it as past and present (written in place): the same logits and
    cached positions as the growing KVCache, for a batch of two, with the prompt run by the other path."""
    ids = np.array([[5, 6, 7, 8, 9], [9, 3, 2, 1, 4]])
    ref, cache = model.forward(ids, logits_to_keep=1)
    buf = model.empty_cache(2, capacity=9)
    assert isinstance(buf, runtime.KVBuffer) and buf.capacity == 9 and buf.length == 0
    got, buf = model.forward(ids, buf, logits_to_keep=1)
    assert buf.length == 5 and np.abs(got - ref).max() <= 1e-6
    calls = []
    step_in_place = model._step_in_place
    model._step_in_place = lambda feed, past: calls.append(1) or step_in_place(feed, past)
    try:
        for _ in range(4):
            nxt = ref[:, -1].argmax(-1)[:, None]
            ref, cache = model.forward(nxt, cache)
            got, buf = model.forward(nxt, buf)
            assert got.shape == ref.shape == (2, 1, model.vocab_size)
            assert np.abs(got - ref).max() <= 1e-5
    finally:
        model._step_in_place = step_in_place
    assert len(calls) == 4 and buf.length == cache.length == 9
    for a, b in zip((*buf.keys, *buf.values), (*cache.keys, *cache.values)):
        assert np.abs(a - b).max() <= 1e-6
    with pytest.raises(ValueError, match="exceed the KV buffer's capacity 9"):
        model.forward([[1], [2]], buf)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        model.empty_cache(1, capacity=0)


def test_logits_to_keep_projects_only_the_last_positions(model):
    ids = [[5, 6, 7, 8, 9]]
    full, past_full = model.forward(ids)
    assert model.keeps_logits and model.manifest["target"]["io"]["logits_to_keep"] == "logits_to_keep"
    for keep, rows in ((1, 1), (3, 3), (5, 5), (9, 5), (0, 5)):
        got, past = model.forward(ids, logits_to_keep=keep)
        assert got.shape == (1, rows, model.vocab_size)  # the graph slices: ORT did not fold the default away
        assert np.abs(got - full[:, 5 - rows:]).max() <= 1e-5
        assert past.length == 5 and np.abs(past.keys[-1] - past_full.keys[-1]).max() <= 1e-6
    assert model.logits([5, 6, 7]).shape == (3, model.vocab_size)  # the default keeps every position
    # an artifact compiled before the input existed returns every position: the runtime slices them
    sess = model._sess

    class Old:  # the graph's every-position behaviour, without the input in the feed
        def run(self, names, feed):
            assert "logits_to_keep" not in feed
            return sess.run(names, {**feed, "logits_to_keep": np.array(0, np.int64)})

    model._keep_name, model._sess = None, Old()
    try:
        assert not model.keeps_logits
        got, _ = model.forward(ids, logits_to_keep=2)
        assert got.shape == (1, 2, model.vocab_size) and np.abs(got - full[:, 3:]).max() <= 1e-5
    finally:
        model._keep_name, model._sess = "logits_to_keep", sess
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            model.forward(ids, logits_to_keep=bad)


def test_greedy_generation_is_the_argmax_loop(model):
    ids = model.encode(PROMPT)
    expected = []
    for _ in range(6):
        expected.append(int(np.argmax(model.logits(ids + expected)[-1])))
    model.eos_token_ids = frozenset()
    try:
        got = list(model.generate_ids(ids, max_new_tokens=6))
        assert got == expected
        assert model.generate(PROMPT, max_new_tokens=6) == model.decode(expected)
        assert "".join(model.generate(PROMPT, max_new_tokens=6, stream=True)) == model.decode(expected)
    finally:
        model.eos_token_ids = frozenset(model.manifest["tokenizer"]["eos_token_ids"])


def test_generation_stops_at_eos(model):
    first = next(iter(model.generate_ids(model.encode(PROMPT), max_new_tokens=1)), None)
    original = model.eos_token_ids
    model.eos_token_ids = frozenset({first})
    try:
        assert model.generate(PROMPT, max_new_tokens=5) == ""
    finally:
        model.eos_token_ids = original


def test_sampling_is_seeded_and_top_p_restricts(model):
    ids = model.encode(PROMPT)
    a = list(model.generate_ids(ids, 8, temperature=1.0, top_p=0.9, seed=7))
    b = list(model.generate_ids(ids, 8, temperature=1.0, top_p=0.9, seed=7))
    assert a == b
    greedy = list(model.generate_ids(ids, 8))
    assert list(model.generate_ids(ids, 8, temperature=1.5, top_p=1e-9, seed=3)) == greedy
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 2.0, 1.9, -5.0])
    assert {sample(logits, 1.0, 0.45, rng) for _ in range(50)} == {1}  # p = .49, .44, .07, 0
    assert {sample(logits, 1.0, 0.9, rng) for _ in range(200)} == {1, 2}
    assert sample(logits, 0.0, 1.0, rng) == 1


def test_score_is_chunk_invariant(model):
    text = "the expert router sends each token to a few experts and the model adds their weighted outputs"
    whole = model.score(text)
    assert whole.tokens == len(model.encode(text)) - 1
    assert whole.perplexity == pytest.approx(np.exp(whole.nll))
    assert model.score(text, chunk=5).nll == pytest.approx(whole.nll, abs=1e-5)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.logits([1, model.vocab_size])
    with pytest.raises(ValueError, match="integer array"):
        model.logits([0.5, 1.0])
    with pytest.raises(ValueError, match="integer array"):
        model.logits([])
    with pytest.raises(ValueError, match="past holds"):
        model.forward([[1, 2]], past=model.empty_cache(batch=2))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(PROMPT, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.score_ids([1])


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.joinpath("model.onnx").write_bytes(b"\0" + d.joinpath("model.onnx").read_bytes()[1:]),
     r"model\.onnx does not match its sha256"),
    (lambda d: d.joinpath("tokenizer.json").write_bytes(d.joinpath("tokenizer.json").read_bytes()[:-10]),
     r"tokenizer\.json has .* bytes .* truncated"),
    (lambda d: d.joinpath("report.json").unlink(), r"report\.json is missing"),
    (lambda d: d.joinpath("manifest.json").write_text("{not json"), r"manifest\.json is not valid JSON"),
    (lambda d: d.joinpath("manifest.json").unlink(), r"manifest\.json is missing"),
    (lambda d: _edit_manifest(d, format_version=99), r"format_version 99 is not supported"),
    (lambda d: _edit_manifest(d, target={"backend": "trt-a100", "format": "onnx"}), r"targets 'trt-a100'"),
])
def test_damaged_artifacts_are_refused(copy, damage, message):
    damage(copy)
    with pytest.raises(ArtifactError, match=message):
        runtime.load(copy)


def test_verification_can_be_skipped_but_not_the_manifest(copy, tmp_path):
    copy.joinpath("report.json").write_text("{}")
    runtime.load(copy, verify=False)
    with pytest.raises(ArtifactError, match="not a folder"):
        runtime.load(tmp_path / "nowhere")


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_runtime_needs_neither_torch_nor_transformers(artifact):
    script = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from dmpq_compile import runtime
        model = runtime.load({str(artifact)!r})
        print(repr(model.generate({PROMPT!r}, max_new_tokens=4)))
        print(model.score({PROMPT!r}).tokens)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].isdigit()


def test_cli_run_streams_the_generation(artifact, model, capsys):
    from dmpq_compile.cli import main

    assert main(["run", str(artifact), PROMPT, "--max-new-tokens", "5", "--threads", "1"]) == 0
    assert capsys.readouterr().out == model.generate(PROMPT, max_new_tokens=5) + "\n"
    assert main(["run", str(artifact / "missing"), PROMPT]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_multi_token_logits_are_deterministic_with_two_threads(tiny_dirs, tmp_path):
    """onnxruntime's ScatterND(add) races on repeated rows with >1 thread; the combine must not use it."""
    import numpy as np
    from dmpq_compile.backends import get_backend
    from dmpq_compile.passes import PassContext, make_pass

    from dmpq_compile.artifact import write_artifact
    from dmpq_compile.frontend import load
    from dmpq_compile.runtime import load as load_artifact

    g = load(tiny_dirs("olmoe"))
    for n in g.experts():
        g.annotate(n.id, "bits", 16)
    g = make_pass("quantize").call(g, PassContext(progress=False)).graph
    session = load_artifact(write_artifact(g, get_backend("ort-cpu"), tmp_path / "a"), threads=2)
    ids = np.random.default_rng(0).integers(0, g.meta["vocab_size"], (16, 256))  # 4096 tokens x top-2
    first = session.logits(ids)
    for _ in range(15):
        assert np.array_equal(session.logits(ids), first)

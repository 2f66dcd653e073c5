"""ort-cpu artifacts are onnxruntime-genai model folders (issue: the genai contract).

What an app embedding the folder relies on, checked through onnxruntime-genai itself where it is
installed (the README's set-up installs it) and through the graph and our runtime everywhere:

* ``genai_config.json`` loads with genai's defaults, its shared KV buffer included, and greedy
  tokens equal our runtime's, and on a uniform 16-bit artifact transformers' fp32 model's, on
  all four families;
* batches of prompts of different lengths, padded on either side, give each row the tokens it
  gets alone (positions and attention follow ``attention_mask``);
* appending tokens after a generation equals one run on the concatenation;
* a prefill without ``logits_to_keep`` (genai never feeds it) projects only each row's last real
  token, laid into the ``[B, T, V]`` genai binds; scoring still gets every position.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.backends.ort_cpu import OrtCpuBackend
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile import runtime
from dmpq_compile.artifact import write_artifact
from dmpq_compile.frontend import load
from dmpq_compile.testing import TINY_FAMILIES

NEW = 8


def _artifact(model_dir, out, bits_cycle=None, **emit):
    graph = load(model_dir)
    for i, node in enumerate(graph.experts()):
        graph.annotate(node.id, "bits", bits_cycle[i % len(bits_cycle)] if bits_cycle else 16)
    if bits_cycle:
        QuantizePass(group_size=32).call(graph, PassContext(progress=False))
    return write_artifact(graph, OrtCpuBackend(), out, emit_options=emit)


@pytest.fixture(scope="module")
def artifacts(tiny_dirs, tmp_path_factory):
    """(family, kind) -> artifact folder; kind ``fp`` (every expert 16-bit) or ``mixed`` (2/4/8/16)."""
    cache = {}

    def get(family, kind="fp"):
        if (family, kind) not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{kind}") / "art"
            cache[family, kind] = _artifact(tiny_dirs(family), out, (2, 4, 8, 16) if kind == "mixed" else None)
        return cache[family, kind]

    return get


def _prompt(vocab, length, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(2, vocab, length)]  # 0/1: pad, eos, bos


def _until_eos(tokens, eos):
    out = []
    for t in tokens:
        if int(t) in eos:
            break
        out.append(int(t))
    return out


def _ours(session, prompt, n=NEW):
    return list(session.generate_ids(prompt, n))


def _og_generate(og, model, rows, n=NEW, pad=None):
    """genai's greedy continuation of each row of ``rows`` (a list of equal-length id lists)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(rows[0]) + n, batch_size=len(rows), do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(rows, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [list(gen.get_sequence(i))[len(rows[0]):] for i in range(len(rows))]


def _hf_greedy(model_dir, prompt, n=NEW):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):  # plain argmax steps: no generation config, no EOS handling
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


# -- the graph and our runtime (no onnxruntime-genai needed) ------------------------------------

def test_every_ort_cpu_artifact_carries_a_genai_config(artifacts, capsys):
    art = artifacts("olmoe")
    manifest = json.loads((art / "manifest.json").read_text())
    config = json.loads((art / "genai_config.json").read_text())
    io = manifest["target"]["io"]
    assert io["attention_mask"] == config["model"]["decoder"]["inputs"]["attention_mask"] == "attention_mask"
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["num_hidden_layers"] == len(io["kv_cache"])
    genai = manifest["target"]["genai"]
    assert genai["config"] == "genai_config.json" and genai["max_length"] == config["search"]["max_length"]
    kv = io["kv_cache"][0]
    assert genai["kv_bytes_per_token"] == len(io["kv_cache"]) * 2 * 4 * kv["num_kv_heads"] * kv["head_dim"]
    assert "genai_config.json" in manifest["files"]  # checksummed like the model
    from dmpq_compile.cli import main
    from dmpq_compile.commands.inspect import genai_line

    per_sequence = genai["kv_bytes_per_token"] * genai["max_length"] / 2**20
    assert genai_line(art).startswith(f"onnxruntime-genai: genai_config.json, max_length {genai['max_length']} "
                                      f"(KV buffer {per_sequence:.1f} MiB per sequence")
    capsys.readouterr()
    assert main(["inspect", str(art), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["genai"] == genai and "chat_template" in shown


def test_max_length_is_set_at_compile_and_checked(tiny_dirs, tmp_path):
    art = _artifact(tiny_dirs("mixtral"), tmp_path / "a", max_length=64)
    assert json.loads((art / "genai_config.json").read_text())["search"]["max_length"] == 64
    from dmpq_compile.backends.base import BackendError

    with pytest.raises(BackendError, match="exceeds the model's max_position_embeddings"):
        _artifact(tiny_dirs("mixtral"), tmp_path / "b", max_length=10 ** 7)
    session = runtime.load(art, max_length=16)
    with pytest.raises(ValueError, match="exceed max_length 16 given to load"):
        session.forward(np.ones((1, 17), np.int64))


def test_default_prefill_projects_each_rows_last_real_token(artifacts):
    import onnxruntime as ort

    art = artifacts("qwen3_moe", "mixed")
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([_prompt(96, 6, 1), _prompt(96, 6, 2)], np.int64)
    full = sess.run(["logits"], decoder_feed(sess, ids, logits_to_keep=0))[0]
    feed = decoder_feed(sess, ids)
    del feed["logits_to_keep"]  # what genai feeds
    feed["attention_mask"] = np.array([[1] * 6, [1] * 4 + [0] * 2])  # row 1 right-padded
    spread = sess.run(["logits"], feed)[0]
    assert spread.shape == full.shape
    assert np.abs(spread[0, 5] - full[0, 5]).max() <= 1e-4 and not spread[0, :5].any()
    assert np.abs(spread[1, 3] - full[1, 3]).max() <= 1e-4 and not np.delete(spread[1], 3, axis=0).any()


def test_padded_rows_compute_what_they_compute_alone(artifacts):
    session = runtime.load(artifacts("olmoe", "mixed"))
    prompts = [_prompt(96, n, 10 + n) for n in (1, 7, 20)]
    width = 20
    for side in ("left", "right"):
        rows, masks = [], []
        for p in prompts:
            pad = [0] * (width - len(p))
            rows.append(pad + p if side == "left" else p + pad)
            masks.append([0] * len(pad) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(pad))
        last, past = session.forward(np.array(rows), attention_mask=np.array(masks), logits_to_keep=1)
        step_mask = np.concatenate([np.array(masks), np.ones((3, 1), np.int64)], axis=1)
        nxt = np.full((3, 1), 5, np.int64)
        step, _ = session.forward(nxt, past, attention_mask=step_mask)
        for i, p in enumerate(prompts):
            alone, alone_past = session.forward(np.array([p]), logits_to_keep=1)
            assert np.abs(last[i, 0] - alone[0, 0]).max() <= 1e-3, (side, len(p))
            alone_step, _ = session.forward(nxt[:1], alone_past)
            assert np.abs(step[i, 0] - alone_step[0, 0]).max() <= 1e-3, (side, len(p))


def test_a_model_without_a_mask_refuses_padding(artifacts):
    session = runtime.load(artifacts("mixtral"))
    session._mask_name = None
    with pytest.raises(ValueError, match="takes no attention_mask"):
        session.forward(np.ones((1, 3), np.int64), attention_mask=np.ones((1, 3), np.int64))


# -- through onnxruntime-genai ----------------------------------------------------------------

@pytest.fixture(scope="module")
def og():
    return pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                               "(scripts/setup.sh installs it: pip install onnxruntime-genai)")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_genai_greedy_tokens_equal_ours_and_transformers(family, artifacts, tiny_dirs, og):
    art = artifacts(family)
    session = runtime.load(art)
    model = og.Model(str(art))
    eos = session.eos_token_ids
    for seed, length in ((1, 5), (2, 13)):
        prompt = _prompt(session.vocab_size, length, seed)
        ours = _ours(session, prompt)
        theirs = _until_eos(_og_generate(og, model, [prompt])[0], eos)
        assert theirs == ours, (family, seed)
        assert _until_eos(_hf_greedy(tiny_dirs(family), prompt), eos) == ours, (family, seed)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_genai_runs_mixed_bit_artifacts_like_our_runtime(family, artifacts, og):
    art = artifacts(family, "mixed")
    session = runtime.load(art)
    model = og.Model(str(art))
    prompt = _prompt(session.vocab_size, 9, 3)
    assert _until_eos(_og_generate(og, model, [prompt])[0], session.eos_token_ids) == _ours(session, prompt)


def test_genai_batches_of_different_lengths_match_each_prompt_alone(artifacts, og):
    art = artifacts("qwen2_moe")
    session = runtime.load(art)
    model = og.Model(str(art))
    pad = json.loads((art / "genai_config.json").read_text())["model"]["pad_token_id"]
    prompts = [_prompt(session.vocab_size, n, 20 + n) for n in (1, 7, 20)]
    alone = [_og_generate(og, model, [p])[0] for p in prompts]
    # genai pads a batch on the right (its tokenizer's encode_batch does) and masks only trailing pad ids:
    # leading ones are tokens to it, so left padding is tested through our runtime, which takes any mask
    batch = _og_generate(og, model, [p + [pad] * (20 - len(p)) for p in prompts])
    for got, want in zip(batch, alone):
        assert _until_eos(got, session.eos_token_ids) == _until_eos(want, session.eos_token_ids)


def test_genai_appends_tokens_after_a_generation(artifacts, og):
    art = artifacts("mixtral", "mixed")
    session = runtime.load(art)
    model = og.Model(str(art))
    first, second = _prompt(session.vocab_size, 6, 5), _prompt(session.vocab_size, 4, 6)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=40, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([first], np.int32))
    for _ in range(5):
        gen.generate_next_token()
    gen.append_tokens(np.array([second], np.int32))  # the next turn of a chat
    for _ in range(5):
        gen.generate_next_token()
    seq = [int(t) for t in gen.get_sequence(0)]
    prefix = seq[:-5]
    assert prefix[len(first) + 5:] == second
    assert _until_eos(seq[len(prefix):], session.eos_token_ids) == _ours(session, prefix, 5)


def test_the_documented_app_example_runs_on_a_sample_artifact(tmp_path, og):
    """docs/examples/genai-app/chat.py, as a user runs it, on the bundled sample's artifact."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    art = _artifact(repo / "samples" / "mixtral-tiny", tmp_path / "art", (4, 8))
    out = subprocess.run([sys.executable, str(repo / "docs/examples/genai-app/chat.py"), str(art), "The list type",
                          "--max-new-tokens", "12"], capture_output=True, text=True, check=True, timeout=120).stdout
    expected = runtime.load(art).generate("The list type", max_new_tokens=12)
    assert out.strip() == f"{'The list type'!r} -> {expected!r}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fp32_artifact_logits_match_transformers(family, artifacts, tiny_dirs):
    """The GroupQueryAttention graph of a 16-bit artifact (fp32 throughout) against transformers' fp32 model,
    prefill and a decode step, to 1e-4."""
    from transformers import AutoModelForCausalLM

    session = runtime.load(artifacts(family))
    ids = np.array([_prompt(session.vocab_size, 11, 7)])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs(family), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    logits, past = session.forward(ids[:, :10])
    step, _ = session.forward(ids[:, 10:], past)
    assert np.abs(logits - ref[:, :10]).max() <= 1e-4 and np.abs(step - ref[:, 10:]).max() <= 1e-4


def test_genai_runs_olmoe_with_clip_qkv(tmp_path, og):
    from dmpq_compile.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("olmoe", tmp_path / "ckpt", clip_qkv=0.3)
    art = _artifact(ckpt, tmp_path / "art")
    session = runtime.load(art)
    prompt = _prompt(session.vocab_size, 8, 9)
    ours = _ours(session, prompt)
    assert _until_eos(_og_generate(og, og.Model(str(art)), [prompt])[0], session.eos_token_ids) == ours
    assert _until_eos(_hf_greedy(ckpt, prompt), session.eos_token_ids) == ours

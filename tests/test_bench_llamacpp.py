"""Pure logic of the llama.cpp comparison (benchmarks/llamacpp.py, benchmarks/bench_llamacpp.py).

Registration is also checked against a real llama.cpp converter when one is built and named by
``$DMPQ_LLAMA_CPP`` (its cmake build folder); otherwise that test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llamacpp as lc

CONVERTER = '''
    def get_vocab_base_pre(self, tokenizer) -> str:
        chktxt = '\\n \\n\\n 3 33 I\\'ve'

        chktok = tokenizer.encode(chktxt)
        chkhsh = sha256(str(chktok).encode()).hexdigest()
        res = None

        if chkhsh == "aaaa":
            # ref: https://huggingface.co/openai-community/gpt2
            res = "gpt-2"

        if res is None:
            raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")

        return res
        # Marker: End get_vocab_base_pre
'''


def test_checker_text_reads_the_literal():
    assert lc.checker_text("class M:\n" + CONVERTER) == "\n \n\n 3 33 I've"


def test_register_inserts_before_the_check_and_is_idempotent():
    once = lc.register_pre_tokenizer(CONVERTER, "bbbb", "gpt-2", "samples/x")
    assert once.index('if chkhsh == "bbbb":') < once.index("if res is None:")
    assert once.index('if chkhsh == "aaaa":') < once.index('if chkhsh == "bbbb":')
    assert '# ref: samples/x\n            res = "gpt-2"' in once
    assert lc.register_pre_tokenizer(once, "bbbb", "gpt-2", "samples/x") == once
    assert lc.register_pre_tokenizer(CONVERTER, "aaaa", "other", "x") == CONVERTER  # known hash: untouched
    compile("class M:\n" + once, "converter", "exec")


def test_register_refuses_an_unknown_layout():
    with pytest.raises(lc.LlamaCppError, match="Marker"):
        lc.register_pre_tokenizer("def f():\n    return 1\n", "bbbb", "gpt-2", "x")


def test_pre_name_maps_only_gpt2_byte_level():
    byte_level = {"model": {"type": "BPE"}, "normalizer": None,
                  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert lc.llama_pre_name(byte_level) == "gpt-2"
    assert lc.llama_pre_name(json.loads((ROOT / "samples" / "mixtral-tiny" / "tokenizer.json").read_text())) == "gpt-2"
    for changed in ({"pre_tokenizer": {"type": "Whitespace"}}, {"normalizer": {"type": "NFC"}},
                    {"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}):
        with pytest.raises(lc.LlamaCppError):
            lc.llama_pre_name({**byte_level, **changed})


def test_hash_matches_the_converters_rule():
    from hashlib import sha256

    assert lc.pre_tokenizer_hash([1, 2, 3]) == sha256(b"[1, 2, 3]").hexdigest()


def test_bpw_and_parameter_counts():
    assert lc.stored_bpw(4_500, 8_000) == 4.5
    with pytest.raises(ValueError):
        lc.stored_bpw(1, 0)
    shapes = {"model.embed_tokens.weight": (10, 4), "model.layers.0.mlp.gate.weight": (2, 4),
              "model.layers.0.mlp.experts.0.up_proj.weight": (8, 4),
              "model.layers.0.mlp.experts.gate_up_proj": (2, 16, 4),
              "model.layers.0.mlp.shared_expert.up_proj.weight": (8, 4)}
    assert lc.count_params(shapes) == (40 + 8 + 32 + 128 + 32, 32 + 128)
    assert lc.is_gguf_expert("blk.0.ffn_up_exps.weight") and not lc.is_gguf_expert("blk.0.ffn_up_shexp.weight")


def test_sample_parameters_match_the_safetensors():
    total, experts = lc.count_params(lc.safetensors_shapes(ROOT / "samples" / "mixtral-tiny"))
    assert (total, experts) == (4_396_160, 4 * 8 * 3 * 128 * 256)


def test_budget_matches_the_whole_file_when_it_can():
    from bench_llamacpp import dmpq_budget

    params = (1000, 800)
    # 200 non-expert bytes; the GGUF at 4 bpw holds 500 bytes: 300 are left for the experts
    assert dmpq_budget(4.0, 4.2, params, 200, 100) == (300.0, "whole file")
    # the non-expert part alone exceeds the GGUF: match the experts' 4.2 bpw (420 bytes) instead
    assert dmpq_budget(4.0, 4.2, params, 600, 100) == (pytest.approx(420.0), "experts only")
    assert dmpq_budget(2.0, 0.5, params, 600, 100) == (100, "experts only")  # never below the 2-bit floor


def test_rows_print_what_the_files_really_hold():
    """A GGUF named Q2_K whose rows fell back to Q4_0 says so; a dmpq row gives its experts' bit-widths."""
    from bench_llamacpp import table, types_held

    gguf = {"kind": "gguf", "elements_by_type": {"Q4_0": 750, "Q2_K": 0, "F32": 250}, "bpw": 4.6, "tensor_bpw": 4.5,
            "expert_bpw": 4.5, "file_bytes": 10**6}
    dmpq = {"kind": "dmpq", "bits_histogram": {"4": 1, "2": 3}, "bpw": 4.6, "tensor_bpw": 4.5, "expert_bpw": 2.6,
            "file_bytes": 10**6}
    assert types_held(gguf) == "Q4_0 75%, F32 25%, Q2_K 0%"
    assert types_held(dmpq) == "experts: 2-bit 75%, 4-bit 25%"
    text = table({"gguf-Q2_K": gguf, "dmpq~Q2_K": dmpq})
    assert "| gguf-Q2_K |" in text and "Q4_0 75%" in text and "experts: 2-bit 75%" in text


def test_quality_only_run_skips_timing():
    import bench_llamacpp as bench

    args = bench.parse_args(["--llama-cpp", "x", "--models", "mixtral-tiny", "--rounds", "0", "--pass-cache"])
    rows = {"dmpq-fp32": {"kind": "dmpq", "path": "/nonexistent"}}
    bench.interleaved_speed(None, rows, args)  # would fail on the missing artifact if it timed anything
    assert rows == {"dmpq-fp32": {"kind": "dmpq", "path": "/nonexistent"}} and args.pass_cache


def test_models_are_names_or_trained_checkpoint_folders(tmp_path, capsys):
    import bench_llamacpp as bench

    SAMPLES = ROOT / "samples"
    args = bench.parse_args(["--llama-cpp", "x", "--models", "mixtral-tiny", str(SAMPLES / "olmoe-tiny")])
    assert args.specs[0] is bench.MODELS["mixtral-tiny"]
    folder = args.specs[1]
    assert (folder.name, folder.path, folder.quality, folder.shape) == ("olmoe-tiny", SAMPLES / "olmoe-tiny", True, None)
    assert bench.checkpoint(folder, tmp_path, reuse=False) == SAMPLES / "olmoe-tiny"
    with pytest.raises(SystemExit):
        bench.parse_args(["--llama-cpp", "x", "--models", str(tmp_path)])
    assert "neither one of mixtral-tiny" in capsys.readouterr().err


def test_parsers():
    bench = ('[{"n_prompt": 128, "n_gen": 0, "avg_ts": 640.0}, '
             '{"n_prompt": 0, "n_gen": 32, "n_depth": 128, "avg_ts": 250.0}]')
    assert lc.parse_bench_json("log line\n" + bench) == {"prefill_tok_s": 640.0, "decode_ms": 4.0}
    base = "[1]42.1,[2]43.0,\nFinal estimate: PPL = 43.0123 +/- 0.51234\n"
    assert lc.parse_perplexity(base) == {"ppl": 43.0123}
    kl = ("Mean PPL(Q)                   :  44.100000 ±   0.5\nMean PPL(base)                :  43.012300 ±   0.5\n"
          "Mean    KLD:   0.012345 ±   0.000200\nSame top p: 91.234 ± 0.1 %\n")
    assert lc.parse_perplexity(kl) == {"ppl": 44.1, "ppl_q": 44.1, "ppl_base": 43.0123, "kl": 0.012345,
                                       "top1_vs_base": pytest.approx(0.91234)}
    with pytest.raises(lc.LlamaCppError):
        lc.parse_perplexity("error")
    assert lc.parse_token_ids("load...\n[0, 12, 345]\n") == [0, 12, 345]


def test_perplexity_is_run_again_when_its_output_lacks_the_figures(monkeypatch, tmp_path):
    outputs = iter(["[1]42.1,[2]43.0,\n", "[1]42.1,[2]43.0,\nFinal estimate: PPL = 43.0123 +/- 0.5\n"])
    calls = []
    monkeypatch.setattr(lc, "run", lambda cmd, what: calls.append(cmd) or next(outputs))
    assert lc.run_perplexity(["llama-perplexity"], "base", pause=0) == {"ppl": 43.0123} and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(lc, "run", lambda cmd, what: calls.append(cmd) or "truncated")
    with pytest.raises(lc.LlamaCppError, match="after 5 tries"):
        lc.run_perplexity(["llama-perplexity"], "base", pause=0)
    assert len(calls) == 5  # bounded

    # the pipe lost the last lines but the tool's own log file has them: one run is enough
    log = tmp_path / "ppl.log"

    def cut_pipe(cmd, what):
        calls.append(cmd)
        log.write_text("[1]42.1,\nFinal estimate: PPL = 41.5 +/- 0.5\n")
        return "[1]42.1,"

    calls.clear()
    monkeypatch.setattr(lc, "run", cut_pipe)
    assert lc.run_perplexity(["llama-perplexity"], "base", log_file=log, pause=0) == {"ppl": 41.5}
    assert calls == [["llama-perplexity", "--log-file", str(log)]]


def _logprobs(rng, rows: int, vocab: int) -> np.ndarray:
    x = rng.normal(0, 3, (rows, vocab))
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logprobs_file_round_trip_and_cut_files(tmp_path):
    rng = np.random.default_rng(0)
    n_ctx, vocab, chunks = 16, 37, 3
    tokens = rng.integers(0, vocab, (chunks, n_ctx))
    lps = [_logprobs(rng, n_ctx - 1 - n_ctx // 2, vocab) for _ in range(chunks)]
    path = tmp_path / "base.kld"
    lc.write_logprobs_file(path, tokens, lps)
    assert path.stat().st_size == lc.logprobs_file_size(n_ctx, vocab, chunks)
    assert lc.logprob_row_width(37) == 42  # llama.cpp: 2 * ((n_vocab + 1) / 2) + 4
    n, v, k, back = lc.read_logprobs_header(path)
    assert (n, v, k) == (n_ctx, vocab, chunks) and np.array_equal(back, tokens)
    got = np.concatenate(list(lc.iter_logprobs(path, batch=2)))
    want = np.stack(lps)
    kept = want > want.max(-1, keepdims=True) - 16  # llama.cpp clips the rest to max - 16
    assert np.abs(got - want)[kept].max() <= 16 / 65535 / 2 + 1e-6  # half a 16-bit step
    path.write_bytes(path.read_bytes()[:-10])  # the tool stopped before the end
    with pytest.raises(lc.LlamaCppError, match="stopped before the end"):
        lc.read_logprobs_header(path)
    (tmp_path / "other").write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(lc.LlamaCppError, match="not a llama-perplexity log-probability file"):
        lc.read_logprobs_header(tmp_path / "other")


def test_logprobs_are_read_from_a_complete_file_after_retries(monkeypatch, tmp_path):
    tokens = np.zeros((2, 8), dtype=np.int64)
    lps = [_logprobs(np.random.default_rng(1), 3, 5) for _ in range(2)]
    tries = []

    def tool(cmd, what):  # the first run dies after half the file, the second completes
        out = Path(cmd[cmd.index("--kl-divergence-base") + 1])
        lc.write_logprobs_file(out, tokens, lps)
        if not tries:
            out.write_bytes(out.read_bytes()[:40])
        tries.append(cmd)
        return "log without the final lines"

    monkeypatch.setattr(lc, "run", tool)
    out = tmp_path / "q.kld"
    assert lc.run_logprobs(["llama-perplexity"], "q", out, tries=3, pause=0) == {}  # figures come from the file
    assert len(tries) == 2 and lc.read_logprobs_header(out)[2] == 2
    tries.clear()
    monkeypatch.setattr(lc, "run", lambda cmd, what: tries.append(cmd) or "")
    with pytest.raises(lc.LlamaCppError, match="after 3 tries"):
        lc.run_logprobs(["llama-perplexity"], "q", out, tries=3, pause=0)
    assert len(tries) == 3


def _bigram_table(vocab: int) -> np.ndarray:
    return np.random.default_rng(2).normal(0, 2, (vocab, vocab)).astype(np.float32)


def _llama_perplexity_file(text: str, tok, n_ctx: int, n_chunk: int, table: np.ndarray, out: Path) -> None:
    """What llama-perplexity --kl-divergence-base writes, written the way perplexity.cpp loops: tokenize the
    whole text, cut chunks of n_ctx, for i in [n_ctx/2, n_ctx - 1) store the distribution at position i (over
    tokens[i + 1]). The model here is a bigram table (logits depend on the token at the position only)."""
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids[: n_ctx * n_chunk]).reshape(n_chunk, n_ctx)
    first = n_ctx // 2
    rows = []
    for chunk in ids:
        logits = table[chunk].astype(np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        rows.append(lp[first:n_ctx - 1])
    lc.write_logprobs_file(out, ids, rows)


def test_dmpq_and_llama_cpp_score_the_same_tokens_at_the_same_positions(monkeypatch, tmp_path):
    """The windows' text, read by llama-perplexity, gives the windows' tokens, and its scored positions are
    the ones dmpq_quality / chunk_logprobs score: the same model gives the same per-token NLL on both sides."""
    import bench_llamacpp as bench

    from dmpq_compile import runtime
    from dmpq_compile.eval import Document, NumpyLogits, build_windows, score
    from dmpq_compile.eval.tokens import load_tokenizer

    tok = load_tokenizer(ROOT / "samples" / "olmoe-tiny")
    rng = np.random.default_rng(0)
    words = ["expert", "router", "def", "return", "(x)", "=", "Python", "docs", "\n", "    "]
    docs = [Document(f"d{i}.txt", " ".join(rng.choice(words, 400))) for i in range(8)]
    w = build_windows(docs, tok, "t/test", context=32, max_windows=24)
    assert w.text_exact
    vocab = tok.get_vocab_size()
    table = _bigram_table(vocab)
    fn = NumpyLogits(lambda ids: table[ids])

    # the dmpq side: the artifact runtime is this bigram model
    monkeypatch.setattr(runtime, "load", lambda path, threads=None: type("S", (), {"logits": staticmethod(fn)})())
    ref = bench.chunk_logprobs(tmp_path / "fp32", w, 1)
    args = bench.parse_args(["--llama-cpp", "x", "--tries", "2"])
    rows = {"dmpq-fp32": {"kind": "dmpq", "path": str(tmp_path / "fp32")}}
    dmpq = bench.dmpq_quality(rows, ref, w, args)["dmpq-fp32"]
    assert np.allclose(dmpq.nll, score(fn, w).nll) and np.allclose(dmpq.kl, 0, atol=1e-9)

    # the llama.cpp side: the same model, through the file llama-perplexity would write from the text
    text = tmp_path / "t.txt"
    text.write_text(w.text)

    def fake_tool(cmd, what, out_file, tries, pause=1.0):
        assert cmd[cmd.index("-c") + 1] == "32" and cmd[cmd.index("--chunks") + 1] == str(w.ids.shape[0])
        _llama_perplexity_file(Path(cmd[cmd.index("-f") + 1]).read_text(), tok, 32, w.ids.shape[0], table, out_file)
        return {}

    monkeypatch.setattr(lc, "run_logprobs", fake_tool)
    llama = bench.gguf_scores(lc.LlamaCpp(tmp_path, tmp_path), tmp_path / "F32.gguf", w, text, ref, tmp_path, args)
    assert np.abs(llama.nll - dmpq.nll).max() < 2e-4  # 16-bit codes: same tokens, same positions
    assert abs(llama.kl.mean()) < 1e-5 and llama.top1.all()  # the 16-bit codes: ~1e-6, far below real KLs

    # a file for other tokens (e.g. a BOS the GGUF adds) is refused, not scored
    def shifted(cmd, what, out_file, tries, pause=1.0):
        _llama_perplexity_file("x" + w.text, tok, 32, w.ids.shape[0], table, out_file)
        return {}

    monkeypatch.setattr(lc, "run_logprobs", shifted)
    with pytest.raises(RuntimeError, match="scored other tokens than the t/test windows"):
        bench.gguf_scores(lc.LlamaCpp(tmp_path, tmp_path), tmp_path / "F32.gguf", w, text, ref, tmp_path, args)


def test_no_results_file_holds_only_errors(monkeypatch, tmp_path, capsys):
    import bench_llamacpp as bench

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(lc, "find_llama_cpp", lambda d: lc.LlamaCpp(tmp_path, tmp_path))
    monkeypatch.setattr(bench, "llama_version", lambda llama: "test")

    def fail(llama, spec, args):
        raise RuntimeError("llama-perplexity failed")

    monkeypatch.setattr(bench, "run_model", fail)
    assert bench.main(["--llama-cpp", str(tmp_path), "--models", "olmoe-tiny"]) == 1
    assert not list(tmp_path.glob("llamacpp-*.json"))
    assert "no results file written" in capsys.readouterr().err


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(lc.LlamaCppError, match="pip download"):
        lc.find_llama_cpp(tmp_path)


def test_registration_against_the_built_converter():
    build = os.environ.get("DMPQ_LLAMA_CPP")
    if not build:
        pytest.skip("llama.cpp is not built: set DMPQ_LLAMA_CPP to its cmake build folder (see benchmarks/README.md)")
    llama = lc.find_llama_cpp(build)
    text = llama.converter_file().read_text(encoding="utf-8")
    assert "🚀" in lc.checker_text(text)
    new = lc.register_pre_tokenizer(text, "0" * 64, "gpt-2", "test")
    assert new.count('if chkhsh == "' + "0" * 64 + '":') == 1
    compile(new, "converter", "exec")


def test_token_check_reads_the_file_verbatim(monkeypatch, tmp_path):
    """llama-tokenize processes escapes (a literal backslash-x-e-0 in pydoc's text) unless told not to;
    llama-perplexity reads the file verbatim, so the check must too."""
    import bench_llamacpp as bench

    seen = []
    monkeypatch.setattr(lc, "run", lambda cmd, what: seen.append(cmd) or "[1, 2, 3]")
    assert bench.check_tokens(lc.LlamaCpp(tmp_path, tmp_path), tmp_path / "m.gguf", tmp_path / "t.txt", [1, 2, 3], 3)[
        "first_mismatch"] is None
    assert "--no-escape" in seen[0] and "--no-bos" in seen[0]
    with pytest.raises(RuntimeError, match="differently from tokenizers at token 1"):
        bench.check_tokens(lc.LlamaCpp(tmp_path, tmp_path), tmp_path / "m.gguf", tmp_path / "t.txt", [1, 5, 3], 3)


def test_a_reused_checkpoint_is_put_into_the_bench_form(tmp_path):
    """A folder that testing.scale wrote directly (fused experts, its own tokenizer) gets the samples'
    tokenizer, the model class and per-expert keys when reused, values unchanged; a second pass changes nothing."""
    import bench_llamacpp as bench
    from safetensors.torch import load_file

    from dmpq_compile.testing.scale import write_random_checkpoint

    ckpt = tmp_path / "checkpoint"
    write_random_checkpoint("olmoe", ckpt, hidden_size=32, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                            num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1, vocab_size=300)
    before = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    fused = [k for k in before if k.endswith("experts.gate_up_proj")]
    assert fused  # transformers 5 writes fused experts
    spec = bench.ModelSpec("tiny", "olmoe-1b-7b", False, "f16", bench.SHAPE_FLAGS, bench.FP32_REFERENCE)
    assert bench.checkpoint(spec, tmp_path, reuse=True) == ckpt
    after = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert not any("gate_up_proj" in k for k in after)
    gate_up = before[fused[0]]
    moe = fused[0].removesuffix(".experts.gate_up_proj")
    assert np.array_equal(after[f"{moe}.experts.1.gate_proj.weight"].float().numpy(), gate_up[1, :16].float().numpy())
    assert np.array_equal(after[f"{moe}.experts.1.up_proj.weight"].float().numpy(), gate_up[1, 16:].float().numpy())
    assert (ckpt / "tokenizer.json").read_bytes() == (ROOT / "samples" / "mixtral-tiny" / "tokenizer.json").read_bytes()
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["OlmoeForCausalLM"]
    stamp = {f.name: f.stat().st_mtime_ns for f in ckpt.glob("*.safetensors")}
    bench.bench_form(ckpt)
    assert {f.name: f.stat().st_mtime_ns for f in ckpt.glob("*.safetensors")} == stamp


def test_bytes_read_per_decoded_token_of_a_gguf(monkeypatch, tmp_path):
    """A GGUF row's bytes a decoded token reads: the routed fraction of the stacked expert tensors, one row of
    the embedding, every other tensor whole; the table divides them by the decode time."""
    import bench_llamacpp as bench

    tensors = {"blk.0.ffn_up_exps.weight": {"elements": 6400, "bytes": 6400, "type": "Q8_0", "rows": 64},
               "token_embd.weight": {"elements": 1000, "bytes": 1000, "type": "Q8_0", "rows": 100},
               "output.weight": {"elements": 500, "bytes": 500, "type": "Q8_0", "rows": 100}}
    monkeypatch.setattr(lc, "gguf_tensors", lambda llama, path: tensors)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"\0" * 8000)
    row = bench.gguf_row(None, path, (7900, 6400), 8 / 64)
    assert row["read_bytes_per_token"] == 6400 / 8 + 1000 / 100 + 500
    assert bench.read_cells({**row, "decode_ms": 1.0}) == [f"{1310 / 1e9:.3f}", f"{1310 / 1e-3 / 1e9:.1f}"]
    assert bench.read_cells({"decode_ms": 1.0}) == ["-", "-"]
    kv = 2 * 3 * 2 * 4 * 8 * (128 + 33 / 2)  # layers 2, kv heads 3, head_dim 8 (64 / 8 heads), fp32, mean depth
    config = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 3, "hidden_size": 64}
    assert bench.kv_read_bytes(config, 128, 32, 4) == round(kv)
    assert bench.kv_read_bytes({**config, "head_dim": 16}, 128, 32, 2) == round(kv)  # twice the dim at half the bytes
    with_kv = {**row, "decode_ms": 1.0, "kv_read_bytes_per_token": 690}
    assert bench.read_cells(with_kv) == [f"{2000 / 1e9:.3f}", f"{2000 / 1e-3 / 1e9:.1f}"]


def test_rows_whose_files_exceed_memory_are_warned_about(monkeypatch, tmp_path, capsys):
    """The speed rounds warn (and record) when the timed files do not fit in memory together: each file once."""
    import bench_llamacpp as bench

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 3000)
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.onnx").write_bytes(b"\0" * 1000)
    (art / "model.onnx.data").write_bytes(b"\0" * 4000)
    (art / "tokenizer.json").write_bytes(b"\0" * 500)  # not read by the timed runs
    rows = {"gguf-Q4_0": {"path": str(gguf)}, "art": {"path": str(art)}, "genai:art": {"path": str(art)}}
    assert bench.timed_bytes(rows) == 8000
    pages = {"SC_PAGE_SIZE": 1000, "SC_PHYS_PAGES": 20}
    monkeypatch.setattr(bench.os, "sysconf", lambda name: pages[name])
    assert bench.page_cache_check(rows) == {"timed_files_gb": 0.0, "memory_gb": 0.0, "fits": True}
    assert "warning" not in capsys.readouterr().out
    pages["SC_PHYS_PAGES"] = 9  # 9000 bytes: 8000 is over 80 % of it
    assert bench.page_cache_check(rows)["fits"] is False
    assert "hold 0.0 GB against 0.0 GB of memory" in capsys.readouterr().out

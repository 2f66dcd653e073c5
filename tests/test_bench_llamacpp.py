"""Pure logic of the llama.cpp comparison (benchmarks/llamacpp.py, benchmarks/bench_llamacpp.py).

Registration is also checked against a real llama.cpp converter when one is built and named by
``$DMPQ_LLAMA_CPP`` (its cmake build folder); otherwise that test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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


def test_perplexity_is_run_again_when_its_output_lacks_the_figures(monkeypatch):
    outputs = iter(["[1]42.1,[2]43.0,\n", "[1]42.1,[2]43.0,\nFinal estimate: PPL = 43.0123 +/- 0.5\n"])
    calls = []
    monkeypatch.setattr(lc, "run", lambda cmd, what: calls.append(cmd) or next(outputs))
    assert lc.run_perplexity(["llama-perplexity"], "base") == {"ppl": 43.0123} and len(calls) == 2
    monkeypatch.setattr(lc, "run", lambda cmd, what: "truncated")
    with pytest.raises(lc.LlamaCppError, match="no perplexity"):
        lc.run_perplexity(["llama-perplexity"], "base")


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

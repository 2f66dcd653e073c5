"""The evaluation protocol (dmpq_compile.eval.protocol): sets, windows, scored positions, bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmpq_compile.eval import Document, NumpyLogits, split_of
from dmpq_compile.eval.protocol import (
    DocBootstrap,
    ProtocolError,
    allocate_windows,
    build_windows,
    score,
    scored_positions,
    summarize,
    window_logprobs,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from dmpq_compile.eval.tokens import load_tokenizer

    return load_tokenizer(ROOT / "samples" / "olmoe-tiny")


def _docs(n: int, lines: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    words = ["the", "expert", "router", "import", "def", "return", "value", "(x)", "=", "docs", "Python", "3.11"]
    docs = []
    for d in range(n):
        body = "\n".join(" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(lines * (d + 1)))
        docs.append(Document(f"doc{d:02d}.txt", body))
    return docs


def test_allocation_caps_every_document_and_uses_every_one():
    counts = allocate_windows([100, 100, 100, 100, 100, 100, 100, 2], 64, 0.15)
    assert sum(counts) <= 64 and all(c >= 1 for c in counts)
    assert max(counts) <= 0.15 * sum(counts) and counts[-1] == 2
    # a short document lowers the total rather than let the others pass the cap
    assert allocate_windows([1] + [100] * 6, 64, 0.15) == [1] + [1] * 6
    with pytest.raises(ProtocolError, match="at least 7 documents"):
        allocate_windows([100] * 6, 64, 0.15)
    assert allocate_windows([5, 5], 8, 1.0) == [4, 4]


def test_windows_are_document_slices_and_their_text_tokenizes_back(tok):
    docs = _docs(9, 40)
    w = build_windows(docs, tok, "synthetic/test", context=64, max_windows=40)
    enc = {d.key: tok.encode(d.text, add_special_tokens=False).ids for d in docs}
    assert w.ids.shape == (w.doc_of_window.size, 64) and w.ids.shape[0] <= 40
    sep = tok.encode("\n", add_special_tokens=False).ids
    assert len(sep) == 1 and (w.ids[:, 0] == sep[0]).all()
    for row, d, s in zip(w.ids, w.doc_of_window, w.starts):
        assert row[1:].tolist() == enc[w.doc_keys[d]][s:s + 63]  # one document's own tokens
    assert w.text_exact and tok.encode(w.text, add_special_tokens=False).ids == w.ids.reshape(-1).tolist()
    for d in range(len(w.doc_keys)):  # the windows of one document never score a token twice
        starts = np.sort(w.starts[w.doc_of_window == d])
        assert (np.diff(starts) >= w.scored_per_window).all()
    shares = w.doc_shares()
    assert len(shares) == 9 and max(shares.values()) <= 0.15 and w.n_scored == w.ids.shape[0] * 31
    assert w.record()["max_doc_share"] == max(shares.values())


def test_short_documents_are_skipped_and_named(tok):
    docs = _docs(8, 30) + [Document("tiny.txt", "x = 1")]
    w = build_windows(docs, tok, "s", context=64)
    assert w.skipped == ("tiny.txt",) and "tiny.txt" not in w.doc_keys


def test_scored_positions_are_llama_perplexity_s():
    # llama-perplexity: first = n_ctx/2; logits i in [first, n_ctx - 1) predict tokens[i + 1]
    logits, targets = scored_positions(256)
    assert logits[0] == 128 and logits[-1] == 254 and targets[-1] == 255 and logits.size == 127


def test_score_reads_the_logits_at_the_scored_positions(tok):
    docs = _docs(8, 30)
    w = build_windows(docs, tok, "s", context=32, max_windows=16)
    V = tok.get_vocab_size()
    seen = []

    def fn(ids: np.ndarray) -> np.ndarray:
        # position t puts all its mass on the token at t + 1 (a perfect model) except at one position
        out = np.full((*ids.shape, V), -30.0, dtype=np.float32)
        nxt = np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
        np.put_along_axis(out, nxt[..., None], 0.0, axis=-1)
        out[:, 20] = 0.0  # uniform at logit position 20: scored (>= 16) and so counted
        seen.append(ids.copy())
        return out

    s = score(NumpyLogits(fn), w)
    assert np.array_equal(np.concatenate(seen), w.ids)
    assert s.nll.shape == (w.ids.shape[0], 15)
    col = 20 - 16  # logit position 20 is the 5th scored one
    assert np.allclose(s.nll[:, col], np.log(V), atol=1e-4)
    assert np.allclose(np.delete(s.nll, col, axis=1), 0.0, atol=1e-6)
    ref = window_logprobs(NumpyLogits(fn), w)
    both = score(NumpyLogits(fn), w, reference=ref)
    assert np.allclose(both.kl, 0.0, atol=1e-6) and both.top1.all()
    assert np.allclose(both.ref_nll, s.nll, atol=1e-5)


def test_bootstrap_two_documents_has_the_exact_answer():
    # documents 0 and 1 (one window each) with values 0 and 1: a replicate's mean is 0, 0.5 or 1
    # (probabilities 1/4, 1/2, 1/4), so the 95% percentile interval is [0, 1] around 0.5
    boot = DocBootstrap(np.array([0, 1]), n_boot=4000, seed=0)
    values = np.array([[0.0, 0.0], [1.0, 1.0]])
    m, reps = boot.replicates(values)
    assert m == 0.5 and set(np.unique(reps)) == {0.0, 0.5, 1.0}
    assert abs((reps == 0.5).mean() - 0.5) < 0.03
    iv = boot.mean(values)
    assert (iv.value, iv.lo, iv.hi) == (0.5, 0.0, 1.0)


def test_bootstrap_matches_the_normal_interval_of_many_documents():
    rng = np.random.default_rng(1)
    D = 400
    values = rng.normal(2.0, 1.0, size=(D, 1))
    iv = DocBootstrap(np.arange(D), n_boot=2000, seed=0).mean(values)
    half = 1.96 * values.std() / np.sqrt(D)
    assert iv.value == pytest.approx(values.mean())
    assert iv.hi - iv.lo == pytest.approx(2 * half, rel=0.1)
    assert iv.lo < values.mean() < iv.hi


def test_bootstrap_is_token_weighted_by_document_and_paired():
    doc_of = np.array([0, 0, 1, 2, 2, 2])
    a = np.arange(12, dtype=float).reshape(6, 2) + 1
    boot = DocBootstrap(doc_of, n_boot=500, seed=3)
    assert boot.mean(a).value == pytest.approx(a.mean())
    same = boot.mean(np.ones_like(a))
    assert (same.lo, same.hi) == (1.0, 1.0)  # every replicate: the same mean
    r = boot.ratio(2 * a, a)  # paired: the same documents in both means, so exactly 2
    assert (r.value, r.lo, r.hi) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0))
    p = boot.ppl_ratio(a + 0.1, a)
    assert p.lo == pytest.approx(np.exp(0.1)) and p.hi == pytest.approx(np.exp(0.1))
    unpaired = DocBootstrap(doc_of, n_boot=500, seed=4).replicates(a)[1] / boot.replicates(a)[1]
    assert unpaired.std() > 0  # what pairing removes
    with pytest.raises(ValueError, match="at least 2 documents"):
        DocBootstrap(np.zeros(3, dtype=int))
    assert DocBootstrap(doc_of, n_boot=50, seed=7).mean(a) == DocBootstrap(doc_of, n_boot=50, seed=7).mean(a)


def test_summarize_gives_intervals_and_paired_ratios(tok):
    from dmpq_compile.eval.protocol import Scores

    w = build_windows(_docs(8, 30), tok, "s", context=32, max_windows=16)
    rng = np.random.default_rng(0)
    base = Scores(rng.uniform(1, 3, w.targets.shape), kl=rng.uniform(0, 1e-2, w.targets.shape),
                  top1=np.ones(w.targets.shape, bool))
    other = Scores(base.nll + 0.05, kl=2 * base.kl, top1=base.top1)
    out = summarize(w, {"a": base, "b": other}, baseline="a")
    assert out["b"]["kl_ratio"]["value"] == pytest.approx(2.0) and out["b"]["kl_ratio"]["lo"] == pytest.approx(2.0)
    assert out["b"]["ppl_ratio"]["value"] == pytest.approx(np.exp(0.05))
    assert out["a"]["ppl"]["lo"] < out["a"]["ppl"]["value"] < out["a"]["ppl"]["hi"]


def test_dev_and_test_are_the_halves_of_the_old_test_range():
    from dmpq_compile.eval.corpus import split_fraction

    keys = [f"k{i}" for i in range(4000)]
    for k in keys:
        u = split_fraction(k)
        old = "test" if u < 0.05 else "calib" if u < 0.10 else "train"
        new = split_of(k)
        assert new == old or (old == "test" and new in ("dev", "test"))
        assert (new == "dev") == (u < 0.025)


def test_builtin_sets_are_disjoint_and_dev_holds_what_earlier_tables_read():
    from dmpq_compile.eval import CorpusError, assign_splits, load_documents

    try:
        pydoc = load_documents("pydoc")
    except CorpusError as e:
        pytest.skip(str(e))
    split = assign_splits([d.key for d in pydoc])
    # the first three documents of the old single test split, where the earlier llama.cpp and sample tables were read
    for key in ("c-api/allocation.rst.txt", "c-api/concrete.rst.txt", "c-api/unicode.rst.txt"):
        assert split[key] == "dev"
    assert sum(s == "test" for s in split.values()) >= 7 and sum(s == "dev" for s in split.values()) >= 7
    stdlib = load_documents("pystdlib")
    keys = {d.key for d in stdlib}
    assert "os.py" in keys and "traceback.py" in keys
    assert not any(k.startswith(("test/", "idlelib/idle_test/", "site-packages/", "pydoc_data/")) for k in keys)
    assert "encodings/cp1252.py" not in keys and "token.py" not in keys  # generated files


def test_pystdlib_leaves_out_tests_third_party_and_generated_files(tmp_path, monkeypatch):
    from dmpq_compile.eval import load_documents
    from dmpq_compile.eval.corpus import PYSTDLIB_ENV, pystdlib_version

    files = {"os.py": "import sys\n", "json/decoder.py": "def f():\n    return 1\n",
             "test/test_os.py": "import os\n", "idlelib/idle_test/t.py": "x = 1\n",
             "site-packages/pkg/mod.py": "y = 2\n", "encodings/cp1252.py": '""" Python Character Mapping Codec cp1252 """\n',
             "token.py": "# Auto-generated by Tools/scripts/generate_token.py\nA = 1\n",
             "pydoc_data/topics.py": "# Autogenerated by Sphinx\ntopics = {}\n", "README.txt": "not python\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setenv(PYSTDLIB_ENV, str(tmp_path))
    assert [d.key for d in load_documents("pystdlib")] == ["json/decoder.py", "os.py"]
    assert pystdlib_version() == f"{PYSTDLIB_ENV}={tmp_path}"


def test_more_documents_than_windows_gives_one_window_each_to_a_spread(tok):
    docs = _docs(12, 30)
    w = build_windows(docs, tok, "s", context=32, max_windows=8, max_share=0.15)
    assert w.ids.shape[0] == 8 and len(w.doc_keys) == 8 and len(w.undrawn) == 4
    assert max(w.doc_shares().values()) == 1 / 8 and w.record()["undrawn_documents"] == 4
    assert w.doc_keys[0] == "doc00.txt" and w.doc_keys[-1] == "doc11.txt"


def test_eval_json_flattens_to_one_row_per_artifact_with_every_domain():
    from dmpq_compile.eval.protocol import flatten_eval, format_quality

    iv = {"value": 2.0, "lo": 1.5, "hi": 2.5}
    result = {"sets": [{"set": "pydoc/test", "ppl": iv, "kl": iv, "top1": iv, "ppl_ratio": iv, "scored_tokens": 8001,
                        "documents": 7, "windows": 63},
                       {"set": "pystdlib/test", "ppl": {**iv, "value": 3.0}, "kl": iv, "scored_tokens": 8128,
                        "documents": 13, "windows": 64}]}
    row = flatten_eval(result)
    assert (row["ppl"], row["ppl_pystdlib"], row["tokens"], row["tokens_pystdlib"]) == (2.0, 3.0, 8001, 8128)
    assert set(row["quality"]) == {"pydoc/test", "pystdlib/test"}
    line = format_quality(row["quality"])
    assert "pydoc/test ppl 2.0000 [1.5000, 2.5000]" in line and "pystdlib/test ppl 3.0000" in line

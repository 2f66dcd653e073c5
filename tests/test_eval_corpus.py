"""Tests for dmpq_compile.eval.corpus: loaders, deterministic hash split, tokenization."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dmpq_compile.eval import (
    PYDOC_ENV,
    SPLITS,
    CorpusError,
    assign_splits,
    load_corpus,
    load_documents,
    pydoc_dir,
    split_documents,
    split_of,
    tokenize_corpus,
)


@pytest.fixture
def text_folder(tmp_path):
    root = tmp_path / "docs"
    (root / "b" / "deep").mkdir(parents=True)
    for i in range(30):
        sub = root / ("b/deep" if i % 3 == 0 else "b" if i % 3 == 1 else "")
        (sub / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 3)
    (root / "notes.md").write_text("# markdown\n")
    (root / ".hidden.txt").write_text("never read")
    (root / "script.py").write_text("print('any text file counts, whatever its suffix')\n")
    return root


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, hello python"] * 20, trainer=trainer)
    return tok


def test_folder_is_recursive_sorted_and_skips_hidden(text_folder):
    docs = load_documents(text_folder)  # binary files are errors: tests/test_user_paths_corpus.py
    keys = [d.key for d in docs]
    assert keys == sorted(keys)
    assert len(docs) == 32
    assert "b/deep/doc00.txt" in keys and "notes.md" in keys and "script.py" in keys
    assert not any("hidden" in k for k in keys)
    assert load_documents(str(text_folder)) == docs


def test_split_is_a_deterministic_partition(text_folder):
    docs = load_documents(text_folder)
    parts = {s: split_documents(docs, s) for s in SPLITS}
    keys = [d.key for s in SPLITS for d in parts[s]]
    assert sorted(keys) == sorted(d.key for d in docs)
    assert all(parts[s] for s in SPLITS), "train, calib, dev and test are all non-empty"
    assert split_documents(docs, None) == docs
    assert load_corpus(text_folder, "test") == [d.text for d in parts["test"]]
    # independent of order and of the other documents present
    assert assign_splits([d.key for d in reversed(docs)]) == assign_splits([d.key for d in docs])
    big = [f"file{i}.txt" for i in range(2000)]
    counts = Counter(split_of(k) for k in big)
    assert 0.85 < counts["train"] / 2000 < 0.95
    assert 0.03 < counts["calib"] / 2000 < 0.07
    assert 0.01 < counts["test"] / 2000 < 0.04 and 0.01 < counts["dev"] / 2000 < 0.04


def test_small_corpora_still_get_calib_and_test():
    keys = ["a", "b", "c"]
    assert sorted(assign_splits(keys).values()) == ["calib", "test", "train"]
    assert sorted(assign_splits(["a", "b", "c", "d"]).values()) == ["calib", "dev", "test", "train"]
    assert set(assign_splits(["only"]).values()) <= set(SPLITS)


def test_unknown_split_is_rejected(text_folder):
    with pytest.raises(CorpusError, match="unknown split 'validation'"):
        load_corpus(text_folder, "validation")


def test_single_text_file_is_cut_into_blocks(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(f"paragraph {i} " + "x" * 500 for i in range(40)))
    docs = load_documents(path)
    assert len(docs) > 3 and all(d.key.startswith("big.txt#") for d in docs)
    assert "\n\n".join(d.text for d in docs) == path.read_text()
    assert all(load_corpus(path, s) for s in SPLITS)


def test_jsonl_and_json_records(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(5)))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == [f"row {i}" for i in range(5)] + ["one", "two"]
    assert docs[0].key == "a.jsonl#0"
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}))
    with pytest.raises(CorpusError, match="no string 'text' field"):
        load_documents(tmp_path)


def test_arrow_only_dataset_without_datasets_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"ARROW1")
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(CorpusError, match="`datasets` package is not installed"):
        load_documents(tmp_path)
    (tmp_path / "extra.jsonl").write_text(json.dumps({"text": "fallback"}))
    assert [d.text for d in load_documents(tmp_path)] == ["fallback"]


def test_missing_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="not found"):
        load_documents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no text"):
        load_documents(tmp_path / "empty")
    monkeypatch.setenv(PYDOC_ENV, str(tmp_path / "absent"))
    with pytest.raises(CorpusError, match="apt-get install -y python3.11-doc") as info:
        pydoc_dir()
    assert "dpkg -x" in str(info.value) and PYDOC_ENV in str(info.value)


def test_pydoc_env_override(tmp_path, monkeypatch):
    (tmp_path / "library").mkdir()
    for i in range(5):
        (tmp_path / "library" / f"m{i}.rst.txt").write_text(f"module {i}")
    (tmp_path / "ignored.html").write_text("<html>")
    monkeypatch.setenv(PYDOC_ENV, str(tmp_path))
    docs = load_documents("pydoc")
    assert [d.key for d in docs] == [f"library/m{i}.rst.txt" for i in range(5)]


@pytest.mark.corpus
def test_real_pydoc_corpus_splits(monkeypatch):
    monkeypatch.delenv(PYDOC_ENV, raising=False)
    try:
        pydoc_dir()
    except CorpusError:
        pytest.skip("python3.11-doc is not installed")
    docs = load_documents("pydoc")
    assert len(docs) > 400
    sizes = {s: len(split_documents(docs, s)) for s in SPLITS}
    assert sizes["calib"] > 5 and sizes["test"] > 5 and sizes["train"] > 0.8 * len(docs)


def test_tokenize_corpus_joins_with_separator_and_caps():
    tok = _tokenizer()
    sep = tok.token_to_id("<|endoftext|>")
    texts = ["hello world", "hello python", "world"]
    ids = tokenize_corpus(texts, tok)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert (ids == sep).sum() == 3 and ids[-1] == sep
    pieces = np.split(ids, np.flatnonzero(ids == sep) + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == texts
    assert tokenize_corpus(texts, tok, max_tokens=4).tolist() == ids[:4].tolist()
    assert tokenize_corpus(texts * 100, tok, max_tokens=50, batch_docs=2).size == 50
    assert tokenize_corpus([], tok).size == 0
    with pytest.raises(CorpusError, match="not in the tokenizer vocabulary"):
        tokenize_corpus(texts, tok, separator="<eos>")

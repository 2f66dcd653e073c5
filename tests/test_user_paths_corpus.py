"""The user's own corpus for ``eval --corpus`` and ``compile --calib-corpus``.

Any file of a corpus folder counts as text when its content is text (not by suffix); a binary
file is an error naming it; a user's corpus is read whole by default, while the built-in
``pydoc`` corpus keeps its calib / test split.
"""

import json

import pytest

from dmpq_compile.cli import main
from dmpq_compile.compiler import calibration_ids
from dmpq_compile.eval import (
    PYDOC_ENV,
    CorpusError,
    load_corpus,
    load_documents,
    split_documents,
    tokenize_corpus,
)
from dmpq_compile.testing.tiny import tiny_text


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture
def py_folder(tmp_path):
    """A user's corpus: a package of Python sources, with a bytecode cache and a hidden folder."""
    root = tmp_path / "mycode"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / ".git").mkdir()
    for i in range(24):
        (root / "pkg" / f"mod{i:02d}.py").write_text(f'"""{tiny_text(12, seed=i)}"""\n\nX_{i} = {i}\n')
    (root / "README").write_text(tiny_text(8, seed=99))  # no suffix at all: still text
    (root / "pkg" / "__pycache__" / "mod00.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00")
    (root / ".git" / "index").write_bytes(b"DIRC\x00\x00\x00\x02")
    return root


def test_folder_of_py_files_is_a_corpus(py_folder):
    docs = load_documents(py_folder)  # used to fail: "holds no text"
    keys = [d.key for d in docs]
    assert len(docs) == 25 and "README" in keys and "pkg/mod00.py" in keys
    assert not any("__pycache__" in k or ".git" in k for k in keys)


def test_binary_file_in_a_folder_is_an_error_naming_it(py_folder):
    (py_folder / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (py_folder / "notes.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError) as info:
        load_documents(py_folder)
    msg = str(info.value)
    assert "2 file(s) that are not UTF-8 text" in msg
    assert "pkg/logo.png (NUL byte at offset 8" in msg
    assert "notes.txt (byte 0xe9 at offset 3 is not valid UTF-8)" in msg
    assert "move these files out" in msg


def test_single_file_decided_by_content(tmp_path):
    code = tmp_path / "script.py"
    code.write_text("\ufeffprint('hello')\n")  # a BOM is dropped
    assert [d.text for d in load_documents(code)] == ["print('hello')\n"]
    blob = tmp_path / "weights.txt"  # a text suffix does not make it text
    blob.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(CorpusError, match=r"corpus file .*weights.txt is not UTF-8 text \(NUL byte at offset 3"):
        load_documents(blob)  # used to be read with replacement characters
    empty = tmp_path / "empty.md"
    empty.write_text("\n \n")
    with pytest.raises(CorpusError, match="empty.md holds no text"):
        load_documents(empty)


def test_empty_folder_says_why(tmp_path):
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="holds no text: its 1 file.s. are empty"):
        load_documents(tmp_path)


@pytest.mark.parametrize(("spec", "split", "builtin", "expected"), [
    ("pydoc", "auto", "calib", "calib"),
    ("pydoc", "auto", "test", "test"),
    ("/data/mine", "auto", "test", None),
    ("/data/mine", "test", "test", "test"),
    ("pydoc", None, "test", None),
])
def test_resolve_split(spec, split, builtin, expected):
    from dmpq_compile.eval import resolve_split

    assert resolve_split(spec, split, builtin) == expected


def _eval(model, corpus, tmp_path, *extra):
    out = tmp_path / "eval.json"
    assert main(["eval", str(model), "--corpus", str(corpus), "--context", "32", "--no-progress", "--json", str(out),
                 *extra]) == 0
    return json.loads(out.read_text())["sets"][0]


@pytest.mark.parametrize("corpus", ["py_folder", "tiny_corpus"])  # .txt files: the split was the only issue
def test_eval_scores_the_whole_user_corpus_by_default(tiny_dirs, corpus, request, tmp_path, capsys):
    py_folder = request.getfixturevalue(corpus)
    model = tiny_dirs("olmoe")
    tok = load_tokenizer(model)
    docs = load_documents(py_folder)
    long_enough = [d for d in docs if len(tok.encode(d.text).ids) >= 31]  # one window: 1 separator + 31 tokens
    res = _eval(model, py_folder, tmp_path)
    assert res["split"] == "all" and res["documents"] == len(long_enough)  # windows in every document
    assert len(res["skipped_short_documents"]) == len(docs) - len(long_enough)
    assert "/all  ppl=" in capsys.readouterr().out


def test_eval_hash_split_of_a_user_corpus_is_announced(tiny_dirs, py_folder, tmp_path, capsys):
    n_test = len(split_documents(load_documents(py_folder), "test"))
    assert main(["eval", str(tiny_dirs("olmoe")), "--corpus", str(py_folder), "--split", "test", "--context", "32",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"scoring only the 'test' hash split of {py_folder}: {n_test} of 25 documents" in err
    assert "--split all" in err
    assert "cannot hold windows with none above 15%" in err  # a handful of documents: no interval over them


@pytest.mark.parametrize("corpus", ["py_folder", "tiny_corpus"])
def test_calibration_reads_the_whole_user_corpus(tiny_dirs, corpus, request):
    py_folder = request.getfixturevalue(corpus)
    model = tiny_dirs("olmoe")
    whole = tokenize_corpus(load_corpus(py_folder), load_tokenizer(model))
    ids = calibration_ids(model, str(py_folder), sequences=10_000, seq_len=16)
    assert ids.numel() == len(whole) // 16 * 16  # every sequence the corpus has, not a 5% split
    assert ids.flatten().tolist() == whole[: ids.numel()].tolist()


def test_calibration_keeps_the_pydoc_calib_split(tiny_dirs, tmp_path, monkeypatch):
    for i in range(40):
        (tmp_path / f"page{i:02d}.rst.txt").write_text(tiny_text(10, seed=i))
    monkeypatch.setenv(PYDOC_ENV, str(tmp_path))
    model = tiny_dirs("olmoe")
    calib = tokenize_corpus(load_corpus("pydoc", "calib"), load_tokenizer(model))
    ids = calibration_ids(model, "pydoc", sequences=10_000, seq_len=16)
    assert ids.flatten().tolist() == calib[: ids.numel()].tolist()
    assert ids.numel() == len(calib) // 16 * 16


def test_calib_corpus_binary_file_is_a_clear_cli_error(tiny_dirs, tmp_path, capsys):
    blob = tmp_path / "data.bin"
    blob.write_bytes(b"\x00" * 64)
    assert main(["compile", str(tiny_dirs("olmoe")), "-o", str(tmp_path / "art"), "--target", "ort-cpu",
                 "--allocator", "uniform", "--calib-corpus", str(blob), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"corpus file {blob} is not UTF-8 text (NUL byte at offset 0" in err and "Traceback" not in err
    assert not (tmp_path / "art").exists()

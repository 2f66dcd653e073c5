"""The source checkpoint's chat template travels into the artifact (chat_template.jinja or the
tokenizer_config.json key), the manifest says where it came from, `inspect` says when there is none,
`compile` warns, and onnxruntime-genai applies the template transformers applies."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from dmpq_compile.backends.ort_cpu import OrtCpuBackend

from dmpq_compile.artifact import write_artifact
from dmpq_compile.cli import main
from dmpq_compile.frontend import load

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "mixtral-tiny"
JINJA = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
USER = [{"role": "user", "content": "hi"}]


def _source(tmp_path, jinja=None, key=None, tokenizer_config=True):
    """A copy of samples/mixtral-tiny with a chat_template.jinja and/or a chat_template key."""
    src = shutil.copytree(SAMPLE, tmp_path / "src")
    config = src / "tokenizer_config.json"
    if not tokenizer_config:
        config.unlink()
    elif key is not None:
        config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": key}, indent=2))
    if jinja is not None:
        (src / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return src


def _artifact(src, out):
    """An ort-cpu artifact of ``src`` with float experts (no passes: the tokenizer files are the point)."""
    graph = load(src)
    for node in graph.experts():
        graph.annotate(node.id, "bits", 16)
    return write_artifact(graph, OrtCpuBackend(), out)


def _tokenizer_entry(art):
    return json.loads((art / "manifest.json").read_text())["tokenizer"]


def test_chat_template_jinja_travels_and_is_written_into_tokenizer_config(tmp_path):
    src = _source(tmp_path, jinja=JINJA)
    art = _artifact(src, tmp_path / "art")
    entry = _tokenizer_entry(art)
    assert entry["chat_template"] == "chat_template.jinja" and "chat_template.jinja" in entry["files"]
    assert (art / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    config = json.loads((art / "tokenizer_config.json").read_text())
    assert config == {**json.loads((src / "tokenizer_config.json").read_text()), "chat_template": JINJA}
    files = json.loads((art / "manifest.json").read_text())["files"]
    assert {"chat_template.jinja", "tokenizer_config.json"} <= set(files)  # checksummed as written


def test_tokenizer_config_key_travels(tmp_path):
    src = _source(tmp_path, key=KEY)
    art = _artifact(src, tmp_path / "art")
    assert _tokenizer_entry(art)["chat_template"] == "tokenizer_config.json"
    assert json.loads((art / "tokenizer_config.json").read_text()) == json.loads((src / "tokenizer_config.json")
                                                                                  .read_text())
    assert not (art / "chat_template.jinja").exists()


def test_the_jinja_file_wins_over_the_key_as_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    src = _source(tmp_path, jinja=JINJA, key=KEY)
    assert AutoTokenizer.from_pretrained(str(src)).chat_template == JINJA
    art = _artifact(src, tmp_path / "art")
    assert _tokenizer_entry(art)["chat_template"] == "chat_template.jinja"
    assert json.loads((art / "tokenizer_config.json").read_text())["chat_template"] == JINJA


def test_a_jinja_without_tokenizer_config_gets_a_minimal_one(tmp_path):
    src = _source(tmp_path, jinja=JINJA, tokenizer_config=False)
    art = _artifact(src, tmp_path / "art")
    entry = _tokenizer_entry(art)
    assert entry["chat_template"] == "chat_template.jinja" and "tokenizer_config.json" in entry["files"]
    assert json.loads((art / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast",
                                                                       "chat_template": JINJA}
    assert "tokenizer_config.json" in json.loads((art / "manifest.json").read_text())["files"]


def test_a_tokenizer_json_alone_gets_a_minimal_tokenizer_config(tmp_path):
    """onnxruntime-genai loads no tokenizer without a tokenizer_config.json."""
    art = _artifact(_source(tmp_path, tokenizer_config=False), tmp_path / "art")
    assert _tokenizer_entry(art)["chat_template"] is None and "tokenizer_config.json" in _tokenizer_entry(art)["files"]
    assert json.loads((art / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast"}


def test_without_a_template_the_manifest_and_inspect_say_so(tmp_path, capsys):
    art = _artifact(_source(tmp_path), tmp_path / "art")
    assert _tokenizer_entry(art)["chat_template"] is None
    assert "chat_template" not in json.loads((art / "tokenizer_config.json").read_text())
    assert main(["inspect", str(art)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("chat template:")] == [
        "chat template: none in the source checkpoint (apply_chat_template will fail; pass a template yourself)"]


def test_inspect_names_the_source_file(tmp_path, capsys):
    art = _artifact(_source(tmp_path, key=KEY), tmp_path / "art")
    assert main(["inspect", str(art)]) == 0
    assert "chat template: from the source checkpoint's tokenizer_config.json" in capsys.readouterr().out


def test_compile_warns_when_the_source_has_no_chat_template(tmp_path, caplog):
    src = _source(tmp_path)
    argv = ["compile", str(src), "-o", str(tmp_path / "art"), "--target", "ort-cpu", "--allocator", "uniform",
            "--no-sensitivity", "--calib-sequences", "4", "--seq-len", "32", "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="dmpq_compile.compiler"):
        assert main(argv) == 0
    warned = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "apply_chat_template" in warned[0].getMessage()


def test_onnxruntime_genai_applies_the_carried_template(tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    art = _artifact(_source(tmp_path, jinja=JINJA), tmp_path / "art")
    tokenizer = og.Tokenizer(og.Model(str(art)))
    assert tokenizer.apply_chat_template(json.dumps(USER), add_generation_prompt=True) == "<|user|>hi\n<|assistant|>"

"""The committed sample checkpoints load offline and behave; samples/train.py runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
MAX_BYTES = 25 * 1024 * 1024
EXPECTED = {
    "mixtral-tiny": {"architecture": "MixtralForCausalLM", "experts_key": "num_local_experts", "experts": 8, "top_k": 2},
    "olmoe-tiny": {"architecture": "OlmoeForCausalLM", "experts_key": "num_experts", "experts": 32, "top_k": 4},
}
TRAINING_KEYS = {"seed", "steps", "tokens_seen", "train_wall_s", "final_train_loss", "test_perplexity",
                 "unigram_test_perplexity", "expert_frequency", "model_config", "recipe", "parameters"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_sample_loads_offline_and_runs(name):
    folder, exp = SAMPLES / name, EXPECTED[name]
    assert (folder / "config.json").is_file(), f"{folder} is missing: run samples/train.py (see samples/README.md)"
    for f in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "training.json"):
        assert (folder / f).is_file(), f"{folder / f} is missing"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size < MAX_BYTES, f"{folder} is {size / 2**20:.1f} MiB, over 25 MB"

    model, tokenizer = _load(folder)
    cfg = model.config
    assert type(model).__name__ == exp["architecture"]
    assert getattr(cfg, exp["experts_key"]) == exp["experts"] and cfg.num_experts_per_tok == exp["top_k"]
    assert cfg.intermediate_size % 32 == 0 and cfg.hidden_size % 32 == 0
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == cfg.eos_token_id
    assert len(tokenizer) == cfg.vocab_size

    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()

    record = json.loads((folder / "training.json").read_text())
    assert TRAINING_KEYS <= set(record)
    assert record["test_perplexity"] < 0.4 * record["unigram_test_perplexity"]
    assert len(record["expert_frequency"]) == cfg.num_hidden_layers


def test_samples_share_one_tokenizer():
    a, b = (SAMPLES / n / "tokenizer.json" for n in sorted(EXPECTED))
    assert json.loads(a.read_text())["model"] == json.loads(b.read_text())["model"]


@pytest.fixture
def tiny_corpus(tmp_path):
    """A small deterministic folder of Python-ish text, enough for a few training steps."""
    root = tmp_path / "corpus"
    root.mkdir()
    words = ["def", "return", "import", "class", "self", "value", "list", "dict", "print", "module", "the",
             "function", "argument", "object", "string", "number", "(", ")", ":", "=", "+", "\n"]
    for d in range(24):
        body = " ".join(words[(d * 7 + i * i) % len(words)] for i in range(400))
        (root / f"doc{d:02d}.txt").write_text(f"Document {d}\n{body}\n")
    return root


def _run_train(args: list[str]) -> subprocess.CompletedProcess:
    tiny = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "32",
            "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--threads", "1",
            "--vocab-size", "320", "--max-position-embeddings", "64"]
    proc = subprocess.run([sys.executable, str(SAMPLES / "train.py"), *args, *tiny], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_train_script_end_to_end(tmp_path, tiny_corpus):
    out_a, out_b = tmp_path / "mix", tmp_path / "olm"
    proc = _run_train(["--family", "mixtral", "--out", str(out_a), "--corpus", str(tiny_corpus),
                       "--experts", "4", "--top-k", "2"])
    assert "test perplexity" in proc.stdout
    _run_train(["--family", "olmoe", "--out", str(out_b), "--corpus", str(tiny_corpus),
                "--tokenizer", str(out_a), "--experts", "4", "--top-k", "2"])
    for out, arch in ((out_a, "MixtralForCausalLM"), (out_b, "OlmoeForCausalLM")):
        record = json.loads((out / "training.json").read_text())
        assert record["steps"] == 3 and record["tokens_seen"] == 3 * 2 * 32
        assert record["architecture"] == arch and record["seed"] == 0
        assert len(record["expert_frequency"]) == 1
        assert sum(record["expert_frequency"][0]["frequency"]) == pytest.approx(2.0, abs=1e-3)
        model, tokenizer = _load(out)
        assert type(model).__name__ == arch and model.config.output_router_logits is False
        ids = tokenizer("def value", return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert (out_a / "tokenizer.json").read_text() == (out_b / "tokenizer.json").read_text()


def test_train_script_is_deterministic(tmp_path, tiny_corpus):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        _run_train(["--family", "mixtral", "--out", str(out), "--corpus", str(tiny_corpus), "--experts", "4",
                    "--top-k", "2"])
    from safetensors.torch import load_file

    wa, wb = (load_file(str(o / "model.safetensors")) for o in outs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_script_requires_a_stop_condition(tmp_path):
    proc = subprocess.run([sys.executable, str(SAMPLES / "train.py"), "--family", "mixtral", "--out",
                           str(tmp_path / "x")], cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--time-budget-min" in proc.stderr


def test_train_script_qwen3_moe_and_stop_after(tmp_path, tiny_corpus):
    """The fine-grained family trains; --stop-after N is deterministic and keeps the schedule of --steps."""
    outs = [tmp_path / "q1", tmp_path / "q2"]
    for out in outs:
        _run_train(["--family", "qwen3_moe", "--out", str(out), "--corpus", str(tiny_corpus), "--experts", "8",
                    "--top-k", "4", "--stop-after", "2"])  # of _run_train's --steps 3
    record = json.loads((outs[0] / "training.json").read_text())
    assert record["architecture"] == "Qwen3MoeForCausalLM" and record["steps"] == 2
    assert record["recipe"]["steps"] == 3 and record["recipe"]["stop_after"] == 2
    model, _ = _load(outs[0])
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 4, 32)
    assert sum(record["expert_frequency"][0]["frequency"]) == pytest.approx(4.0, abs=1e-3)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(o / "model.safetensors")) for o in outs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_after_needs_a_step_count(tmp_path):
    proc = subprocess.run([sys.executable, str(SAMPLES / "train.py"), "--family", "qwen3_moe", "--out",
                           str(tmp_path / "x"), "--time-budget-min", "1", "--stop-after", "2"], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--stop-after N needs --steps" in proc.stderr


def test_rebuild_recipes_are_deterministic_fine_grained_and_llama_cpp_shaped():
    """Every rebuild recipe is a fixed step count on one thread (never wall time), its widths are
    multiples of 256 (llama.cpp's K- and i-quants apply), and the fine-grained one has >= 64 experts, top-8."""
    sys.path.insert(0, str(SAMPLES))
    try:
        import rebuild
        import train
    finally:
        sys.path.remove(str(SAMPLES))
    assert {"mixtral-h256", "qwen3-moe-fine"} <= set(rebuild.RECIPES)
    for name, recipe in rebuild.RECIPES.items():
        args = train.parse_args([*recipe["args"], "--out", "x"])
        assert args.steps and args.time_budget_min is None and args.threads == 1 and args.seed == 0, name
        assert args.hidden % 256 == 0 and args.intermediate % 256 == 0, name
        if recipe["sha256"] is not None:
            assert len(recipe["sha256"]) == 64 and recipe["prefix"]["sha256"] is not None
    fine = train.parse_args([*rebuild.RECIPES["qwen3-moe-fine"]["args"], "--out", "x"])
    assert fine.family == "qwen3_moe" and fine.experts >= 64 and fine.top_k == 8

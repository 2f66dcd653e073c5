"""Config fields of the supported families: each one is implemented (logits match transformers),
refused with an error naming it, or ignored on purpose; the docs table matches the code."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmpq_compile.frontend import FrontendError, load
from dmpq_compile.frontend.fields import TABLES, render_markdown
from dmpq_compile.ir import Interpreter
from dmpq_compile.testing import make_tiny_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "config-fields.md"

# name -> (family, config overrides); every case changes the forward pass of the tiny model
IMPLEMENTED = {
    "olmoe-clip_qkv": ("olmoe", {"clip_qkv": 0.3}),
    "olmoe-attention_bias-norm_topk": ("olmoe", {"attention_bias": True, "norm_topk_prob": True}),
    "qwen3-head_dim-attention_bias": ("qwen3_moe", {"head_dim": 24, "attention_bias": True,
                                                    "norm_topk_prob": False}),
    "qwen3-sliding_window": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}),
    "qwen3-sparse_step-mlp_only": ("qwen3_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2,
                                                 "mlp_only_layers": [2]}),
    "qwen2-no_qkv_bias-norm_topk": ("qwen2_moe", {"qkv_bias": False, "norm_topk_prob": True}),
    "qwen2-uniform_sliding": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 4,
                                            "layer_types": ["sliding_attention"] * 2}),
    "mixtral-window-mqa-tied-theta": ("mixtral", {"sliding_window": 4, "num_key_value_heads": 1,
                                                  "tie_word_embeddings": True, "head_dim": 24,
                                                  "rope_parameters": {"rope_type": "default",
                                                                      "rope_theta": 500.0}}),
}


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", sorted(IMPLEMENTED))
def test_implemented_fields_match_transformers(case, tmp_path):
    family, overrides = IMPLEMENTED[case]
    path = make_tiny_checkpoint(family, tmp_path, **overrides)
    graph = load(path)
    ids = torch.randint(0, graph.meta["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(2))
    ref = _hf_logits(path, ids)
    with torch.no_grad():
        got = Interpreter(graph, quantize=False)(ids)
    assert (got - ref).abs().max() <= 1e-4, (case, (got - ref).abs().max())


def test_clip_qkv_artifact_matches_transformers(tmp_path):
    """The ONNX lowering clamps where transformers does (after OLMoE's q/k norm)."""
    ort = pytest.importorskip("onnxruntime")
    from dmpq_compile.backends.onnx_lowering import lower

    path = make_tiny_checkpoint("olmoe", tmp_path, clip_qkv=0.3)
    graph = load(path)
    lowered = lower(graph)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(lowered.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(4).integers(0, graph.meta["vocab_size"], (1, 12), dtype=np.int64)
    feed = {lowered.input_ids: ids}
    for kv in lowered.kv_cache:
        feed[kv.past_key] = feed[kv.past_value] = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32)
    got = sess.run([lowered.logits], feed)[0]
    ref = _hf_logits(path, torch.from_numpy(ids)).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def _config_only(tmp_path, family, extra=None, **kwargs):
    """A folder holding only config.json (fields are checked before any weight is read)."""
    import transformers as tf

    cls = {"mixtral": tf.MixtralConfig, "olmoe": tf.OlmoeConfig, "qwen2_moe": tf.Qwen2MoeConfig,
           "qwen3_moe": tf.Qwen3MoeConfig}[family]
    cls(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, **kwargs) \
        .save_pretrained(tmp_path)
    if extra:
        raw = json.loads((tmp_path / "config.json").read_text())
        raw.update(extra)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


REFUSED = {  # name -> (family, config kwargs, keys written into config.json, expected message)
    "rope-linear": ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, None,
                    r"rope_type='linear' is not supported"),
    "rope-yarn-legacy-key": ("qwen3_moe", {}, {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 64}},
                             r"rope_type='yarn'"),
    "partial-rotary": ("olmoe", {}, {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    "gelu": ("olmoe", {"hidden_act": "gelu"}, None, r"hidden_act='gelu'"),
    "qwen2-mixed-windows": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 4}, None,
                            r"windows per layer in transformers are \[4, full\].*layer_types"),
    "olmoe-sliding-window": ("olmoe", {}, {"sliding_window": 8}, r"sliding_window=8"),
    "mixtral-window-switched-off": ("mixtral", {"sliding_window": 8}, {"use_sliding_window": False},
                                    r"are \[8, 8\].*here \[full, full\]"),
    "mixtral-clip_qkv": ("mixtral", {}, {"clip_qkv": 1.0}, r"clip_qkv=1.0 is not supported \(it belongs to another"),
    "olmoe-mlp_only_layers": ("olmoe", {}, {"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\]"),
    "mixtral-sparse-step": ("mixtral", {}, {"decoder_sparse_step": 2}, r"decoder_sparse_step=2"),
    "pre-quantized": ("qwen3_moe", {}, {"quantization_config": {"quant_method": "fp8"}},
                      r"quantization_config=.*full-precision checkpoint"),
    "top-k": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 6}, None, r"num_experts_per_tok=6 must lie in"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_fields_are_refused_by_name(case, tmp_path):
    family, kwargs, extra, message = REFUSED[case]
    folder = _config_only(tmp_path, family, extra, **kwargs)
    with pytest.raises(FrontendError, match=message) as err:
        load(folder)
    assert "docs/config-fields.md" in str(err.value)


def test_every_declared_field_is_in_its_family_table():
    """A transformers upgrade that adds a config field fails here until the field is audited."""
    import transformers as tf

    base = {f.name for f in dataclasses.fields(tf.PreTrainedConfig)}
    classes = {"mixtral": tf.MixtralConfig, "olmoe": tf.OlmoeConfig, "qwen2_moe": tf.Qwen2MoeConfig,
               "qwen3_moe": tf.Qwen3MoeConfig}
    assert set(classes) == set(TABLES)
    for family, cls in classes.items():
        declared = {f.name for f in dataclasses.fields(cls)} - base
        assert declared <= set(TABLES[family]), (family, sorted(declared - set(TABLES[family])))
        read_by_frontend = {"head_dim", "sliding_window", "use_sliding_window", "clip_qkv", "mlp_only_layers",
                            "decoder_sparse_step", "norm_topk_prob", "rope_parameters", "quantization_config"}
        assert read_by_frontend <= set(TABLES[family]), family


def test_docs_table_matches_the_code():
    text = DOC.read_text()
    begin, end = "<!-- BEGIN generated by python -m dmpq_compile.frontend.fields -->", "<!-- END generated -->"
    assert begin in text and end in text, f"{DOC} lost its generated-table markers"
    assert text.split(begin)[1].split(end)[0].strip() == render_markdown().strip(), \
        "docs/config-fields.md is stale: regenerate with python -m dmpq_compile.frontend.fields"

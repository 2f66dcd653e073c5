"""``genai_config.json``: what makes an ``ort-cpu`` artifact an onnxruntime-genai model folder.

onnxruntime-genai (the runtime apps embed for ONNX language models: C, C++, C#, Java and Python
APIs over one folder) runs any decoder whose graph follows its contract, which the ort-cpu
lowering does (``LoweringOptions.genai``): inputs ``input_ids``, ``attention_mask`` and
``past_key_values.{l}.key|value``, outputs ``logits`` and ``present.{l}.key|value``, a KV buffer
that may be shared between past and present. Its own model builder supports none of the MoE
families this tool compiles, so the config is written here, from the graph and the tokenizer.

Checked with onnxruntime-genai 0.18: ``type`` must be a family genai knows; ``llama`` is its
plain decoder-only path (everything family-specific, q/k norms, clipping, routing, experts,
lives in the graph), so every family is written as that type. genai pads a batch of prompts
on the right and extends every row's mask by one column a step; the graph takes any padding.
"""

from __future__ import annotations

from typing import Any

from ...ir.graph import Graph
from ..base import BackendError

GENAI_CONFIG = "genai_config.json"
GENAI_TYPE = "llama"
DEFAULT_MAX_LENGTH = 4096  # KV positions genai preallocates per sequence, unless the model's context is shorter


def kv_bytes_per_token(kv_cache: list[dict[str, Any]]) -> int:
    """fp32 key and value bytes one position of one sequence takes in the KV buffer, all layers."""
    return sum(2 * 4 * int(kv["num_kv_heads"]) * int(kv["head_dim"]) for kv in kv_cache)


def resolve_max_length(graph: Graph, max_length: int | None) -> int:
    """``max_length`` (checked against the model's context) or the default: the context, at most 4096."""
    context = int(graph.meta.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
    if max_length is None:
        return min(context, DEFAULT_MAX_LENGTH)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise BackendError(f"max_length must be an int >= 2 (prompt + generated tokens), got {max_length!r}")
    if max_length > context:
        raise BackendError(f"max_length {max_length} exceeds the model's max_position_embeddings {context}: it was "
                           "not trained that far; choose at most that")
    return max_length


def genai_config(graph: Graph, io: dict[str, Any], model_file: str, max_length: int,
                 custom_ops_library: str | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` object for a lowered graph whose manifest ``io`` entry is ``io``;
    ``custom_ops_library``: the path, relative to the folder, of the custom-op library its graph needs."""
    meta = graph.meta
    kv = io["kv_cache"]
    if not io.get("attention_mask") or not kv:
        raise BackendError("onnxruntime-genai needs an attention_mask input and a KV cache; lower with "
                           "LoweringOptions(genai=True)")
    heads = {int(k["num_kv_heads"]) for k in kv}
    dims = {int(k["head_dim"]) for k in kv}
    if len(heads) != 1 or len(dims) != 1:
        raise BackendError(f"onnxruntime-genai allocates one KV shape for every layer, but this model's layers "
                           f"have kv heads {sorted(heads)} and head dims {sorted(dims)}")
    attn = next(iter(graph.nodes("attention")))
    eos = meta.get("eos_token_id")
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = meta.get("pad_token_id")
    pad = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
    bos = meta.get("bos_token_id")
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    decoder = {
        "session_options": session_options,
        "filename": model_file,
        "head_size": dims.pop(),
        "hidden_size": int(meta["hidden_size"]),
        "num_attention_heads": int(attn.attrs["num_heads"]),
        "num_hidden_layers": len(kv),
        "num_key_value_heads": heads.pop(),
        "inputs": {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"],
                   "past_key_names": kv[0]["past_key"].replace(".0.", ".%d."),
                   "past_value_names": kv[0]["past_value"].replace(".0.", ".%d.")},
        "outputs": {"logits": io["logits"], "present_key_names": kv[0]["present_key"].replace(".0.", ".%d."),
                    "present_value_names": kv[0]["present_value"].replace(".0.", ".%d.")},
    }
    for i, k in enumerate(kv):  # the names must follow one pattern, layer by layer
        for field, pattern in (("past_key", decoder["inputs"]["past_key_names"]),
                               ("past_value", decoder["inputs"]["past_value_names"]),
                               ("present_key", decoder["outputs"]["present_key_names"]),
                               ("present_value", decoder["outputs"]["present_value_names"])):
            if k[field] != pattern % i:
                raise BackendError(f"KV tensor {k[field]!r} of layer {i} does not follow the pattern {pattern!r}")
    return {
        "model": {
            "type": GENAI_TYPE,
            "bos_token_id": int(bos) if bos is not None else pad,
            "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
            "pad_token_id": pad,
            "context_length": int(meta.get("max_position_embeddings") or max_length),
            "vocab_size": int(meta["vocab_size"]),
            "decoder": decoder,
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
            "max_length": int(max_length), "past_present_share_buffer": True,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "early_stopping": True, "no_repeat_ngram_size": 0,
        },
    }

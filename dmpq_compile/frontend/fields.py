"""Which Hugging Face config fields the frontend honours, per family: implemented, refused or ignored.

Every field a supported family's config class declares in transformers 5.x (plus the undeclared
ones that transformers' modeling code or this frontend read, such as ``head_dim``) has a row in
that family's table. A row says what the lowering does with the field and carries an optional
check; :func:`unsupported_fields` runs the checks and returns one message per field whose value
the lowering cannot reproduce, so the frontend refuses the checkpoint instead of compiling
wrong numbers.

Statuses:

* ``implemented``: every valid value is lowered as transformers computes it (parity tests
  against transformers in ``tests/test_fidelity_fields.py``).
* ``limited``: some values are implemented, the others are refused (the note says which).
* ``refused``: any value other than the default is refused.
* ``ignored``: the field does not change the logits of the forward pass (training-only,
  initialisation, generation or cache settings).

``docs/config-fields.md`` is generated from these tables by :func:`render_markdown`
(``python -m dmpq_compile.frontend.fields``); a test keeps the two in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

IMPLEMENTED, LIMITED, REFUSED, IGNORED = "implemented", "limited", "refused", "ignored"
STATUSES = (IMPLEMENTED, LIMITED, REFUSED, IGNORED)

Check = Callable[[Any], "str | None"]  # cfg -> why its value cannot be lowered, or None


@dataclass(frozen=True)
class FieldRule:
    """One config field of one family: its status, a note for the docs, and the check run on load."""

    status: str
    note: str
    check: Check | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


# -- checks ------------------------------------------------------------------------------------
def _unset(name: str, default: Any, why: str, fix: str) -> Check:
    """Refuse any value of ``name`` other than ``default`` (absent or empty counts as the default)."""

    def check(cfg: Any) -> str | None:
        value = getattr(cfg, name, default)
        if value == default or (default is None and not value):
            return None
        return f"{name}={value!r} is not supported{why}; {fix}"

    return check


_FOREIGN = (" (it belongs to another MoE family: transformers' modeling code for this family ignores it, the "
            "lowering would not)")
_FOREIGN_FIX = ("the checkpoint does not match its model_type; fix config.json (remove the field only if the "
                "weights were trained without it)")


def _check_hidden_act(cfg: Any) -> str | None:
    act = getattr(cfg, "hidden_act", "silu")
    return None if act == "silu" else f"hidden_act={act!r} is not supported (the experts are lowered as SwiGLU, " \
                                      "only 'silu' is implemented)"


def _check_rope(cfg: Any) -> str | None:
    rope = getattr(cfg, "rope_parameters", None) or {}
    if any(isinstance(v, Mapping) for v in rope.values()):
        return f"rope_parameters nested per layer type ({sorted(rope)}) is not supported (one global RoPE only)"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"rope_parameters rope_type={kind!r} is not supported (only the default RoPE; scaled variants " \
               "such as linear, dynamic, yarn, longrope and llama3 are refused)"
    factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if factor not in (None, 1, 1.0):
        return f"partial_rotary_factor={factor!r} is not supported: transformers' modeling code for this family " \
               "rotates the whole head, so the checkpoint was made for other code"
    return None


def _check_experts(cfg: Any) -> str | None:
    n = next((getattr(cfg, a) for a in ("num_local_experts", "num_experts") if getattr(cfg, a, None) is not None), 0)
    k = getattr(cfg, "num_experts_per_tok", 0)
    if not isinstance(n, int) or n < 1:
        return f"num_experts={n!r}: a model without experts is dense; dmpq-compile compiles MoE checkpoints only"
    if not isinstance(k, int) or not 1 <= k <= n:
        return f"num_experts_per_tok={k!r} must lie in 1..{n} (the number of experts)"
    return None


def _check_sparse_step(cfg: Any) -> str | None:
    step = getattr(cfg, "decoder_sparse_step", 1)
    return None if isinstance(step, int) and step >= 1 else f"decoder_sparse_step={step!r} must be an int >= 1"


def _window(value: Any) -> int | None:
    return int(value) if value else None


def lowered_windows(cfg: Any) -> list[int | None]:
    """Per-layer sliding windows the frontend lowers: one window for every layer.

    Mirrors ``_Lowering.attention`` in :mod:`.hf` (``sliding_window``, switched off by
    ``use_sliding_window=False``); the parity tests catch any drift between the two.
    """
    window = None if getattr(cfg, "use_sliding_window", True) is False else _window(getattr(cfg, "sliding_window", None))
    return [window] * int(cfg.num_hidden_layers)


def _uniform(cfg: Any) -> list[int | None]:  # mixtral, qwen3_moe: config.sliding_window on every layer
    return [_window(getattr(cfg, "sliding_window", None))] * int(cfg.num_hidden_layers)


def _qwen2_layers(cfg: Any) -> list[int | None]:  # only the layers layer_types marks sliding_attention
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    return [(window or 0) if t == "sliding_attention" else None for t in types]


def _full(cfg: Any) -> list[int | None]:  # olmoe: causal mask on every layer (eager and sdpa)
    return [None] * int(cfg.num_hidden_layers)


def _windows_match(expected: Callable[[Any], list[int | None]]) -> Check:
    """Refuse configs whose per-layer attention windows (as transformers computes them) differ
    from the one window the frontend applies to every layer."""

    def check(cfg: Any) -> str | None:
        want, got = expected(cfg), lowered_windows(cfg)
        if want == got:
            return None
        keys = ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers")
        given = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in keys if hasattr(cfg, k))
        return f"the attention windows per layer in transformers are {_describe(want)}, but the lowering " \
               f"supports one window for all layers (here {_describe(got)}); from {given}"

    return check


def _describe(windows: list[int | None]) -> str:
    return "[" + ", ".join("full" if w is None else str(w) for w in windows) + "]"


# -- tables ------------------------------------------------------------------------------------
_SHAPE = FieldRule(IMPLEMENTED, "a size; the lowering takes the checkpoint tensors of that shape")
_TRAINING = "training-only: no effect on the forward pass at inference"

_COMMON: dict[str, FieldRule] = {
    "vocab_size": _SHAPE,
    "hidden_size": _SHAPE,
    "intermediate_size": _SHAPE,
    "num_hidden_layers": _SHAPE,
    "num_attention_heads": _SHAPE,
    "num_key_value_heads": FieldRule(IMPLEMENTED, "grouped-query attention, including MQA (1 KV head)"),
    "head_dim": FieldRule(IMPLEMENTED, "per-head size; hidden_size / num_attention_heads when unset"),
    "hidden_act": FieldRule(LIMITED, "'silu' (SwiGLU experts) implemented; any other activation refused",
                            _check_hidden_act),
    "rms_norm_eps": FieldRule(IMPLEMENTED, "epsilon of every RMSNorm"),
    "rope_parameters": FieldRule(LIMITED, "the default RoPE with its rope_theta implemented; scaled kinds "
                                 "(linear, dynamic, yarn, longrope, llama3), per-layer-type parameters and "
                                 "partial_rotary_factor != 1 refused (the legacy rope_scaling / rope_theta keys "
                                 "are converted into rope_parameters by transformers)", _check_rope),
    "partial_rotary_factor": FieldRule(REFUSED, "not read by these families' modeling code; refused when != 1 "
                                       "(checked with rope_parameters)"),
    "max_position_embeddings": FieldRule(IMPLEMENTED, "recorded in the artifact; the default RoPE does not "
                                         "depend on it; the runtime refuses longer sequences "
                                         "(README, 'Long prompts')"),
    "num_experts_per_tok": FieldRule(IMPLEMENTED, "top-k of the router; must lie in 1..num_experts",
                                     _check_experts),
    "tie_word_embeddings": FieldRule(IMPLEMENTED, "lm_head reuses the embedding table when lm_head.weight is "
                                     "absent"),
    "bos_token_id": FieldRule(IGNORED, "tokenizer metadata, recorded in the manifest; no effect on logits"),
    "eos_token_id": FieldRule(IGNORED, "recorded in the manifest: the runtime stops generating there; no "
                              "effect on logits"),
    "pad_token_id": FieldRule(IGNORED, "embedding padding_idx only affects training gradients"),
    "use_cache": FieldRule(IGNORED, "the artifact always has a KV cache; no effect on logits"),
    "initializer_range": FieldRule(IGNORED, "weight initialisation only"),
    "attention_dropout": FieldRule(IGNORED, _TRAINING),
    "output_router_logits": FieldRule(IGNORED, "training-only (feeds the auxiliary loss)"),
    "router_aux_loss_coef": FieldRule(IGNORED, "training-only (load-balancing loss)"),
    "dtype": FieldRule(IGNORED, "storage dtype of the checkpoint; the IR computes in fp32"),
    "quantization_config": FieldRule(REFUSED, "pre-quantized checkpoints (GPTQ, AWQ, FP8, ...) are refused: "
                                     "give the full-precision checkpoint",
                                     _unset("quantization_config", None, " (a pre-quantized checkpoint)",
                                            "give the full-precision checkpoint instead")),
}

MIXTRAL: dict[str, FieldRule] = {
    **_COMMON,
    "num_local_experts": FieldRule(IMPLEMENTED, "number of experts per MoE layer (alias num_experts)",
                                   _check_experts),
    "router_jitter_noise": FieldRule(IGNORED, "training-only: multiplicative noise applied only in training "
                                     "mode"),
    "norm_topk_prob": FieldRule(IGNORED, "not read: Mixtral always renormalises the top-k weights, and so does "
                                "the lowering"),
    "sliding_window": FieldRule(IMPLEMENTED, "one window on every layer", _windows_match(_uniform)),
    "use_sliding_window": FieldRule(REFUSED, "not read by Mixtral; refused when it would change the windows "
                                    "(checked with sliding_window)"),
    "clip_qkv": FieldRule(REFUSED, "OLMoE-only; refused when set", _unset("clip_qkv", None, _FOREIGN, _FOREIGN_FIX)),
    "mlp_only_layers": FieldRule(REFUSED, "Qwen-MoE-only; refused when set",
                                 _unset("mlp_only_layers", None, _FOREIGN, _FOREIGN_FIX)),
    "decoder_sparse_step": FieldRule(REFUSED, "Qwen-MoE-only; refused when != 1",
                                     _unset("decoder_sparse_step", 1, _FOREIGN, _FOREIGN_FIX)),
}

OLMOE: dict[str, FieldRule] = {
    **_COMMON,
    "num_experts": FieldRule(IMPLEMENTED, "number of experts per MoE layer (alias num_local_experts)",
                             _check_experts),
    "norm_topk_prob": FieldRule(IMPLEMENTED, "renormalise the top-k routing weights (or not)"),
    "attention_bias": FieldRule(IMPLEMENTED, "q/k/v/o projection biases, taken from the checkpoint"),
    "clip_qkv": FieldRule(IMPLEMENTED, "q, k, v clamped to [-clip_qkv, clip_qkv] after the q/k RMSNorm"),
    "sliding_window": FieldRule(REFUSED, "not declared by OLMoE: transformers' eager/sdpa attention ignores it "
                                "while flash-attention applies it; refused when set", _windows_match(_full)),
    "use_sliding_window": FieldRule(IGNORED, "not read by OLMoE (checked with sliding_window)"),
    "mlp_only_layers": MIXTRAL["mlp_only_layers"],
    "decoder_sparse_step": MIXTRAL["decoder_sparse_step"],
}

_QWEN: dict[str, FieldRule] = {
    **_COMMON,
    "num_experts": OLMOE["num_experts"],
    "norm_topk_prob": OLMOE["norm_topk_prob"],
    "moe_intermediate_size": _SHAPE,
    "mlp_only_layers": FieldRule(IMPLEMENTED, "these layers use a dense MLP instead of experts"),
    "decoder_sparse_step": FieldRule(IMPLEMENTED, "every step-th layer is MoE, the others dense",
                                     _check_sparse_step),
    "clip_qkv": MIXTRAL["clip_qkv"],
}

QWEN2_MOE: dict[str, FieldRule] = {
    **_QWEN,
    "qkv_bias": FieldRule(IMPLEMENTED, "q/k/v projection biases, taken from the checkpoint"),
    "shared_expert_intermediate_size": _SHAPE,
    "sliding_window": FieldRule(LIMITED, "implemented when every layer uses the same window (all layers "
                                "sliding_attention, or none); mixed per-layer windows refused",
                                _windows_match(_qwen2_layers)),
    "use_sliding_window": FieldRule(LIMITED, "checked with sliding_window; with the default layer_types only "
                                    "every other layer slides, which is refused"),
    "layer_types": FieldRule(LIMITED, "sliding_attention / full_attention per layer; must be uniform (checked "
                             "with sliding_window)"),
    "max_window_layers": FieldRule(LIMITED, "only builds the default layer_types (checked with sliding_window)"),
}

QWEN3_MOE: dict[str, FieldRule] = {
    **_QWEN,
    "attention_bias": OLMOE["attention_bias"],
    "sliding_window": FieldRule(IMPLEMENTED, "one window on every layer when use_sliding_window",
                                _windows_match(_uniform)),
    "use_sliding_window": FieldRule(IMPLEMENTED, "switches sliding_window on or off for every layer"),
    "max_window_layers": FieldRule(IGNORED, "not read by Qwen3-MoE's modeling code"),
}

TABLES: dict[str, dict[str, FieldRule]] = {
    "mixtral": MIXTRAL, "olmoe": OLMOE, "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE}


def unsupported_fields(cfg: Any, family: str) -> list[str]:
    """Messages naming each config field of ``cfg`` whose value the lowering cannot reproduce.

    Args:
        cfg: the transformers config object (``AutoConfig.from_pretrained``).
        family: a key of :data:`TABLES`.

    Returns:
        One message per refused field, in table order; empty when the config is supported.
    """
    if family not in TABLES:
        raise KeyError(f"no config-field table for family {family!r}; known: {sorted(TABLES)}")
    seen: set[Check] = set()
    problems = []
    for rule in TABLES[family].values():
        if rule.check is None or rule.check in seen:  # shared checks (e.g. num_experts) report once
            continue
        seen.add(rule.check)
        why = rule.check(cfg)
        if why:
            problems.append(why)
    return problems


def render_markdown() -> str:
    """The per-family tables of ``docs/config-fields.md``."""
    out = []
    for family, table in TABLES.items():
        out += [f"### {family}", "", "| field | status | what the lowering does |", "|---|---|---|"]
        out += [f"| `{name}` | {rule.status} | {rule.note} |" for name, rule in sorted(table.items())]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render_markdown())

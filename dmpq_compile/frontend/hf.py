"""Lower a local Hugging Face MoE checkpoint (config.json + safetensors) into the graph IR."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..ir.graph import Graph, expert_node, layer_node
from ..ir.validate import validate
from ..ir.weights import CheckpointFileError, TensorRef, WeightStore, index_safetensors
from .families import SUPPORTED, Family, family_for

log = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers save a checkpoint's chat template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", CHAT_TEMPLATE_FILE)


class FrontendError(ValueError):
    """The checkpoint cannot be lowered; the message says why and what is supported."""


def load(model_dir: str | Path) -> Graph:
    """Lower the checkpoint in ``model_dir`` into a validated :class:`Graph`.

    Works offline. Raises :class:`FrontendError` for a missing folder or file, a dense or
    unsupported architecture, or an unsupported feature (non-default RoPE, activation).
    """
    model_dir = Path(model_dir)
    raw = _read_config(model_dir)
    fam = family_for_or_error(raw)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    _check_supported(cfg, fam)
    tensors = _read_safetensors(model_dir)
    graph = Graph(_meta(model_dir, raw, cfg, fam), WeightStore())
    _Lowering(graph, cfg, fam, tensors).run()
    validate(graph)
    log.info("lowered %s: %s", model_dir, graph.summary())
    return graph


def chat_template_source(model_dir: str | Path) -> str | None:
    """The file of ``model_dir`` whose chat template transformers uses, or None when it has none.

    ``chat_template.jinja`` wins over a ``chat_template`` key in ``tokenizer_config.json`` (as in
    transformers' ``from_pretrained``); an empty key or an unreadable config counts as none.
    """
    model_dir = Path(model_dir)
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        return CHAT_TEMPLATE_FILE
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return "tokenizer_config.json" if isinstance(config, dict) and config.get("chat_template") else None


def _read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise FrontendError(f"{model_dir} is not a folder: give a local Hugging Face checkpoint folder "
                            f"(config.json + *.safetensors) of one of: {SUPPORTED}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise FrontendError(f"{path} is missing: {model_dir} is not a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FrontendError(f"{path} is not valid JSON: {e}") from None


def family_for_or_error(raw: Mapping[str, Any]) -> Family:
    model_type = raw.get("model_type")
    try:
        return family_for(model_type)
    except ValueError:
        kind = "a dense model" if not any("expert" in k for k in raw) else "an unsupported MoE architecture"
        raise FrontendError(f"model_type {model_type!r} ({raw.get('architectures')}) is {kind}; dmpq-compile "
                            f"lowers Mixture-of-Experts checkpoints of these families: {SUPPORTED}") from None


def _check_supported(cfg: Any, fam: Family) -> None:
    """Refuse every config field whose value the lowering cannot reproduce (tables in :mod:`.fields`)."""
    from .fields import unsupported_fields

    problems = unsupported_fields(cfg, fam.name)
    if problems:
        raise FrontendError(f"{fam.name}: config.json sets what the lowering does not implement, so the artifact "
                            f"would compute other numbers than transformers: {'; '.join(problems)} "
                            "(see docs/config-fields.md)")


def _read_safetensors(model_dir: Path) -> dict[str, TensorRef]:
    """Refs to every checkpoint tensor (nothing is read), after checking each shard is whole.

    A missing or truncated shard is reported here, before any pass runs, naming the file.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise FrontendError(f"{index} is damaged ({e!r}); download the checkpoint again") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin weights: re-save with save_pretrained(safe_serialization=True))" \
            if any(model_dir.glob("*.bin")) else ""
        raise FrontendError(f"no *.safetensors weights in {model_dir}{hint}")
    missing = [name for name in files if not (model_dir / name).is_file()]
    if missing:
        raise FrontendError(f"{len(missing)} of {len(files)} shards listed in {index.name} are missing from "
                            f"{model_dir}, e.g. {missing[:3]}; download the checkpoint again")
    out: dict[str, TensorRef] = {}
    for name in files:
        try:
            out.update(index_safetensors(model_dir / name))
        except CheckpointFileError as e:
            raise FrontendError(str(e)) from None
    if weight_map is not None:
        absent = sorted(k for k in weight_map if k not in out)
        if absent:
            raise FrontendError(f"{index.name} lists {len(absent)} tensors that no shard holds, e.g. {absent[:3]}; "
                                "the shards do not match the index: download the checkpoint again")
    return out


def _meta(model_dir: Path, raw: dict, cfg: Any, fam: Family) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {
        "family": fam.name,
        "model_type": raw.get("model_type"),
        "architectures": raw.get("architectures"),
        "source": str(model_dir.resolve()),
        "source_config": raw,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "num_experts": fam.num_experts(cfg),
        "top_k": int(cfg.num_experts_per_tok),
        "rope_theta": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 4096)),
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "eos_token_id": getattr(cfg, "eos_token_id", None),
        "tokenizer_files": [f for f in TOKENIZER_FILES if (model_dir / f).is_file()],
    }


class _Lowering:
    """Builds the node sequence of one decoder-only MoE model."""

    def __init__(self, graph: Graph, cfg: Any, fam: Family, tensors: dict[str, TensorRef]):
        self.g, self.cfg, self.fam, self.t = graph, cfg, fam, tensors
        self.used: set[str] = set()

    def take(self, key: str) -> str:
        if key not in self.t:
            raise FrontendError(f"{self.fam.name}: weight {key!r} is missing from the checkpoint")
        if key not in self.g.weights:
            self.g.weights.add_ref(key, self.t[key])
        self.used.add(key)
        return key

    def run(self) -> None:
        cfg = self.cfg
        h = self.g.add("tokens", "input")
        h = self.g.add("embed", "embed", [h], {"weight": self.take("model.embed_tokens.weight")})
        for layer in range(cfg.num_hidden_layers):
            h = self.layer(layer, h)
        h = self.g.add("final_norm", "norm", [h], {"weight": self.take("model.norm.weight")},
                       eps=float(cfg.rms_norm_eps))
        head = "lm_head.weight" if "lm_head.weight" in self.t or not cfg.tie_word_embeddings \
            else "model.embed_tokens.weight"
        self.g.add("lm_head", "lm_head", [h], {"weight": self.take(head)})
        unused = sorted(set(self.t) - self.used)
        if unused:
            raise FrontendError(f"{self.fam.name}: {len(unused)} checkpoint tensors were not understood, e.g. "
                                f"{unused[:3]}; the checkpoint does not match the {self.fam.name} layout")

    def layer(self, i: int, h: str) -> str:
        p, eps = f"model.layers.{i}", float(self.cfg.rms_norm_eps)
        n1 = self.g.add(layer_node(i, "attn_norm"), "norm", [h], {"weight": self.take(f"{p}.input_layernorm.weight")},
                        eps=eps)
        attn = self.attention(i, n1)
        h = self.g.add(layer_node(i, "attn_res"), "add", [h, attn])
        n2 = self.g.add(layer_node(i, "moe_norm"), "norm", [h],
                        {"weight": self.take(f"{p}.post_attention_layernorm.weight")}, eps=eps)
        if self.fam.is_moe_layer(self.cfg, i):
            out = self.moe(i, n2)
        else:
            out = self.g.add(layer_node(i, "mlp"), "mlp", [n2], self.mlp_params(f"{p}.mlp"), layer=i)
        return self.g.add(layer_node(i, "moe_res"), "add", [h, out])

    def attention(self, i: int, x: str) -> str:
        cfg, p = self.cfg, f"model.layers.{i}.self_attn"
        params = {r: self.take(f"{p}.{r}_proj.weight") for r in ("q", "k", "v", "o")}
        for r in ("q", "k", "v", "o"):
            if f"{p}.{r}_proj.bias" in self.t:
                params[f"{r}_bias"] = self.take(f"{p}.{r}_proj.bias")
        if self.fam.qk_norm != "none":
            params["q_norm"] = self.take(f"{p}.q_norm.weight")
            params["k_norm"] = self.take(f"{p}.k_norm.weight")
        window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "use_sliding_window", True) is False:
            window = None
        return self.g.add(
            layer_node(i, "attn"), "attention", [x], params, layer=i,
            num_heads=int(cfg.num_attention_heads), num_kv_heads=int(cfg.num_key_value_heads),
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
            rope_theta=float(self.g.meta["rope_theta"]), qk_norm=self.fam.qk_norm,
            eps=float(cfg.rms_norm_eps), sliding_window=int(window) if window else None,
            clip_qkv=float(cfg.clip_qkv) if getattr(cfg, "clip_qkv", None) else None,
        )

    def mlp_params(self, p: str) -> dict[str, str]:
        return {r: self.take(f"{p}.{r}_proj.weight") for r in ("gate", "up", "down")}

    def moe(self, i: int, x: str) -> str:
        cfg, fam = self.cfg, self.fam
        prefix = next((f"model.layers.{i}.{m}" for m in fam.moe_prefixes
                       if f"model.layers.{i}.{m}.gate.weight" in self.t), None)
        if prefix is None:
            raise FrontendError(f"{fam.name}: layer {i} has no router weight "
                                f"(looked for model.layers.{i}.{{{','.join(fam.moe_prefixes)}}}.gate.weight)")
        n_exp = fam.num_experts(cfg)
        router = self.g.add(layer_node(i, "router"), "router", [x], {"weight": self.take(f"{prefix}.gate.weight")},
                            layer=i, num_experts=n_exp, top_k=int(cfg.num_experts_per_tok),
                            norm_topk_prob=fam.norm_topk(cfg))
        experts = [self.g.add(expert_node(i, e), "expert", [x, router], self.expert_params(prefix, e),
                              layer=i, expert=e) for e in range(n_exp)]
        if fam.has_shared_expert:
            params = self.mlp_params(f"{prefix}.shared_expert")
            params["shared_gate"] = self.take(f"{prefix}.shared_expert_gate.weight")
            experts.append(self.g.add(layer_node(i, "shared"), "shared_expert", [x], params, layer=i))
        return self.g.add(layer_node(i, "combine"), "combine", [router, *experts], layer=i)

    def expert_params(self, prefix: str, e: int) -> dict[str, str]:
        gate, up, down = self.fam.expert_names
        per = {r: f"{prefix}.experts.{e}.{n}.weight" for r, n in zip(("gate", "up", "down"), (gate, up, down))}
        if all(k in self.t for k in per.values()):
            return {r: self.take(k) for r, k in per.items()}
        fused_gu, fused_d = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
        if fused_gu in self.t and fused_d in self.t:
            return self.split_fused(prefix, e, fused_gu, fused_d)
        raise FrontendError(f"{self.fam.name}: expert {e} of {prefix} not found (neither per-expert "
                            f"{per['gate']} nor fused {fused_gu})")

    def split_fused(self, prefix: str, e: int, gu_key: str, d_key: str) -> dict[str, str]:
        gu, d = self.t[gu_key], self.t[d_key]  # [E, 2I, H], [E, H, I]
        inter = gu.shape[1] // 2
        mine = gu.rows(e, e + 1)
        mine = TensorRef(mine.path, mine.offset, mine.shape[1:], mine.dtype)  # [2I, H]
        down = d.rows(e, e + 1)
        out = {}
        for role, ref in (("gate", mine.rows(0, inter)), ("up", mine.rows(inter, 2 * inter)),
                          ("down", TensorRef(down.path, down.offset, down.shape[1:], down.dtype))):
            key = f"{prefix}.experts.{e}.{role}_proj.weight"
            self.g.weights.add_ref(key, ref)
            out[role] = key
        self.used.update((gu_key, d_key))
        return out

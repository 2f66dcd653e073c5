"""PyTorch semantics of each IR node kind (fp32 reference math).

Shapes: B batch, T tokens per sequence, N = B*T flattened tokens, H hidden, E experts,
k active experts per token, I expert intermediate size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    """A router's decision for N flattened tokens."""

    weights: torch.Tensor  # [N, k] routing weights of the chosen experts
    indices: torch.Tensor  # [N, k] chosen expert ids
    logits: torch.Tensor  # [N, E] raw router logits
    shape: tuple[int, ...] = ()  # the router input's shape [B, T, H] (what combine restores)


@dataclass(frozen=True)
class ExpertOut:
    """One expert's output on the tokens routed to it (not yet weighted)."""

    token_idx: torch.Tensor  # [n] flattened token positions
    slot: torch.Tensor  # [n] which of the k routing slots picked this expert
    y: torch.Tensor  # [n, H]
    gate: torch.Tensor | None = None  # [n, I] the gate and up products ``y`` was made of (what autograd keeps anyway)
    up: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim]`` in the half-rotation layout used by these families."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[T, T]``: True where query i may attend key j (causal, optional sliding window)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    return allowed


def attention(x: torch.Tensor, w: Mapping[str, torch.Tensor], a: Mapping[str, Any]) -> torch.Tensor:
    """Causal GQA self-attention with RoPE over ``x [B, T, H]``; returns ``[B, T, H]``."""
    return F.linear(attention_context(x, w, a), w["o"], w.get("o_bias"))


def attention_context(x: torch.Tensor, w: Mapping[str, torch.Tensor], a: Mapping[str, Any]) -> torch.Tensor:
    """The input of attention's output projection, ``[B, T, num_heads x head_dim]``."""
    q = F.linear(x, w["q"], w.get("q_bias"))
    k = F.linear(x, w["k"], w.get("k_bias"))
    v = F.linear(x, w["v"], w.get("v_bias"))
    return attention_core(q, k, v, w, a)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Mapping[str, torch.Tensor],
                   a: Mapping[str, Any]) -> torch.Tensor:
    """What attention does between its input and output projections: from the projected ``q, k, v``
    (``[B, T, heads x head_dim]``, biases added) the q/k norms, RoPE, causal softmax and the
    weighted values, ``[B, T, num_heads x head_dim]`` (the input of the ``o`` projection)."""
    b, t, _ = q.shape
    nh, nkv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if a["qk_norm"] == "full":
        q, k = rms_norm(q, w["q_norm"], a["eps"]), rms_norm(k, w["k_norm"], a["eps"])
    if a.get("clip_qkv"):  # OLMoE clamps after its q/k norm
        q, k, v = (z.clamp(-a["clip_qkv"], a["clip_qkv"]) for z in (q, k, v))
    q = q.view(b, t, nh, hd)
    k = k.view(b, t, nkv, hd)
    if a["qk_norm"] == "head":
        q, k = rms_norm(q, w["q_norm"], a["eps"]), rms_norm(k, w["k_norm"], a["eps"])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, nkv, hd).transpose(1, 2)  # [B, h, T, hd]
    cos, sin = rope_cos_sin(torch.arange(t, device=q.device), hd, a["rope_theta"])
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5  # [B, h, T, T]
    scores = scores.masked_fill(~attention_mask(t, a.get("sliding_window"), q.device), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, t, nh * hd)


def route(x: torch.Tensor, weight: torch.Tensor, a: Mapping[str, Any]) -> Routing:
    """Softmax top-k routing of ``x [B, T, H]`` (flattened to N tokens)."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.autocast(flat.device.type, enabled=False):  # decisions at full precision under autocast
        logits = F.linear(flat, weight.to(flat.dtype))  # [N, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, a["top_k"], dim=-1)  # [N, k]
    if a["norm_topk_prob"]:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return Routing(top_w.to(x.dtype), top_i, logits, tuple(x.shape))


def expert(x: torch.Tensor, routing: Routing, e: int, w: Mapping[str, torch.Tensor]) -> ExpertOut:
    """Run expert ``e`` on exactly the tokens routed to it."""
    flat = x.reshape(-1, x.shape[-1])
    token_idx, slot = torch.where(routing.indices == e)
    xt = flat[token_idx]
    a, u = F.linear(xt, w["gate"]), F.linear(xt, w["up"])  # swiglu's products, kept for observers
    return ExpertOut(token_idx, slot, F.linear(F.silu(a) * u, w["down"]), a, u)


def shared_expert(x: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return torch.sigmoid(F.linear(flat, w["shared_gate"])) * swiglu(flat, w["gate"], w["up"], w["down"])


def combine(shape: torch.Size, routing: Routing, outs: list[ExpertOut | torch.Tensor],
            scales: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of expert outputs back to ``shape [B, T, H]``.

    ``scales [E]`` (optional) multiplies each routed expert's output; at 1 it changes nothing, and
    its gradient is the first-order loss change of scaling that expert (the contribution score).
    """
    n, h = shape[0] * shape[1], shape[-1]
    out = None  # accumulated in place: an out-of-place add per expert copied all [N, H] each time
    for e, o in enumerate(outs):
        if isinstance(o, torch.Tensor):  # shared expert: dense [N, H]
            out = o.clone() if out is None else out.add_(o)
            continue
        contrib = o.y * routing.weights[o.token_idx, o.slot, None]
        if scales is not None:
            contrib = contrib * scales[e]
        if out is None:
            out = torch.zeros(n, h, dtype=contrib.dtype, device=o.y.device)
        out.index_add_(0, o.token_idx, contrib)
    if out is None:
        raise ValueError("combine needs at least one expert output")
    return out.view(*shape)

"""Layer-local sensitivity: each expert's quantization error at its own layer, weighted by the
gradient of the model's output distribution there (a Fisher estimate of the KL increase).

Why: quantizing expert e of layer l perturbs that layer's MoE output by ``d_t = w_te (y_q - y)``
on the tokens routed to it. To second order the mean KL to the full-precision model is
``1/2 d^T F d`` with F the Fisher information of the output distribution with respect to the
layer output. Sampling a label ``y_t' ~ p_t'`` at every position and back-propagating
``sum_t' log p(y_t')`` gives per-token gradients ``g_t`` with ``E[(sum_t g_t . d_t)^2] =
d^T F d`` (cross terms of different positions vanish in expectation because the score has mean
zero), so ``1/2 sum_seq (sum_{t in seq} g_t . d_t)^2 / n_positions``, averaged over
``label_samples`` draws, estimates the per-token KL without running later layers per expert.

Cost, for L layers, E experts per layer, b bit-widths and S x T calibration tokens:
one forward, one backward with recomputation (about three forwards), and per layer E x b
fake quantizations plus each expert's MLP on its routed tokens: linear in L. Memory: one
layer's activations and its MLP weights, or, where those exceed :data:`CHECKPOINT_BYTES`, one
expert's weights at a time (``RunOptions.checkpoint``: the backward recomputes them; OLMoE-1B-7B's
0.75 GiB of bf16 experts a layer are kept, which saves 0.7 s a layer; their 1.5 GiB in fp32 and
Qwen3-30B-A3B's 1.1 GiB in bf16 are recomputed), and the residual stream at every layer boundary, kept on disk.

Non-expert nodes (attention, shared experts, dense MLPs; ``--nonexpert-bits auto``) use the same
estimate with the gradient of their own output, retained during that backward pass
(``backward_layers(watch=...)``): per layer and bit-width one evaluation of the node on every
calibration token, so the added cost is about |b| attention forwards per layer, linear in L.
The LM head and the embedding table are measured instead (:func:`measured_kl`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ...eval.metrics import next_token_logprobs, token_kl
from ...ir import ops
from ...ir.graph import Graph, layer_node
from ...ir.interpreter import MLP_KINDS, Interpreter, RunOptions
from ...ir.stream import SpilledBoundaries, embed, layer_input, layer_outputs, run_layer

log = logging.getLogger(__name__)


def forward_boundaries(interp: Interpreter, ids: torch.Tensor, opts: RunOptions,
                       tick: Callable[[], None]) -> tuple[SpilledBoundaries, torch.Tensor]:
    """Run layer-major, keeping every layer's input on disk; returns them and the last output."""
    store = SpilledBoundaries()
    with torch.no_grad():
        h = embed(interp, ids, opts)
        for layer in range(len(layer_outputs(interp.graph))):
            store.put(layer, h)
            h = run_layer(interp, layer, h, opts)
            tick()
    return store, h


def head_gradient(interp: Interpreter, h_last: torch.Tensor, ids: torch.Tensor, labels: str,
                  gen: torch.Generator | None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """``d/dh_L`` of the summed next-token log-likelihood: of labels drawn from the model
    (``labels="sampled"``) or of the text's own tokens (``"true"``), ``[S, T, H]``; the head's
    products in ``autocast`` (None: fp32)."""
    grad = torch.zeros_like(h_last)
    last = layer_outputs(interp.graph)[-1]
    for start in range(0, len(h_last), 4):  # 4 sequences at a time bound the [s, T, V] logits
        sl = slice(start, start + 4)
        h = h_last[sl].clone().requires_grad_(True)
        logits = interp.run(None, RunOptions(quantize=False, resume={last: h}, autocast=autocast),
                            outputs=("lm_head",))["lm_head"]
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [s, T-1, V]
        if labels == "sampled":
            with torch.no_grad():
                y = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=gen).view(*logp.shape[:2], 1)
        else:
            y = ids[sl, 1:, None]
        logp.gather(-1, y).sum().backward()
        grad[sl] = h.grad
    return grad


def backward_layers(interp: Interpreter, store: SpilledBoundaries, grad_out: torch.Tensor, opts: RunOptions,
                    at_layer: Callable[[int, dict, torch.Tensor], None], tick: Callable[[], None],
                    watch: Callable[[int], set[str]] | None = None,
                    after_backward: Callable[[int, dict, dict, torch.Tensor], None] | None = None,
                    top: int | None = None,
                    done: Callable[[int, torch.Tensor | None], None] | None = None,
                    expert_outputs: bool = False) -> None:
    """From the last layer down: recompute layer l from its stored input with autograd, call
    ``at_layer(l, values, g)`` with the layer's observed values (MoE input, routing) and the
    gradient ``g`` of its output, then carry the gradient to the layer's input.

    ``watch(l)``: node ids of layer l whose value, input values and output gradient
    ``after_backward(l, values, grads, g_in)`` then receives (``g_in``: the gradient of the
    residual stream entering layer l); with it every layer, layer 0 included, is back-propagated.
    ``top``: start at that layer (``grad_out`` is then the gradient of its output; default the
    last layer); ``done(l, g_in)``: called when layer l is finished, with the gradient carried to
    its input (None when it is not: layer 0 without ``watch``), e.g. to keep it for a resume.
    ``expert_outputs``: ``values`` also holds each routed expert's output (``ops.ExpertOut``, detached, with
    its gate and up products), for :func:`expert_scores`' ``outputs``: ``[k N, H]`` and ``2 x [k N, I]`` values a
    layer (the latter autograd keeps for the backward anyway), until ``at_layer`` returns.
    """
    g = grad_out
    graph = interp.graph
    mlp_bytes = _mlp_bytes(graph, opts.autocast)
    for layer in reversed(range(len(layer_outputs(graph)) if top is None else top + 1)):
        h = store.get(layer).requires_grad_(True)
        seen: dict = {}
        own = {layer_node(layer, "router"), layer_node(layer, "moe_norm")}
        watched = watch(layer) if watch is not None else set()
        inputs = {i for n in watched for i in graph.inputs(n)}

        def observe(node_id, kind, value, seen=seen, own=own, watched=watched, inputs=inputs):
            if node_id in watched:
                value.retain_grad()
                seen[node_id] = value
            elif node_id in inputs or node_id in own:
                seen[node_id] = value
            elif expert_outputs and kind == "expert":
                seen[node_id] = ops.ExpertOut(value.token_idx, value.slot, value.y.detach(),
                                              *(t.detach() if t is not None else None for t in (value.gate, value.up)))

        out_id = layer_node(layer, "moe_res")
        run = RunOptions(quantize=opts.quantize, bits_override=opts.bits_override, observer=observe,
                         weight_override=opts.weight_override, checkpoint=mlp_bytes.get(layer, 0) > CHECKPOINT_BYTES,
                         autocast=opts.autocast, resume={layer_input(graph, layer): h})
        out = interp.run(None, run, outputs=(out_id,))[out_id]
        at_layer(layer, seen, g)
        if layer > 0 or opts.weight_override or watch is not None:
            out.backward(g)
            if watch is not None and after_backward is not None:
                grads = {n: seen[n].grad for n in watched if n in seen}
                values = {n: v.detach() for n, v in seen.items() if isinstance(v, torch.Tensor)}
                after_backward(layer, values, grads, h.grad)
            g = h.grad
        if done is not None:
            done(layer, h.grad)
        tick()


# backward_layers: layers whose MLP weights (in the run's dtype) exceed this recompute them. Keeping OLMoE-1B-7B's
# 1.6 GB a layer in fp32 instead (a 2 GiB bound) showed no saving in a 16-layer compile on an Intel Xeon (about
# 10 s a backward layer either way, one run each) and raised the sensitivity pass's peak from 2.6 to 4.6 GB
CHECKPOINT_BYTES = 2**30


def _mlp_bytes(graph: Graph, autocast: torch.dtype | None) -> dict[int, int]:
    """Per layer, the bytes of its MLP-like nodes' weights (experts, shared experts, dense MLPs) as a
    run in ``autocast`` holds them: as stored when stored in that dtype, else fp32."""
    out: dict[int, int] = {}
    for node in graph.nodes():
        if node.kind in MLP_KINDS and "layer" in node.attrs:
            for key in node.params.values():
                size = autocast.itemsize if autocast is not None and graph.weights.dtype(key) == autocast else 4
                out[node.attrs["layer"]] = out.get(node.attrs["layer"], 0) + math.prod(graph.weights.shape(key)) * size
    return out


def fisher_kl(g: torch.Tensor, delta: torch.Tensor, n_seq: int, positions: int,
              seq: torch.Tensor | None = None) -> float:
    """``1/2 sum_seq (sum_{t in seq} g_t . delta_t)^2 / positions``: the Fisher estimate of the mean
    KL per position when a value whose gradient is ``g`` changes by ``delta`` (module docstring).
    Rows of ``g`` and ``delta`` are tokens of sequence ``seq[row]``; without ``seq`` the tensors
    cover all ``n_seq`` sequences in order (``[S, T, H]`` or ``[S * T, H]``)."""
    if seq is None:
        per_seq = (g.reshape(n_seq, -1).double() * delta.reshape(n_seq, -1).double()).sum(-1)
    else:
        per_seq = torch.zeros(n_seq, dtype=torch.float64).index_add_(0, seq, (g * delta).sum(-1).double())
    return float(0.5 * per_seq.pow(2).sum() / positions)


def perturbation_scores(interp: Interpreter, node_id: str, resume: dict, y: torch.Tensor, g: torch.Tensor,
                        bits: tuple[int, ...], n_seq: int, positions: int) -> dict[str, dict[int, float]]:
    """The Fisher KL estimate (``kl``) and the mean output-change norm (``norm``, see
    :func:`change_norm`) per bits of quantizing non-expert node ``node_id`` alone: its value
    recomputed from its inputs ``resume`` with fake-quantized weights, against its full-precision
    value ``y`` whose gradient is ``g``. Cost: one evaluation of the node per bit-width (plus one at
    full precision when ``y`` comes from a run in a lower precision).

    When ``y`` comes from a run in a lower precision (bf16 autocast), an attention node's change
    is computed by :class:`AttentionRun` in that precision, as products of differences; other
    nodes are recomputed in fp32 on both sides."""
    kl, norm = {16: 0.0}, {16: 0.0}
    graph = interp.graph
    with torch.no_grad():
        if y.dtype != torch.float32:  # observed in a lower-precision run: the inputs in fp32
            resume = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in resume.items()}
        if y.dtype != torch.float32 and graph.node(node_id).kind == "attention":
            w = interp.weights(node_id, RunOptions(quantize=False))
            run = AttentionRun(resume[graph.inputs(node_id)[0]], w, graph.node(node_id).attrs, y.dtype)
            changes = {b: run.change(w, interp.weights(node_id, RunOptions(quantize=False, bits_override={node_id: b})))
                       for b in bits}
        else:
            if y.dtype != torch.float32:  # both sides of the change in fp32
                y = interp.run(None, RunOptions(quantize=False, resume=resume), outputs=(node_id,))[node_id]
            changes = {b: interp.run(None, RunOptions(quantize=False, bits_override={node_id: b}, resume=resume),
                                     outputs=(node_id,))[node_id] - y for b in bits}
        for b, delta in changes.items():
            kl[b] = fisher_kl(g, delta, n_seq, positions)
            norm[b] = change_norm(delta, positions)
    return {"kl": kl, "norm": norm}


def change_norm(delta: torch.Tensor, positions: int) -> float:
    """``sum_t ||delta_t|| / positions``: the mean L2 norm per position of a change of the residual
    stream (rows of ``delta`` are tokens; positions it does not touch count as zero). Top-k routing
    flips downstream grow with this, not with the Fisher estimate (its square): see :func:`flip_rates`."""
    return float(delta.reshape(-1, delta.shape[-1]).double().norm(dim=-1).sum() / positions)


def measured_kl(interp: Interpreter, ids: torch.Tensor, h_last: torch.Tensor,
                items: dict[str, tuple[int, ...]], embed_sequences: int | None = None,
                autocast: torch.dtype | None = None) -> dict[str, dict[int, float]]:
    """The measured mean KL per position of quantizing each node of ``items`` (``{node id: bits}``)
    alone: an LM head (the last op: one head projection of every calibration token per
    bit-width) or an embedding table (the first: the first ``embed_sequences`` sequences, None:
    all, through every layer), against the full-precision model whose last layer's output is
    ``h_last`` (the embedding's: an fp32 forward of its sequences).

    The embedding's runs, its reference and one per bit-width, go through the layers as one batch
    of ``(1 + |bits|) x embed_sequences`` sequences (every row is independent of the others), so
    each layer's weights are read and widened to fp32 once, not once per run, and each expert
    multiplies 1 + |bits| times the tokens per product. Those runs are fp32: a bf16 product would
    round the weights by about an eighth of an 8-bit step. The head's weights are fake-quantized
    once per bit-width; its reference log-probabilities are kept across bit-widths when they fit
    :data:`KEEP_REF_BYTES` (``[S, T-1, V]`` fp32: 0.4 GB at 16 x 128 tokens and OLMoE's 50k
    vocabulary) and else recomputed per chunk of 4 sequences (1.2 GB at Qwen3's 152k, on top of
    two copies of the head).

    The head's products, the largest of the measurement (``T x H x V`` per sequence and run), run
    in fp32 for the reference; with ``autocast`` (bf16 where it multiplies faster than fp32) every
    other run's logits are the reference's plus the product of the *change* alone
    (:func:`_moved_kl`: ``x (W_q - W)`` for the head at each bit-width, ``(x_q - x) W`` for
    the embedding's runs), whose rounding is relative to the change, not to the logits: 2.4x
    fp32's products per second on an AVX-512 BF16 EPYC, within 1 % of the fp32 KL."""
    graph = interp.graph
    bad = {k: graph.node(k).kind for k in items if graph.node(k).kind not in ("lm_head", "embed")}
    if bad:
        raise ValueError(f"measured_kl measures LM heads and embedding tables, not {bad}")
    chunk = 4  # 4 sequences bound the [s, T, V] logits
    n_embed = len(ids) if embed_sequences is None else max(1, min(len(ids), embed_sequences))
    fp = RunOptions(quantize=False)
    head = next((n.id for n in graph.nodes("lm_head")), None) if autocast is not None else None

    def kl_sum(ref: torch.Tensor, h: torch.Tensor, opts: RunOptions = fp) -> float:
        return float(token_kl(ref, _logprobs(interp, h, opts)).sum())

    out = {}
    with torch.no_grad():
        for node_id, bits in items.items():
            kl = {16: 0.0}
            if graph.node(node_id).kind == "embed":
                n, sub = n_embed, ids[:n_embed]
                # the reference runs in fp32 too: h_last may come from a bf16 run, whose own
                # difference to fp32 is no quantization error
                h = torch.cat([embed(interp, sub, fp)]
                              + [embed(interp, sub, RunOptions(quantize=False, bits_override={node_id: b})) for b in bits])
                for layer in range(len(layer_outputs(graph))):
                    h = run_layer(interp, layer, h, fp)
                runs = h.view(1 + len(bits), n, *h.shape[1:])
                total = dict.fromkeys(bits, 0.0)
                w_head = graph.weights[graph.node(head).params["weight"]].to(autocast) if head is not None else None
                for i in range(0, n, chunk):
                    ref = _logprobs(interp, runs[0, i:i + chunk])
                    x_ref = _head_input(interp, runs[0, i:i + chunk]) if head is not None else None
                    for j, b in enumerate(bits):
                        if head is None:
                            total[b] += kl_sum(ref, runs[1 + j, i:i + chunk])
                        else:
                            total[b] += _moved_kl(ref, _head_input(interp, runs[1 + j, i:i + chunk]) - x_ref,
                                                  w_head, autocast)
            else:
                n = len(ids)
                vocab = graph.weights.shape(graph.node(node_id).params["weight"])[0]
                keep = n * (ids.shape[1] - 1) * vocab * 4 <= KEEP_REF_BYTES
                refs: dict[int, torch.Tensor] = {}
                inputs: dict[int, torch.Tensor] = {}  # the head's input per chunk ([s, T, H]: small), with autocast
                total = {}
                # as stored (a bf16 checkpoint's: half an fp32 copy), for the changes ``W_q - W``
                w = graph.weights[graph.node(node_id).params["weight"]] if autocast is not None else None
                for b in bits:  # the head's weights, fake-quantized once for every chunk
                    over = RunOptions(quantize=False, bits_override={node_id: b})
                    wq = interp.weights(node_id, over)
                    if autocast is None:
                        opts, dw = RunOptions(quantize=False, weight_override={node_id: wq}), None
                    else:  # only the change is kept: the fp32 fake-quantized head goes now
                        opts, dw = fp, _cast_change(wq["weight"], w, autocast)
                    del wq
                    total[b] = 0.0
                    for i in range(0, n, chunk):
                        ref = refs[i] if i in refs else _logprobs(interp, h_last[i:i + chunk])
                        if keep:
                            refs[i] = ref
                        if dw is None:
                            total[b] += kl_sum(ref, h_last[i:i + chunk], opts)
                        else:
                            if i not in inputs:
                                inputs[i] = _head_input(interp, h_last[i:i + chunk])
                            total[b] += _moved_kl(ref, inputs[i], dw, autocast)
                del refs
            for b in bits:
                kl[b] = max(0.0, total[b] / (n * (ids.shape[1] - 1)))
            out[node_id] = kl
    return out


def _cast_change(wq: torch.Tensor, w: torch.Tensor, cast: torch.dtype, rows: int = 4096) -> torch.Tensor:
    """``(wq - w)`` in ``cast``, a block of rows at a time: no weight-sized fp32 difference at once
    (the LM head's is 0.4 GB at OLMoE's vocabulary, 1.2 GB at Qwen3's)."""
    out = torch.empty(wq.shape, dtype=cast)
    for i in range(0, len(wq), rows):
        out[i:i + rows] = wq[i:i + rows] - w[i:i + rows]
    return out


def _head_input(interp: Interpreter, h: torch.Tensor) -> torch.Tensor:
    """What the LM head multiplies for the last layer's output ``h`` (its final norm), fp32."""
    last = layer_outputs(interp.graph)[-1]
    (node,) = interp.graph.inputs(next(interp.graph.nodes("lm_head")).id)
    return interp.run(None, RunOptions(quantize=False, resume={last: h}), outputs=(node,))[node]


def _moved_kl(ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, cast: torch.dtype) -> float:
    """``sum KL(P_ref || Q)`` over the positions, for ``ref`` the reference's next-token
    log-probabilities (``[s, T-1, V]``) and ``Q`` the softmax of its logits plus ``x w^T`` (``x``
    ``[s, T, H]``, the product in ``cast``). The log-probabilities differ from the logits by a
    constant per position, which the softmax ignores, so ``ref`` stands for the logits. In place
    where it can be: three ``[s, T-1, V]`` tensors, not seven (fresh pages cost as much as the
    arithmetic at 0.1 GB each)."""
    z = F.linear(x[:, :-1].to(cast), w.to(cast)).float()
    z += ref
    q = torch.log_softmax(z, dim=-1)
    del z
    q.neg_().add_(ref)  # ref - q
    p = ref.exp()
    return float(torch.einsum("...v,...v->", p, q))


KEEP_REF_BYTES = 512 * 2**20  # measured_kl: the LM head's reference log-probabilities kept up to this size


class ExpertRun:
    """An expert's full-precision products on its routed tokens ``xt``, kept to price changes of its
    weights (:meth:`change`).

    With ``cast`` (e.g. bf16) every product runs in it, yet a change stays as precise as its own
    size: the products are of the *differences* (``x (W_q - W)``, ``h_q - h``), and the values both
    sides share (``x W``, ``h``) are computed once and used on both, so their rounding cancels to
    first order; the elementwise SwiGLU runs in fp32. (Rounding two full products in bf16 and
    subtracting them would lose an 8-bit change, a few 2^-8 of the output, in the rounding.)
    Without ``cast`` it is the plain fp32 difference of two SwiGLUs. ``forward``, the expert's values on ``xt``
    as the layer's own forward computed them with the same weights (``ops.ExpertOut``), spares products: without
    ``cast`` its output spares all three (``act`` is then not kept: None); with ``cast`` its gate and up products,
    which a forward under autocast made in ``cast`` from the same rows and weights, spare those two.
    """

    def __init__(self, xt: torch.Tensor, w: dict, cast: torch.dtype | None = None,
                 forward: ops.ExpertOut | None = None) -> None:
        self.cast, c = cast, cast or xt.dtype
        self.xt, self.xc = xt, xt.to(c)
        if forward is not None and cast is None:  # the fp32 difference needs only the output
            self.y, self.a, self.u, self.act, self.act_c = forward.y, None, None, None, None
            return
        if forward is not None and forward.gate is not None:  # the forward's products in cast: the same ones
            if forward.gate.dtype != c:
                raise ValueError(f"ExpertRun in {c} was given a forward's products in {forward.gate.dtype}")
            self.a, self.u = forward.gate.float(), forward.up.float()
        else:
            self.a = F.linear(self.xc, w["gate"].to(c)).float()
            self.u = F.linear(self.xc, w["up"].to(c)).float()
        self.act = F.silu(self.a) * self.u  # [n, I]
        self.act_c = self.act.to(c)
        self.y = F.linear(self.act_c, w["down"].to(c)).float()  # [n, H]

    def change(self, w: dict, wq: dict, dw: dict | None = None) -> torch.Tensor:
        """``swiglu(xt, wq) - swiglu(xt, w)``, ``[n, H]`` (``dw``: ``wq - w`` per role, when the
        caller has it)."""
        if self.cast is None:
            return ops.swiglu(self.xt, wq["gate"], wq["up"], wq["down"]) - self.y
        c = self.cast
        dw = dw if dw is not None else weight_changes(w, wq)
        return self.cast_change({r: dw[r].to(c) for r in ("gate", "up", "down")}, wq["down"].to(c))

    def cast_change(self, dw: dict, down_q: torch.Tensor) -> torch.Tensor:
        """:meth:`change` (with ``cast``) from the weight changes ``W_q - W`` per role and the fake-quantized down
        weights, both already in ``cast`` (:meth:`~dmpq_compile.ir.interpreter.Interpreter.fake_changes`)."""
        da = F.linear(self.xc, dw["gate"]).float()
        du = F.linear(self.xc, dw["up"]).float()
        d_act = F.silu(self.a + da) * (self.u + du) - self.act
        return F.linear(d_act.to(self.cast), down_q).float() + F.linear(self.act_c, dw["down"]).float()


class AttentionRun:
    """An attention node's full-precision values on its input ``x`` (``[B, T, H]``), kept to price
    changes of its ``q, k, v, o`` weights (:meth:`change`) with products in ``cast``, the way
    :class:`ExpertRun` prices an expert's: the projections of the change are products of the weight
    *differences* (``x dW_q``, ...), added to the shared projections; the softmax core
    (:func:`~dmpq_compile.ir.ops.attention_core`) runs in fp32 on both sides; the output's change
    is ``d_ctx W_o,q + ctx dW_o``. Biases and q/k norm weights are not quantized: shared."""

    def __init__(self, x: torch.Tensor, w: dict, attrs: dict, cast: torch.dtype) -> None:
        self.attrs, self.cast = attrs, cast
        self.xc = x.to(cast)
        self.qkv = [F.linear(self.xc, w[r].to(cast)).float() + (w[f"{r}_bias"] if w.get(f"{r}_bias") is not None else 0)
                    for r in ("q", "k", "v")]
        self.ctx = ops.attention_core(*self.qkv, w, attrs)  # [B, T, heads x head_dim]
        self.ctx_c = self.ctx.to(cast)

    def change(self, w: dict, wq: dict) -> torch.Tensor:
        """``attention(x, wq) - attention(x, w)``, ``[B, T, H]``."""
        c = self.cast
        moved = [z + F.linear(self.xc, (wq[r] - w[r]).to(c)).float() for z, r in zip(self.qkv, ("q", "k", "v"))]
        d_ctx = ops.attention_core(*moved, w, self.attrs) - self.ctx
        return (F.linear(d_ctx.to(c), wq["o"].to(c)).float()
                + F.linear(self.ctx_c, (wq["o"] - w["o"]).to(c)).float())


def expert_scores(graph: Graph, interp: Interpreter, layer: int, x: torch.Tensor, routing: ops.Routing,
                  g: torch.Tensor, bits: tuple[int, ...], seq_len: int, experts: list | None = None,
                  autocast: torch.dtype | None = None, probe: tuple[list[int], int] | None = None,
                  outputs: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Per expert of ``layer`` (``experts``: that layer's nodes, when the caller has them grouped):
    the Fisher KL estimate per bits, the Fisher magnitude of its whole output (``contribution``),
    the mean variance of its intermediate neurons, the routed tokens it was measured on
    (``tokens``) and the squared error of its weights fake-quantized at each bits (``weight_error``,
    what :mod:`.rare_experts` prices experts with too few tokens by). ``autocast``: the dtype of
    the expert's products (:class:`ExpertRun`; the weights are fake-quantized in fp32).

    ``probe`` (``(sequences, bits)``): also keep, as ``probe``, what the flip probe of this layer
    needs (:func:`flip_rates`): the expert's weighted output change at ``bits`` on the tokens of those
    sequences (``rows`` index the group's flattened tokens) and its :func:`change_norm` there.

    ``outputs``: each expert's full-precision values on its routed tokens as the layer's forward computed
    them (``ops.ExpertOut``: the same tokens in the same order, the same weights), so that they are not
    computed again (:class:`ExpertRun`); in an fp32 run ``neuron_variance`` is then None (it needs the
    intermediate values, which that run does not rebuild)."""
    x, g = x.detach().float().reshape(-1, x.shape[-1]), g.detach().float().reshape(-1, g.shape[-1])  # [N, H]
    n_seq, positions = x.shape[0] // seq_len, x.shape[0] // seq_len * (seq_len - 1)
    if probe is not None:
        local_seq = torch.full((n_seq,), -1, dtype=torch.long)
        local_seq[torch.tensor(probe[0])] = torch.arange(len(probe[0]))
        probe_positions = len(probe[0]) * (seq_len - 1)
    out = {}
    with torch.no_grad():
        for node in experts if experts is not None else graph.experts_by_layer().get(layer, []):
            token_idx, slot = torch.where(routing.indices == node.attrs["expert"])
            xt, gt = x[token_idx], g[token_idx]
            seq = token_idx // seq_len
            wr = routing.weights[token_idx, slot, None]

            def fisher(delta: torch.Tensor, gt=gt, seq=seq) -> float:  # delta [n, H]: layer-output change
                return fisher_kl(gt, delta, n_seq, positions, seq)

            # with autocast the weights as stored where stored in its dtype: the changes are priced from them
            w = interp.weights(node.id, RunOptions(quantize=False, autocast=autocast))
            run = ExpertRun(xt, w, autocast, outputs.get(node.id) if outputs else None)
            if outputs and node.id in outputs and not torch.equal(outputs[node.id].token_idx, token_idx):
                raise ValueError(f"{node.id}: the forward's routed tokens are not the scores' (internal error)")
            act, y = run.act, run.y
            kl, norm, werr = {16: 0.0}, {16: 0.0}, {16: 0.0}
            extra = {}
            for b in bits if probe is None or probe[1] in bits else (*bits, probe[1]):
                if autocast is None:  # the fp32 change reads all of wq; then wq becomes the difference
                    wq = interp.fake_quantized(node.id, w, b)
                    delta = run.change(w, wq) * wr
                    error = weight_error(w, wq, weight_changes(w, wq, in_place=("gate", "up", "down")))
                else:  # the change of a cast run reads the differences and wq's down only, in its dtype
                    dw, down_q, error = interp.fake_changes(node.id, w, b, autocast)
                    delta = run.cast_change(dw, down_q) * wr
                if probe is not None and b == probe[1]:
                    mine = local_seq[seq] >= 0
                    extra["probe"] = {"rows": local_seq[seq[mine]] * seq_len + token_idx[mine] % seq_len,
                                      "delta": delta[mine], "norm": change_norm(delta[mine], probe_positions)}
                if b not in bits:
                    continue
                werr[b] = error
                kl[b] = fisher(delta) if len(xt) else 0.0
                norm[b] = change_norm(delta, positions) if len(xt) else 0.0
            out[node.id] = {**extra, "kl": kl, "norm": norm, "contribution": fisher(y * wr) ** 0.5 if len(xt) else 0.0,
                            "neuron_variance": None if act is None else float(act.var(dim=0).mean()) if len(xt) > 1
                            else 0.0,
                            "tokens": len(xt), "weight_error": werr}
    return out


def probe_groups(n_seq: int, layers: list[int]) -> dict[int, list[int]]:
    """The layers the flip probe measures and the calibration sequences each uses: every layer, in
    disjoint groups, when there are as many sequences as layers (each sequence then runs once through
    the layers after its own probe's, in each of the probe's runs); else ``n_seq`` of them, evenly
    spaced from the first, one sequence each, and :func:`fill_rates` interpolates the others.

    Why not every layer with sequences reused: a probe of layer ``l`` runs its rows through every
    later layer, so probing all ``L`` layers of a model deeper than the calibration set has sequences
    costs about ``L^2 / n_seq`` sequence-layers, a forward of the calibration set per ``n_seq`` layers
    of depth (2.9 forwards at Qwen3-30B-A3B's 48 layers with 16 sequences, 5.8 at 94): quadratic in
    depth. At most one probe per sequence bounds it by one forward of the calibration set per run."""
    if n_seq >= len(layers):
        bounds = torch.linspace(0, n_seq, len(layers) + 1).round().long().tolist()
        return {layer: list(range(bounds[i], bounds[i + 1])) for i, layer in enumerate(layers)}
    picks = torch.linspace(0, len(layers) - 1, n_seq).round().long().tolist()
    return {layers[p]: [i] for i, p in enumerate(picks)}


def fill_rates(rates: dict[int, float], layers: list[int]) -> dict[int, float]:
    """Flip rates for every MoE layer of ``layers``: the measured ones as they are, each layer the probe
    did not measure (:func:`probe_groups`) linearly interpolated in depth between the nearest measured
    layers above and below it (the last MoE layer's rate is 0 by definition and always present). The
    measured rates fall smoothly with depth (:func:`flip_rates`), which is what makes the interpolation
    a fair stand-in for a one-sequence measurement."""
    known = sorted(rates)
    at = [rates[k] for k in known]
    filled = {layer: float(np.interp(layer, known, at)) if known else 0.0 for layer in layers if layer not in rates}
    return {**rates, **filled}  # np.interp holds the end values beyond the measured range


def flip_rates(interp: Interpreter, store: SpilledBoundaries, h_last: torch.Tensor, seq_len: int,
               groups: dict[int, list[int]], probes: dict[int, tuple[torch.Tensor, float]],
               routes: dict[int, ops.Routing], tick: Callable[[], None] = lambda: None,
               autocast: torch.dtype | None = None) -> dict[int, float]:
    """Per MoE layer l: the KL that top-k routing flips in layers after l add per unit of
    :func:`change_norm` of layer l's output, ``c_l``.

    The layer-local Fisher estimate sees the model with every router frozen at its full-precision
    decisions. A change of the residual stream flips decisions downstream wherever it crosses a
    router's top-k margin; that happens at a rate proportional to the change's size, so the KL it
    adds grows with the norm, not with its square, and dominates small changes (on
    ``samples/mixtral-tiny``, quantizing a layer's experts at 8 bits: 30-460x the frozen-routing
    KL; at 2-4 bits 1.4-7x). The flip KL divided by the norm was nearly constant over 2-4 bits
    within a layer and fell with depth (zero for the last MoE layer).

    The probe of layer l: every expert of layer l quantized at one bit-width on a group of
    calibration sequences (``groups[l]``, :func:`probe_groups`), the rest of the model run with its
    routers free and with them frozen at the full-precision decisions; the KL difference over the
    summed per-expert :func:`change_norm` on those sequences (the sum the allocator adds up) is
    ``c_l``.

    What the probe needs from layer l itself was measured by :func:`expert_scores` (``probe``):
    ``probes[l] = (change, norm)``, the layer output's change on the group's tokens (``[len(group)
    x T, H]``, the experts' weighted output changes summed) and the summed norm. The quantized layer's
    output is then the full-precision one (the next layer's stored input) plus that change, and the
    full-precision decisions of the later layers for the frozen runs are ``routes`` (observed by
    the backward pass). The free and the frozen rows of every started probe run as one batch through
    each later layer (:attr:`RunOptions.route_rows` holds the frozen half's decisions), so each
    layer's weights are read once, and no expert is fake-quantized again. Cost: at most about one
    forward of the calibration set (:func:`probe_groups` gives each sequence at most one probe); memory:
    two residual streams of the probed sequences. The reference is the full-precision model's last
    output ``h_last``. The runs multiply in ``autocast`` (None: fp32).
    """
    graph = interp.graph
    outs = layer_outputs(graph)
    moe = sorted(graph.experts_by_layer())
    rates = {moe[-1]: 0.0} if moe else {}
    if not groups:
        return rates
    opts = RunOptions(quantize=False, autocast=autocast)
    order: list[int] = []  # probes started so far; their rows are stacked in this order
    seqs: list[int] = []  # the sequence of each stacked row
    free = frozen = None
    with torch.no_grad():
        for m in range(min(groups), len(outs)):
            if order:
                x = torch.cat([free, frozen])
                router = layer_node(m, "router")
                fixed = {router: (len(seqs) * seq_len, _route_seqs(routes[m], seqs, seq_len))} if m in routes else {}
                y = interp.run(None, replace(opts, resume={layer_input(graph, m): x}, route_rows=fixed),
                               outputs=(outs[m],))[outs[m]]
                free, frozen = y[:len(seqs)], y[len(seqs):]
            if m in groups:
                change, _ = probes[m]
                fp_out = store.get(m + 1) if m + 1 < len(outs) else h_last
                q = fp_out[torch.tensor(groups[m])] + change.view(len(groups[m]), seq_len, -1).to(fp_out.dtype)
                free = q if free is None else torch.cat([free, q])
                frozen = q if frozen is None else torch.cat([frozen, q])
                seqs += groups[m]
                order.append(m)
            tick()
        kl: dict[str, list[torch.Tensor]] = {"free": [], "frozen": []}
        ref_h = h_last[torch.tensor(seqs)]
        for i in range(0, len(seqs), 4):  # 4 sequences at a time bound the [s, T, V] log-probabilities
            ref = _logprobs(interp, ref_h[i:i + 4], opts)
            for k, h in (("free", free), ("frozen", frozen)):
                kl[k].append(token_kl(ref, _logprobs(interp, h[i:i + 4], opts)).mean(-1))
        per_row = {k: torch.cat(v) for k, v in kl.items()}  # each row's mean KL per position
        row = 0
        for layer in order:
            sl = slice(row, row + len(groups[layer]))
            row = sl.stop
            f, z = float(per_row["free"][sl].mean()), float(per_row["frozen"][sl].mean())
            norm = probes[layer][1]
            rates[layer] = max(0.0, f - z) / norm if norm > 0 else 0.0
            log.debug("flip probe L%d (%d sequences): KL %.3g free, %.3g frozen, norm %.3g -> %.3g",
                      layer, len(groups[layer]), f, z, norm, rates[layer])
    return rates


def probe_changes(results: dict[str, dict], n_rows: int, hidden: int) -> tuple[torch.Tensor, float]:
    """A layer's flip-probe input from the ``probe`` entries of its :func:`expert_scores` ``results``:
    the experts' weighted output changes summed per token of the group (``[n_rows, hidden]``) and
    their summed norm."""
    change, norm = torch.zeros(n_rows, hidden), 0.0
    for r in results.values():
        p = r.get("probe")
        if p is not None and len(p["rows"]):
            change.index_add_(0, p["rows"], p["delta"].to(change.dtype))
            norm += p["norm"]
    return change, norm


def _route_seqs(route: ops.Routing, seqs: list[int], seq_len: int) -> ops.Routing:
    """The routing of sequences ``seqs`` (in that order) of a batch of rows of ``seq_len`` flattened tokens."""
    idx = (torch.tensor(seqs)[:, None] * seq_len + torch.arange(seq_len)[None, :]).reshape(-1)
    return ops.Routing(route.weights[idx], route.indices[idx], route.logits[idx], ())


def weight_changes(w: dict, wq: dict, in_place: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``W_q - W`` of an expert's gate, up and down weights; the roles in ``in_place`` are written
    over ``wq``'s (which are then gone), which saves a fresh weight-sized tensor (8 MB for an OLMoE
    expert matrix in fp32) a role, expert and width: :meth:`ExpertRun.change` with a cast reads only
    ``wq``'s down, so the gate and up go in place before it; the fp32 change reads all of ``wq``,
    so all three go in place after it. A role whose ``wq`` is ``w`` itself is never overwritten."""
    return {r: wq[r].sub_(w[r]) if r in in_place and wq[r] is not w[r] else wq[r] - w[r]
            for r in ("gate", "up", "down")}


def weight_error(w: dict, wq: dict, dw: dict | None = None) -> float:
    """``sum ||W_q - W||^2`` over an expert's gate, up and down weights: what its weights alone say
    about the error of quantizing it, whatever tokens reach it (``dw``: the changes, when the caller
    has them)."""
    dw = dw if dw is not None else weight_changes(w, wq)
    # a BLAS dot: 10x a float64 sum of squares, about 1e-5 relative on a 2M-weight matrix
    return float(sum(float(torch.dot(d.reshape(-1), d.reshape(-1))) for d in dw.values()))


def _logprobs(interp: Interpreter, h: torch.Tensor, opts: RunOptions | None = None) -> torch.Tensor:
    """Next-token log-probabilities ``[s, T-1, V]`` of the last layer's output ``h`` (``opts``: how the
    head runs, e.g. its products' dtype or its weights; None: full precision)."""
    last = layer_outputs(interp.graph)[-1]
    opts = replace(opts or RunOptions(quantize=False), resume={last: h})
    return next_token_logprobs(interp.run(None, opts, outputs=("lm_head",))["lm_head"])

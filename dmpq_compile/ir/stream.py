"""Layer-major execution: every calibration sequence through decoder layer l before layer l + 1.

Running the interpreter over the whole model per batch reads every weight once per batch and
holds all layers' activations; here each layer runs once over all sequences, resuming from the
previous layer's residual stream, so a weight is read once per pass and memory holds one
layer's activations plus the residual stream ``[S, T, H]``. Passes that need per-layer values
(routing, MoE inputs) observe them as the layer runs.

Node ids follow the frontend: ``embed`` -> ``L{i}.moe_res`` (layer i's output) -> ``final_norm``
-> ``lm_head``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import networkx as nx
import torch

from .graph import Graph, layer_node
from .interpreter import Interpreter, RunOptions


def layer_outputs(graph: Graph) -> list[str]:
    """Node ids of each decoder layer's output, in order (``L0.moe_res`` ...)."""
    n = int(graph.meta["num_layers"])
    ids = [layer_node(i, "moe_res") for i in range(n)]
    missing = [i for i in ids if i not in graph.g]
    if missing:
        raise ValueError(f"the graph has no layer outputs {missing[:3]}: layer-major execution needs the "
                         "frontend's node naming (embed, L{i}.moe_res, final_norm, lm_head)")
    return ids


def layer_input(graph: Graph, layer: int) -> str:
    """The node whose value enters decoder layer ``layer`` (``embed`` or the previous layer's output)."""
    return "embed" if layer == 0 else layer_node(layer - 1, "moe_res")


def layer_nodes(graph: Graph) -> list[set[str]]:
    """The nodes each decoder layer runs (what :func:`run_layer` executes), in layer order.

    Layer ``l``'s are its output's ancestors that are not upstream of its input; the embedding,
    the final norm and the LM head belong to no layer.
    """
    seen = nx.ancestors(graph.g, "embed") | {"embed"}
    out = []
    for node in layer_outputs(graph):
        nodes = (nx.ancestors(graph.g, node) | {node}) - seen
        seen |= nodes
        out.append(nodes)
    return out


def embed(interp: Interpreter, ids: torch.Tensor, opts: RunOptions) -> torch.Tensor:
    return interp.run(ids, opts, outputs=("embed",))["embed"]


def run_layer(interp: Interpreter, layer: int, h: torch.Tensor, opts: RunOptions) -> torch.Tensor:
    """Layer ``layer``'s output for the residual stream ``h`` entering it."""
    out = layer_node(layer, "moe_res")
    return interp.run(None, replace(opts, resume={layer_input(interp.graph, layer): h}), outputs=(out,))[out]


def run_layers(interp: Interpreter, ids: torch.Tensor, opts: RunOptions,
               after_layer: Callable[[int, torch.Tensor], None] | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run all decoder layers layer-major; returns the last layer's output ``[S, T, H]``.

    ``after_layer(l, h)`` sees each layer's output; ``opts.observer`` sees every node value.
    """
    h = embed(interp, ids, opts)
    for layer in range(len(layer_outputs(interp.graph))):
        h = run_layer(interp, layer, h, opts)
        if after_layer is not None:
            after_layer(layer, h)
        if progress is not None:
            progress(layer)
    return h


def head_chunks(interp: Interpreter, h: torch.Tensor, opts: RunOptions,
                sequences: int = 4) -> Iterator[tuple[slice, torch.Tensor]]:
    """Logits ``[s, T, V]`` of the last layer's output ``h``, ``sequences`` rows at a time
    (the vocabulary projection is the largest activation; chunks bound it)."""
    last = layer_outputs(interp.graph)[-1]
    for start in range(0, len(h), sequences):
        sl = slice(start, start + sequences)
        yield sl, interp.run(None, replace(opts, resume={last: h[sl]}), outputs=("lm_head",))["lm_head"]

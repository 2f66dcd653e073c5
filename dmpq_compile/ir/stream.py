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

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

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
               progress: Callable[[int], None] | None = None,
               before_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run all decoder layers layer-major; returns the last layer's output ``[S, T, H]``.

    ``before_layer(l, h)`` sees the residual stream entering each layer, ``after_layer(l, h)`` each
    layer's output; ``opts.observer`` sees every node value.
    """
    h = embed(interp, ids, opts)
    for layer in range(len(layer_outputs(interp.graph))):
        if before_layer is not None:
            before_layer(layer, h)
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


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, contiguous and owning just its elements: what ``torch.save`` should get (it
    writes a view's whole storage, e.g. every row of the batch a slice came from)."""
    t = t.detach()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


class SpilledBoundaries:
    """The residual stream entering each layer, spilled to a temporary folder (one file a layer)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="dmpq-sens-")

    def put(self, layer: int, h: torch.Tensor) -> None:
        torch.save(owned(h), Path(self._dir.name) / f"{layer}.pt")

    def get(self, layer: int) -> torch.Tensor:
        return torch.load(Path(self._dir.name) / f"{layer}.pt", weights_only=True)

    def close(self) -> None:
        self._dir.cleanup()


class SharedForward:
    """One full-precision calibration forward for two passes.

    A pass that runs the forward over the calibration anyway (``profile``, to count routes) records
    the residual stream entering every layer for the first ``rows`` sequences, spilled to disk
    (``rows x T x H`` floats a layer), and the last layer's output; a later pass that needs exactly
    those values (the ``sensitivity`` pass's local method) takes them instead of running that forward
    again: one forward of the sensitivity sequences less (about 1.1 s a layer at OLMoE-1B-7B's
    widths and 16 x 128 tokens). The pass manager opens one when a pass asks for it
    (:meth:`~dmpq_compile.passes.infra.base.Pass.forward_rows`) and removes what nobody took.

    The recorder runs its sequences as one batch; each row's values do not depend on the other rows
    (every product is per token, attention is within a sequence), and were bitwise equal to a
    forward of the ``rows`` sequences alone on the CPUs measured. The products' dtype
    (``autocast``) must be the one the taker wants, and the taker's ids must be the recorded ones.
    """

    def __init__(self, rows: int, autocast: torch.dtype | None) -> None:
        self.rows, self.autocast = rows, autocast
        self.store: SpilledBoundaries | None = None
        self.h_last: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None

    def recording(self, ids: torch.Tensor, autocast: torch.dtype | None) -> bool:
        """Whether a forward over ``ids`` in ``autocast`` should be recorded (nothing recorded yet,
        the same dtype, enough sequences); if so, starts the recording."""
        if self.store is not None or autocast != self.autocast or len(ids) < self.rows:
            return False
        self.store, self.ids = SpilledBoundaries(), ids[: self.rows].clone()
        return True

    def put(self, layer: int, h: torch.Tensor) -> None:
        assert self.store is not None
        self.store.put(layer, h[: self.rows])

    def finish(self, h_last: torch.Tensor) -> None:
        self.h_last = h_last[: self.rows].clone()

    def take(self, ids: torch.Tensor, autocast: torch.dtype | None) -> tuple[SpilledBoundaries, torch.Tensor] | None:
        """The recorded boundaries and last output for ``ids`` in ``autocast``, handed over (the
        taker closes the store), or None when nothing matching was recorded."""
        if self.h_last is None or autocast != self.autocast or self.ids is None or not torch.equal(ids, self.ids):
            return None
        out = (self.store, self.h_last)
        self.store = self.h_last = self.ids = None
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = self.h_last = self.ids = None

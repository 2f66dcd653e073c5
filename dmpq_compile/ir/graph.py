"""The graph IR: a typed dataflow graph on ``networkx.DiGraph`` in which every expert is a node.

Node attributes (all JSON-serialisable):

* ``kind``: one of :data:`KINDS`.
* ``params``: role -> weight-store key (e.g. ``{"gate": "model.layers.0...w1.weight"}``).
* ``attrs``: static configuration of the op (eps, head counts, layer/expert ids, ...).
* ``ann``: annotations written by passes (``freq``, ``sensitivity``, ``bits``, ...), see
  :mod:`dmpq_compile.ir.annotations`.

Edges carry ``port`` (the input slot of the consumer), so a node's inputs are ordered.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from .weights import WeightStore

# kind -> (required params, number of inputs or None for variadic)
KINDS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "input": ((), 0),
    "embed": (("weight",), 1),
    "norm": (("weight",), 1),
    "attention": (("q", "k", "v", "o"), 1),
    "add": ((), 2),
    "router": (("weight",), 1),
    "expert": (("gate", "up", "down"), 2),  # [hidden, router]
    "shared_expert": (("gate", "up", "down"), 1),
    "mlp": (("gate", "up", "down"), 1),
    "combine": ((), None),  # [router, expert_0 .. expert_{E-1}, (shared_expert)]
    "lm_head": (("weight",), 1),
}

# Kind -> the roles of its weight matrices ``[out, in]`` that may be quantized, group-wise along
# ``in``. Routed experts get their bits from the allocator; the other kinds from the fixed
# non-expert policy (``precision`` pass, ``--nonexpert-bits``). The embedding table ``[vocab,
# hidden]`` is quantized along ``hidden`` like a linear weight, where the target runs quantized
# lookups (``Backend.supported_bits_for("embed")``). Routers, norms and the shared expert's gate
# are kept at full precision on purpose.
QUANT_ROLES: dict[str, tuple[str, ...]] = {
    "expert": ("gate", "up", "down"),
    "shared_expert": ("gate", "up", "down"),
    "mlp": ("gate", "up", "down"),
    "attention": ("q", "k", "v", "o"),
    "lm_head": ("weight",),
    "embed": ("weight",),
}
QUANTIZABLE_KINDS = tuple(QUANT_ROLES)
NONEXPERT_QUANTIZABLE_KINDS = tuple(k for k in QUANT_ROLES if k != "expert")


class IRError(ValueError):
    """The graph is malformed; the message names the node and what is wrong."""


# Node ids: the frontend names every per-layer node ``L{layer}.{role}`` and every routed expert
# ``L{layer}.E{expert}``; passes build ids through these two functions, never by formatting.
LAYER_ROLES = ("attn_norm", "attn", "attn_res", "moe_norm", "router", "mlp", "shared", "combine", "moe_res")


def layer_node(layer: int, role: str) -> str:
    """The id of layer ``layer``'s node ``role`` (one of :data:`LAYER_ROLES`)."""
    if role not in LAYER_ROLES:
        raise IRError(f"unknown layer role {role!r}; roles: {LAYER_ROLES}")
    return f"L{layer}.{role}"


def expert_node(layer: int, expert: int) -> str:
    """The id of routed expert ``expert`` of layer ``layer``."""
    return f"L{layer}.E{expert}"


def layer_role(node_id: str) -> str | None:
    """The role of a per-layer node id (``layer_role(layer_node(3, "router")) == "router"``);
    None for any other id (experts, the embedding, the head)."""
    layer, dot, role = node_id.partition(".")
    if dot and layer[:1] == "L" and layer[1:].isdigit() and role in LAYER_ROLES:
        return role
    return None


@dataclass(frozen=True)
class Node:
    """A read-only view of one node (the graph owns the data)."""

    id: str
    kind: str
    params: Mapping[str, str]
    attrs: Mapping[str, Any]
    ann: Mapping[str, Any]
    inputs: tuple[str, ...]


class Graph:
    """An MoE model as a dataflow graph plus its weight store and model-level metadata."""

    def __init__(self, meta: Mapping[str, Any] | None = None, weights: WeightStore | None = None):
        self.g = nx.DiGraph()
        self._topo: tuple[tuple[int, int], list[str]] | None = None  # see topo_order
        self.meta: dict[str, Any] = dict(meta or {})
        self.weights = weights if weights is not None else WeightStore()
        self._order = 0

    # -- construction -------------------------------------------------------------------------
    def add(self, node_id: str, kind: str, inputs: Iterable[str] = (), params: Mapping[str, str] | None = None,
            **attrs: Any) -> str:
        """Add a node fed by ``inputs`` (in port order) and return its id."""
        if kind not in KINDS:
            raise IRError(f"node {node_id!r}: unknown kind {kind!r}; known kinds: {sorted(KINDS)}")
        if node_id in self.g:
            raise IRError(f"node {node_id!r} already exists")
        self.g.add_node(node_id, kind=kind, params=dict(params or {}), attrs=dict(attrs), ann={},
                        order=self._order)
        self._order += 1
        for port, src in enumerate(inputs):
            if src not in self.g:
                raise IRError(f"node {node_id!r}: input {src!r} does not exist (add producers first)")
            self.g.add_edge(src, node_id, port=port)
        return node_id

    # -- queries ------------------------------------------------------------------------------
    def node(self, node_id: str) -> Node:
        if node_id not in self.g:
            raise KeyError(f"no node {node_id!r} in the graph")
        d = self.g.nodes[node_id]
        return Node(node_id, d["kind"], d["params"], d["attrs"], d["ann"], self.inputs(node_id))

    def inputs(self, node_id: str) -> tuple[str, ...]:
        preds = sorted(self.g.in_edges(node_id, data="port"), key=lambda e: e[2])
        return tuple(src for src, _, _ in preds)

    def nodes(self, kind: str | None = None) -> Iterator[Node]:
        """Nodes in execution order (a deterministic topological order), optionally of one kind."""
        for node_id in self.topo_order():
            if kind is None or self.g.nodes[node_id]["kind"] == kind:
                yield self.node(node_id)

    def experts(self) -> list[Node]:
        return list(self.nodes("expert"))

    def experts_by_layer(self) -> dict[int, list[Node]]:
        """The routed experts grouped by layer, each group in execution order, from one walk of the
        graph (a per-layer ``[n for n in experts() if ...]`` is quadratic in the layer count)."""
        out: dict[int, list[Node]] = {}
        for n in self.experts():
            out.setdefault(n.attrs["layer"], []).append(n)
        return out

    def consumers(self, node_id: str, kind: str | None = None) -> list[Node]:
        """Nodes that take ``node_id``'s output (optionally of one kind), in execution order."""
        order = self.g.nodes
        ids = sorted(set(self.g.successors(node_id)), key=lambda n: order[n]["order"])
        return [self.node(n) for n in ids if kind is None or order[n]["kind"] == kind]

    def topo_order(self) -> list[str]:
        """Execution order, cached until nodes or edges are added or removed (passes query it per
        node: recomputing it each time made whole-graph queries quadratic in the expert count)."""
        key = (self.g.number_of_nodes(), self.g.number_of_edges())
        if self._topo is None or self._topo[0] != key:
            self._topo = (key, list(nx.lexicographical_topological_sort(self.g, key=lambda n: self.g.nodes[n]["order"])))
        return list(self._topo[1])

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    # -- annotations --------------------------------------------------------------------------
    def annotate(self, node_id: str, key: str, value: Any) -> None:
        """Set annotation ``key`` on a node (validated against the annotation schema)."""
        from .annotations import check_annotation

        check_annotation(node_id, self.g.nodes[node_id]["kind"], key, value)
        self.g.nodes[node_id]["ann"][key] = value

    def annotations(self, key: str, kind: str = "expert") -> dict[str, Any]:
        """``{node_id: value}`` of one annotation over all nodes of a kind that carry it."""
        return {n.id: n.ann[key] for n in self.nodes(kind) if key in n.ann}

    def has_annotation(self, key: str, kind: str = "expert") -> bool:
        nodes = list(self.nodes(kind))
        return bool(nodes) and all(key in n.ann for n in nodes)

    def set_param(self, node_id: str, role: str, key: str) -> None:
        """Point a node's parameter role at another weight key."""
        if key not in self.weights:
            raise IRError(f"node {node_id!r}: weight {key!r} is not in the store")
        self.g.nodes[node_id]["params"][role] = key

    def set_attr(self, node_id: str, name: str, value: Any) -> None:
        self.g.nodes[node_id]["attrs"][name] = value

    # -- copies -------------------------------------------------------------------------------
    def copy(self) -> Graph:
        """A deep copy of structure and annotations; the weight store is copied shallowly."""
        out = Graph(copy.deepcopy(self.meta), self.weights.copy())
        out.g = copy.deepcopy(self.g)
        out._order = self._order
        return out

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for _, d in self.g.nodes(data=True):
            counts[d["kind"]] = counts.get(d["kind"], 0) + 1
        parts = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        return f"Graph({self.meta.get('family', '?')}, {len(self)} nodes: {parts})"

"""Structural validation of the IR with errors that name the node and the fix."""

from __future__ import annotations

import networkx as nx

from .annotations import check_annotation
from .graph import KINDS, Graph, IRError


def validate(graph: Graph) -> None:
    """Raise :class:`IRError` on the first problem found.

    Checks: acyclic; known kinds; input arity; required params present and in the weight store;
    router/expert/combine wiring (each expert reads its layer's router, each combine reads a
    router first); annotations valid for their kind.
    """
    if not nx.is_directed_acyclic_graph(graph.g):
        cycle = nx.find_cycle(graph.g)
        raise IRError(f"the graph has a cycle: {cycle}")
    for node in graph.nodes():
        _check_node(graph, node)


def _check_node(graph: Graph, node) -> None:
    required, arity = KINDS[node.kind]
    if arity is not None and len(node.inputs) != arity:
        raise IRError(f"node {node.id!r} ({node.kind}) has {len(node.inputs)} inputs, expected {arity}")
    for role in required:
        if role not in node.params:
            raise IRError(f"node {node.id!r} ({node.kind}) lacks parameter {role!r}")
    for role, key in node.params.items():
        if key not in graph.weights:
            raise IRError(f"node {node.id!r}: parameter {role!r} refers to missing weight {key!r}")
    kinds = [graph.g.nodes[i]["kind"] for i in node.inputs]
    if node.kind == "expert":
        if kinds[1] != "router":
            raise IRError(f"expert {node.id!r}: input 1 must be a router, got {kinds[1]!r}")
        for attr in ("layer", "expert"):
            if not isinstance(node.attrs.get(attr), int):
                raise IRError(f"expert {node.id!r}: attribute {attr!r} must be an int")
        n_exp = graph.g.nodes[node.inputs[1]]["attrs"]["num_experts"]
        if not 0 <= node.attrs["expert"] < n_exp:
            raise IRError(f"expert {node.id!r}: index {node.attrs['expert']} outside its router's {n_exp}")
    if node.kind == "combine":
        if not kinds or kinds[0] != "router":
            raise IRError(f"combine {node.id!r}: input 0 must be its router")
        bad = [k for k in kinds[1:] if k not in ("expert", "shared_expert")]
        if bad:
            raise IRError(f"combine {node.id!r}: inputs after the router must be experts, got {bad}")
    for key, value in node.ann.items():
        check_annotation(node.id, node.kind, key, value)

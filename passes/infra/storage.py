"""What a target stores for a graph's weights, from shapes: the stored-bits budget's arithmetic.

A backend says how it stores one weight (``Backend.weight_bytes`` for a weight matrix at some
bits, ``Backend.float_bytes`` for what it keeps in float); this module adds that up per node and
per expert. The backend is duck-typed, so passes can use it without importing the backends;
``tests/test_stored_budget.py`` checks the sums against emitted files byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ...ir.graph import QUANT_ROLES, Graph
from ...quant.spec import DEFAULT_GROUP_SIZE


def stored_weight_bytes(graph: Graph, backend: Any, group_size: int | None = None,
                        bits: Mapping[str, int] | None = None) -> dict[str, int]:
    """``{node id: bytes}``: the weights each node owns as ``backend`` stores them, from shapes.

    A weight matrix of :data:`~dmpq_compile.ir.graph.QUANT_ROLES` costs
    ``backend.weight_bytes(N, K, bits, kind=...)`` at the node's bits (``bits[node id]``, else its ``bits``
    annotation, else 16); every other weight ``backend.float_bytes(kind, role)`` per parameter. A
    tensor read by two nodes (a tied ``lm_head``) counts once, for the first node. Nothing is read
    from disk. Graph structure and computed constants are not weights: an emitted file is a little
    larger (``tests/test_stored_budget.py`` bounds the difference).
    """
    gs = int(group_size if group_size is not None else graph.meta.get("group_size", DEFAULT_GROUP_SIZE))
    seen: set[str] = set()
    return {node.id: _node_bytes(graph, backend, node, int((bits or {}).get(node.id, node.ann.get("bits", 16))), gs,
                                 seen) for node in graph.nodes()}


def _node_bytes(graph: Graph, backend: Any, node: Any, bits: int, group_size: int, seen: set[str]) -> int:
    """Bytes of ``node``'s weights at ``bits`` (its matrices; other weights in float), skipping
    and then adding to ``seen`` the tensor keys already counted."""
    matrices = QUANT_ROLES.get(node.kind, ())
    total = 0
    for role, key in node.params.items():
        if key in seen:
            continue
        seen.add(key)
        shape = graph.weights.shape(key)
        if role in matrices:
            total += backend.weight_bytes(int(shape[0]), int(shape[1]), bits, group_size, kind=node.kind)
        else:
            total += math.prod(shape) * backend.float_bytes(node.kind, role)
    return total


def param_count(graph: Graph) -> int:
    """Parameters of every weight the graph's nodes read, a shared (tied) tensor once."""
    return sum(math.prod(graph.weights.shape(k)) for k in {k for n in graph.nodes() for k in n.params.values()})


def node_stored_bytes(graph: Graph, backend: Any, columns: Mapping[str, Mapping[int, int]], group_size: int
                      ) -> dict[str, dict[int, int]]:
    """``{node id: {column: stored bytes}}``: the weights of each node of ``columns`` (``{node id:
    {column: bits}}``) with its matrices stored at the bits of every column (its other weights,
    e.g. biases and q/k norms, in float, the same in every column)."""
    return {node_id: {c: _node_bytes(graph, backend, graph.node(node_id), b, group_size, set()) for c, b in col.items()}
            for node_id, col in columns.items()}

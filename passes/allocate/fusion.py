"""Fused expert dispatch in the cost model: which experts of a layer's bit-width group run fused.

A target with a fused MoE op (ort-cpu: one ``com.microsoft.QMoE`` per layer and bit-width) can run
a layer's experts of one width either one by one (per-expert dispatch: each expert costs
``freq * decode_ms + idle_decode_ms`` per token, the idle part being its conditional, which runs
whether or not a token picks it) or inside one fused op (``group_decode_ms`` per token for the op,
once per layer and width, plus ``freq * fused_decode_ms`` per expert). Per layer and width the
cheaper layout wins; inside a fused group an expert that would cost more fused than alone stays
alone. :func:`fused_subset` is that rule, used by the lowering to lay the graph out and by the
allocator's cost model (:class:`FusionTables`), so the latency the allocator optimises is the
latency of the layout that ships.

A target with one MoE node per layer for *all* its widths (ort-cpu's ``--dispatch kernel``: dmpq's
``ai.dmpq.MixedMoE`` takes every 2/4/8-bit expert of the layer) has no choice to make: every expert
whose width the node takes runs in it, at ``freq * kernel_decode_ms``, and the layer pays the node's
fixed part ``kernel_fixed_decode_ms`` once if it holds any expert; the others (16 bits) run per
expert. :func:`kernel_tables` writes that as the same kind of correction: the additive tables price
an expert in the node at its kernel cost *plus the whole fixed part* (an upper bound, as per-expert
dispatch is for the fused layout), and the node's experts save the fixed part each against one fixed
part for the layer: ``min(0, F - n F) = -(n - 1) F`` for ``n >= 1`` experts in the node, 0 for none.
The node is one group of columns (all the widths it takes) with one fixed part, so the exact DP's
sets of fused widths become "node used or not".

Sizes: per layer and width, O(experts) work; the tables are ``experts x bits`` plus ``layers x
bits`` (``layers x 1`` for the kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def fused_subset(freq: Sequence[float], decode: Sequence[float], idle: Sequence[float],
                 fused: Sequence[float], group: float) -> tuple[np.ndarray, float, float]:
    """Which experts of one layer's bit-width group run fused, and the group's cost both ways.

    Args:
        freq: Fraction of tokens routed to each expert.
        decode: Each expert's routed cost under per-expert dispatch (ms).
        idle: Each expert's per-token cost of per-expert dispatch when not routed (ms).
        fused: Each expert's routed cost inside the fused op (ms).
        group: The fused op's per-token fixed part (ms).

    Returns:
        ``(mask, per_expert_ms, chosen_ms)``: which experts join the fused op (all False when the
        group runs per expert), the per-token cost with every expert alone, and the cost of the
        chosen layout (``<= per_expert_ms``). Ties go to the fused op (fewer graph nodes).
    """
    f, d, i, u = (np.asarray(a, dtype=np.float64) for a in (freq, decode, idle, fused))
    alone = f * d + i
    inside = f * u
    mask = inside <= alone
    per_expert = float(alone.sum())
    with_op = float(group + inside[mask].sum() + alone[~mask].sum())
    if mask.any() and with_op <= per_expert:
        return mask, per_expert, with_op
    return np.zeros(len(f), dtype=bool), per_expert, per_expert


@dataclass(frozen=True)
class FusionTables:
    """The fused-dispatch correction of an allocation problem's latency (see the module docstring).

    The additive tables (:class:`~.problem.ProblemTables`) price every expert under per-expert
    dispatch (the kernel: in its node, fixed part included); an allocation's true cost is that plus,
    for every layer and op group, ``min(0, fixed - sum of the savings of the group's experts)``.
    ``saving`` (experts x bits, >= 0) is what an expert saves inside the op and ``fixed`` (layers x
    groups) the op's fixed part, both in objective units (``*_obj``) and in budget units (``*_use``,
    zero unless the budget is latency). ``layer`` maps each expert row to a row of ``fixed`` (-1: never
    fused); ``group`` each column (bit-width) to the op that runs it (-1: none), None for one op per
    width (the fused dispatch: group ``j`` is column ``j``).
    """

    layer: np.ndarray
    saving_obj: np.ndarray
    fixed_obj: np.ndarray
    saving_use: np.ndarray
    fixed_use: np.ndarray
    group: np.ndarray | None = None

    @property
    def layers(self) -> int:
        return int(self.fixed_obj.shape[0])

    def column_group(self) -> np.ndarray:
        """The op group of each column (-1: none)."""
        return np.arange(self.saving_obj.shape[1]) if self.group is None else self.group

    def correction(self, idx: np.ndarray, usage: bool = False) -> float:
        """The (<= 0) change the op groups make to the objective (or, with ``usage``, to the budget use)."""
        saving, fixed = (self.saving_use, self.fixed_use) if usage else (self.saving_obj, self.fixed_obj)
        rows = np.arange(len(idx))
        g = self.column_group()[idx]
        ok = (self.layer >= 0) & (g >= 0)
        total = np.zeros(fixed.shape)
        np.add.at(total, (self.layer[ok], g[ok]), saving[rows[ok], idx[ok]])
        return float(np.minimum(0.0, fixed - total).sum())

    def fusable_groups(self) -> list[int]:
        """Op groups some layer can use (a saving or a fixed part somewhere)."""
        cols = self.column_group()
        out = []
        for g in range(self.fixed_obj.shape[1]):
            js = cols == g
            if self.fixed_obj[:, g].any() or self.fixed_use[:, g].any() or self.saving_obj[:, js].any() \
                    or self.saving_use[:, js].any():
                out.append(g)
        return out

    def masks(self) -> list[tuple[int, ...]]:
        """Every set of usable op groups (``2^f`` of them), the empty set first."""
        groups = self.fusable_groups()
        return [tuple(g for k, g in enumerate(groups) if m >> k & 1) for m in range(1 << len(groups))]

    def mask_columns(self, mask: tuple[int, ...]) -> list[int]:
        """The columns the op groups of ``mask`` run."""
        cols = self.column_group()
        return [j for j in range(len(cols)) if cols[j] in mask]

    def mask_fixed(self, layer: int, mask: tuple[int, ...], usage: bool = False) -> float:
        """The fixed parts ``layer`` pays with the op groups of ``mask`` in use."""
        fixed = self.fixed_use if usage else self.fixed_obj
        return float(sum(fixed[layer, g] for g in mask))

    def least_use(self, usage: np.ndarray) -> float:
        """The smallest budget use (less the fixed part) of any allocation, given the per-expert ``usage``:
        rows that never fuse at their cheapest column, each fusing layer at its best set of op groups."""
        free = self.layer < 0
        total = float(usage[free].min(axis=1).sum()) if free.any() else 0.0
        for layer in range(self.layers):
            rows = self.layer == layer
            best = np.inf
            for mask in self.masks():
                u = usage[rows].copy()
                for j in self.mask_columns(mask):
                    u[:, j] -= self.saving_use[rows, j]
                best = min(best, float(u.min(axis=1).sum() + self.mask_fixed(layer, mask, usage=True)))
            total += best
        return total


def _layer_rows(layer_of: Sequence[int], can: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The layers where some expert can join a fused node (sorted), and each expert's row among them (-1:
    none of its widths can)."""
    joins = can.any(axis=1)
    layers = sorted({int(v) for v, c in zip(layer_of, joins) if c})
    row = {v: r for r, v in enumerate(layers)}
    return layers, np.array([row.get(int(v), -1) if c else -1 for v, c in zip(layer_of, joins)], dtype=np.int64)


def fusion_tables(layer_of: Sequence[int], freq: np.ndarray, decode: np.ndarray, idle: np.ndarray,
                  fused: np.ndarray, group: np.ndarray, obj_scale: float, use_scale: float) -> FusionTables | None:
    """Build :class:`FusionTables` from per-expert x per-bits cost matrices (``fused`` NaN where
    a width cannot fuse); None when nothing can fuse.

    ``group`` is each expert's view of its layer's fixed part at each width; a layer takes the
    largest of its experts' (they share a shape in practice). ``obj_scale`` / ``use_scale`` turn
    milliseconds into objective and budget units.
    """
    can = ~np.isnan(fused)
    if not can.any():
        return None
    layers, layer = _layer_rows(layer_of, can)
    saving = np.where(can, np.maximum(0.0, freq[:, None] * (decode - np.nan_to_num(fused)) + idle), 0.0)
    fixed = np.zeros((len(layers), fused.shape[1]))
    ok = layer >= 0
    np.maximum.at(fixed, layer[ok], np.where(can[ok], group[ok], 0.0))
    return FusionTables(layer, saving * obj_scale, fixed * obj_scale, saving * use_scale, fixed * use_scale)


def kernel_fixed(layer_of: Sequence[int], kernel: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Each expert row's view of its layer's kernel node fixed part: the largest measured at any of the
    layer's (expert, width) cells the node takes (``kernel`` not NaN), 0 for a layer with none (they share a
    shape in practice; the largest keeps the additive price an upper bound)."""
    can = ~np.isnan(kernel)
    layer_of = np.asarray(layer_of)
    per_layer: dict[int, float] = {}
    for v, ok, f in zip(layer_of, can, fixed):
        if ok.any():
            per_layer[int(v)] = max(per_layer.get(int(v), 0.0), float(f[ok].max()))
    return np.array([per_layer.get(int(v), 0.0) for v in layer_of])


def kernel_tables(layer_of: Sequence[int], kernel: np.ndarray, fixed_row: np.ndarray, obj_scale: float,
                  use_scale: float) -> FusionTables | None:
    """:class:`FusionTables` of the kernel dispatch (module docstring): ``kernel`` (experts x bits) is NaN
    where an expert at that width does not join the layer's node, ``fixed_row`` each row's view of its
    layer's fixed part (:func:`kernel_fixed`); the additive tables must price a joining cell at its kernel
    cost plus that fixed part. One op group (every column some expert joins at); None when none joins."""
    can = ~np.isnan(kernel)
    if not can.any():
        return None
    layers, layer = _layer_rows(layer_of, can)
    saving = np.where(can, fixed_row[:, None], 0.0)
    fixed = np.zeros((len(layers), 1))
    ok = layer >= 0
    np.maximum.at(fixed[:, 0], layer[ok], fixed_row[ok])
    group = np.where(can.any(axis=0), 0, -1).astype(np.int64)
    return FusionTables(layer, saving * obj_scale, fixed * obj_scale, saving * use_scale, fixed * use_scale, group)

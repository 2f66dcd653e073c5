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

Sizes: per layer and width, O(experts) work; the tables are ``experts x bits`` plus ``layers x
bits``.
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
    dispatch; an allocation's true cost is that plus, for every layer and width group, ``min(0,
    fixed - sum of the savings of the group's experts)``. ``saving`` (experts x bits, >= 0) is what
    an expert saves inside the fused op and ``fixed`` (layers x bits) the op's fixed part, both in
    objective units (``*_obj``) and in budget units (``*_use``, zero unless the budget is latency).
    ``layer`` maps each expert row to a row of ``fixed`` (-1: never fused).
    """

    layer: np.ndarray
    saving_obj: np.ndarray
    fixed_obj: np.ndarray
    saving_use: np.ndarray
    fixed_use: np.ndarray

    @property
    def layers(self) -> int:
        return int(self.fixed_obj.shape[0])

    def correction(self, idx: np.ndarray, usage: bool = False) -> float:
        """The (<= 0) change fused groups make to the objective (or, with ``usage``, to the budget use)."""
        saving, fixed = (self.saving_use, self.fixed_use) if usage else (self.saving_obj, self.fixed_obj)
        rows = np.arange(len(idx))
        ok = self.layer >= 0
        total = np.zeros(fixed.shape)
        np.add.at(total, (self.layer[ok], idx[ok]), saving[rows[ok], idx[ok]])
        return float(np.minimum(0.0, fixed - total).sum())

    def fusable_columns(self) -> list[int]:
        """Columns where some layer can fuse (a saving or a fixed part somewhere)."""
        return [j for j in range(self.fixed_obj.shape[1])
                if self.fixed_obj[:, j].any() or self.saving_obj[:, j].any()
                or self.fixed_use[:, j].any() or self.saving_use[:, j].any()]

    def masks(self) -> list[tuple[int, ...]]:
        """Every set of fusable columns (``2^f`` of them), the empty set first."""
        cols = self.fusable_columns()
        return [tuple(j for k, j in enumerate(cols) if m >> k & 1) for m in range(1 << len(cols))]

    def least_use(self, usage: np.ndarray) -> float:
        """The smallest budget use (less the fixed part) of any allocation, given the per-expert ``usage``:
        rows that never fuse at their cheapest column, each fusing layer at its best set of fused widths."""
        free = self.layer < 0
        total = float(usage[free].min(axis=1).sum()) if free.any() else 0.0
        for layer in range(self.layers):
            rows = self.layer == layer
            best = np.inf
            for mask in self.masks():
                u = usage[rows].copy()
                for j in mask:
                    u[:, j] -= self.saving_use[rows, j]
                best = min(best, float(u.min(axis=1).sum() + sum(self.fixed_use[layer, j] for j in mask)))
            total += best
        return total


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
    layers = sorted({int(v) for v, c in zip(layer_of, can.any(axis=1)) if c})
    row = {v: r for r, v in enumerate(layers)}
    layer = np.array([row.get(int(v), -1) if c else -1 for v, c in zip(layer_of, can.any(axis=1))], dtype=np.int64)
    saving = np.where(can, np.maximum(0.0, freq[:, None] * (decode - np.nan_to_num(fused)) + idle), 0.0)
    fixed = np.zeros((len(layers), fused.shape[1]))
    ok = layer >= 0
    np.maximum.at(fixed, layer[ok], np.where(can[ok], group[ok], 0.0))
    return FusionTables(layer, saving * obj_scale, fixed * obj_scale, saving * use_scale, fixed * use_scale)

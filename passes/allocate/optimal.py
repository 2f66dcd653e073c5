"""Exact optimum of the allocation objective (a multiple-choice knapsack), exact at real sizes.

Minimise ``sum_i objective_i[b_i]`` (with the default weights: ``sum_i sensitivity_i[b_i]``)
subject to the budget. Each item (a routed expert or, with ``--nonexpert-bits auto``, a
non-expert node) is a class with one option per bit-width, and exactly one option is taken from
every class. Every item's usage is split into its cheapest option (always paid) plus an *extra*
``>= 0`` per bit-width, against the extra budget ``capacity - sum_i cheapest_i``.

Why not a plain DP over the budget. A DP over integer budget cells is exact only on a grid of the
gcd of all extras. With equally sized experts that gcd is large, but one non-expert item of an odd
size (attention, embedding) wrecks it: the 16-layer OLMoE-1B-7B shape (1024 experts + 18 non-expert
items, stored bits) needed 1.9e6 cells x 1042 rows of choices (2 GB) in a real compile's log. The solver therefore
works on exact usages and only over the items the LP bound cannot exclude:

1. **Relaxation** (:func:`_relax`). The Lagrangian dual ``L(lam) = sum_i min_j (obj_ij + lam *
   extra_ij) - lam * cap`` is a lower bound on the optimum for every ``lam >= 0``; its maximum (the
   LP relaxation's value) is at one of the slopes between two options of a class, found by bisection
   over them. The least-use minimiser at that ``lam`` fits the budget; the greedy upgrade phase of
   :mod:`.projection` spends what it leaves, giving an *incumbent* (upper bound).
2. **Core.** Any allocation ``x`` that fits satisfies ``objective(x) >= L(lam) + sum_i rc_i(x_i)``,
   where ``rc_ij = obj_ij + lam * extra_ij - min_k (...) >= 0`` is the reduced cost. So an option
   with ``rc > incumbent - L(lam)`` (the *gap*) is in no allocation better than the incumbent, and a
   class left with one option is fixed. What remains is the core: classes whose choice lies near
   the multiplier (typically a few percent of them, a few options each).
3. **Exact DP over the core** (:func:`_core_dp`): a Pareto-list DP on exact ``(use, objective)``
   pairs (no grid, so odd sizes and real-valued latency budgets cost nothing extra). After each
   class, states beaten on both use and objective by another are dropped (dominance), as are
   states whose reduced costs already exceed the gap (bound) or that cannot fit even with the
   cheapest options of the classes still to come. Equally sized experts collapse onto few distinct
   uses, which is what keeps the lists short: at the OLMoE, Qwen3-30B-A3B and DeepSeek-V3 shapes the
   longest list had 8-183 states, about 1,500 with fused dispatch (``benchmarks/bench_exact_alloc.py``).

Time and memory. With ``n`` items and ``m`` widths, step 1 is O(n m^2 log(n m)) time and O(n m^2)
memory; step 3 is O(sum over core classes of list x options) time and keeps one (parent, option)
pair per state for the backtrack (5-6 bytes). The budget enters only through how many classes are
near the multiplier, not through a cell count. The lists are capped at ``max_states`` each (and 40
times that together): where they would outgrow it (adversarial problems: many classes of unequal
sizes with near-equal reduced costs, e.g. an objective proportional to use, a subset-sum), the solver
falls back to the grid DP below and reports ``exact=False`` with ``lower_bound = L(lam)``: the proven
gap, which it logs.

Fused dispatch (:mod:`.fusion`: a latency term or budget on a target that fuses a layer's experts of
one width) is not additive: a layer pays each fused width's fixed part once. Its true cost is the least,
over the layer's sets of fused widths (``2^f`` for ``f`` fusable widths), of an additive cost with that
set's fixed parts and fused prices (the stages of :func:`_fused_dp`). :func:`_fused_core` runs the same
three steps with the set as one more choice per layer: the dual ``L(lam)`` splits into one minimum per
free row and one per layer (over sets, then rows); it is concave, and a doubling then ternary search
finds its multiplier; the incumbent is the minimiser at a multiplier raised until it fits, or the
projection of it on the additive tables (which bound the true use from above); a set whose stage value
exceeds the layer's best by more than the gap is excluded, as are rows' options; and the DP runs every
admissible set of a layer from the same list, then keeps the Pareto front of their union. Time: the
additive case's, times ``2^f`` per layer; the search evaluates ``L`` about 150 times, each
O(2^f n m).

Grid DP (the fallback). The DP runs over the extra budget on a grid of cell size ``g``, each extra
rounded **up** to whole cells, so any DP solution is feasible on the exact values. Integral budgets
(``bits``, ``bytes``, ``stored-bits``): ``g`` is the gcd of all extras, exact if the budget spans at
most ``max_cells`` cells; otherwise, and for latency budgets, ``g`` is the extra budget over
``max_cells`` / ``latency_cells``, and the result (additive: polished on exact values by the local
search of :mod:`.projection`, the best of it and the incumbent kept) is feasible but not proven
optimal: ``Solution.lower_bound`` then carries the Lagrangian bound, and the gap is logged.

``Solution.exact`` says whether the allocation is proven optimal (up to float rounding, 1e-9
relative); ``Solution.lower_bound`` is a proven lower bound on the optimum (the objective itself
when exact).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .problem import (
    FEASIBILITY_RTOL,
    Allocation,
    AllocationProblem,
    ProblemTables,
    build_tables,
    check_feasible,
    fits,
)
from .projection import project_indices, refine_indices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Solution:
    """Result of :func:`solve`: the allocation, its objective and whether it is provably optimal."""

    allocation: Allocation
    objective: float
    exact: bool
    grid: float  # DP cell size; 0 for the core DP (exact uses)
    cells: int  # DP grid cells; for the core DP the longest Pareto list
    lower_bound: float = -math.inf  # proven lower bound on the optimum (== objective when exact)

    @property
    def gap(self) -> float:
        """Proven optimality gap: objective less the lower bound (0 when exact)."""
        return self.objective - self.lower_bound



@dataclass(frozen=True)
class _Relaxation:
    """The Lagrangian relaxation at its best multiplier, and the feasible allocation it rounds to."""

    lam: float
    bound: float  # lower bound on the optimum's objective
    reduced: np.ndarray  # reduced cost of every item at ``lam`` (>= 0; 0 at each class's minimiser)
    idx: np.ndarray  # each class's least-use minimiser at ``lam`` (fits, up to rounding at the kink)


def _relax(extra: np.ndarray, obj: np.ndarray, cap: float) -> _Relaxation:
    """Maximise the Lagrangian dual ``L(lam) = sum_i min_j (obj_ij + lam * extra_ij) - lam * cap`` over
    ``lam >= 0``, i.e. solve the LP relaxation of the multiple-choice knapsack.

    ``L`` is concave and piecewise linear; its kinks are among the slopes ``-d obj / d extra`` between
    two items of a class (at most ``m (m - 1) / 2`` per class). The maximiser is the least kink whose
    least-use minimiser fits (then the next smaller kink's minimiser does not), found by bisection over
    the sorted kinks: O(n m^2 log(n m)) time, O(n m^2) memory. Every ``lam >= 0`` gives a valid bound.
    """
    n, m = extra.shape
    slopes = [np.zeros(1)]
    for a in range(m):
        for b in range(m):
            dw, dv = extra[:, b] - extra[:, a], obj[:, a] - obj[:, b]
            ok = (dw > 0) & (dv > 0)
            with np.errstate(over="ignore"):
                slopes.append(dv[ok] / dw[ok])
    kinks = np.unique(np.concatenate(slopes))
    kinks = kinks[np.isfinite(kinks)]
    rows = np.arange(n)

    def at(lam: float) -> tuple[np.ndarray, np.ndarray, float]:
        vals = obj + lam * extra
        low = vals.min(axis=1)
        tie = vals <= low[:, None] + 1e-12 * np.maximum(1.0, np.abs(low))[:, None]
        idx = np.where(tie, extra, np.inf).argmin(axis=1)  # least use among the (near-)minimisers
        return vals - low[:, None], idx, float(extra[rows, idx].sum())

    lo, hi = 0, len(kinks) - 1  # the least kink whose minimiser fits (the largest one always does)
    while lo < hi:
        mid = (lo + hi) // 2
        if at(float(kinks[mid]))[2] <= cap:
            hi = mid
        else:
            lo = mid + 1
    _, idx, _ = at(float(kinks[lo]))
    best = None
    for k in sorted({max(lo - 1, 0), lo}):
        lam = float(kinks[k])
        vals = obj + lam * extra
        bound = float(vals.min(axis=1).sum() - lam * cap)
        if best is None or bound > best[1]:
            best = (lam, bound, vals - vals.min(axis=1)[:, None])
    return _Relaxation(best[0], best[1], best[2], idx)


def _core_dp(extra: np.ndarray, obj: np.ndarray, cap: float, rel: _Relaxation, incumbent: float,
             max_states: int) -> tuple[np.ndarray | None, int]:
    """Exact optimum over the items the bound cannot exclude (module docstring, "Core").

    Returns the allocation (None if a Pareto list outgrew ``max_states``, or all lists together ``40 *
    max_states``) and the largest list.
    """
    n, m = extra.shape
    gap = max(incumbent - rel.bound, 0.0)  # >= 0 but for rounding
    tol = 1e-9 * (abs(incumbent) + abs(rel.bound)) + 1e-12
    keep = (rel.reduced <= gap + tol) & np.isfinite(obj)  # each class keeps its minimiser (reduced cost 0)
    core = np.flatnonzero(keep.sum(axis=1) > 1)
    idx = keep.argmax(axis=1)  # the one option left to a fixed class
    fixed = np.setdiff1d(np.arange(n), core)
    w0 = float(extra[fixed, idx[fixed]].sum())
    v0 = float(obj[fixed, idx[fixed]].sum())
    # the least use the classes after each core class can still add (an infeasibility prune)
    least = np.where(keep[core], extra[core], np.inf).min(axis=1)
    after = np.concatenate([np.cumsum(least[::-1])[::-1][1:], [0.0]])
    w, v, r = np.array([w0]), np.array([v0]), np.zeros(1)
    trail, largest, kept = [], 1, 0
    for k, i in enumerate(core):
        cols = np.flatnonzero(keep[i])
        cw = (w[:, None] + extra[i, cols]).ravel()
        cv = (v[:, None] + obj[i, cols]).ravel()
        cr = (r[:, None] + rel.reduced[i, cols]).ravel()
        parent = np.repeat(np.arange(len(w)), len(cols))
        col = np.tile(cols, len(w))
        ok = (cw + after[k] <= cap) & (cr <= gap + tol)
        cw, cv, cr, parent, col = cw[ok], cv[ok], cr[ok], parent[ok], col[ok]
        order = np.lexsort((cv, cw))  # by use, then objective: keep each state no other beats on both
        cw, cv, cr, parent, col = cw[order], cv[order], cr[order], parent[order], col[order]
        front = np.ones(len(cv), dtype=bool)
        front[1:] = cv[1:] < np.minimum.accumulate(cv)[:-1]
        w, v, r = cw[front], cv[front], cr[front]
        trail.append((parent[front].astype(np.int32), col[front].astype(np.int8 if m < 128 else np.int16)))
        largest, kept = max(largest, len(w)), kept + len(w)
        if len(w) > max_states or kept > 40 * max_states:
            return None, largest
    if len(w) == 0:
        raise RuntimeError("internal error: the core DP lost every allocation of a feasible problem; please "
                           "report this with the problem")
    s = int(np.argmin(v))
    for k in range(len(core) - 1, -1, -1):
        parent, col = trail[k]
        idx[core[k]] = int(col[s])
        s = int(parent[s])
    return idx, largest


def _grid(extra: np.ndarray, cap_extra: float, integral: bool, max_cells: int,
          latency_cells: int) -> tuple[float, bool]:
    """Cell size and whether the grid is exact (all extras integral multiples of it)."""
    if integral:
        ints = np.rint(extra).astype(np.int64).ravel()
        g = int(np.gcd.reduce(ints[ints > 0])) if (ints > 0).any() else 1
        if cap_extra / g <= max_cells:
            return float(g), True
        logger.info("exact DP grid would need %.3g cells (> max_cells=%d): using a coarse grid",
                    cap_extra / g, max_cells)
        return cap_extra / max_cells, False
    return (cap_extra / latency_cells if cap_extra > 0 else 1.0), False


def _dp(q: np.ndarray, v: np.ndarray, cells: int) -> np.ndarray:
    """Multiple-choice knapsack DP; returns the chosen column per expert.

    ``dp[c]`` is the least objective of the experts so far using at most ``c`` cells. Ties go
    to the lower column (fewer bits) for determinism.
    """
    _, choice = _dp_rows(q, v, np.zeros(cells + 1))
    idx, _ = _backtrack(q, choice, cells)
    return idx


def _dp_rows(q: np.ndarray, v: np.ndarray, dp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extend the DP vector ``dp`` (``cells + 1`` entries) by the rows of ``q`` / ``v``; returns the new
    vector and the chosen column per row and cell. O(rows x columns x cells) time."""
    n, m = q.shape
    cells = len(dp) - 1
    choice = np.zeros((n, cells + 1), dtype=np.int8 if m < 128 else np.int16)
    for i in range(n):
        new = np.full(cells + 1, np.inf)
        arg = choice[i]
        for j in range(m):
            qj = int(q[i, j])
            if qj > cells or not np.isfinite(v[i, j]):
                continue
            cand = np.full(cells + 1, np.inf)
            cand[qj:] = dp[: cells + 1 - qj] + v[i, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
    return dp, choice


def _backtrack(q: np.ndarray, choice: np.ndarray, c: int) -> tuple[np.ndarray, int]:
    """Columns of the rows of ``choice`` ending at cell ``c``, and the cell before the first row."""
    n = len(choice)
    idx = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        idx[i] = int(choice[i, c])
        c -= int(q[i, idx[i]])
    return idx, c


def _fused_dp(t: ProblemTables, extra_raw: np.ndarray, g: float, exact: bool, cells: int) -> np.ndarray:
    """The DP with fused-dispatch groups (:mod:`.fusion`): exact for the true cost, not the additive bound.

    Rows that never fuse go first, as in :func:`_dp`. Then each layer with fusable experts is one
    stage: for every set ``M`` of widths that run fused there (``2^f`` sets for ``f`` fusable widths),
    the layer's experts at a width in ``M`` take their fused objective and use (less their saving),
    and the stage pays ``M``'s fixed parts; the stage keeps, per cell, the best ``M``. Since fixed
    parts are >= 0, a set with a width whose group saves less than its fixed part never beats the
    same set without it, so the stage's value is the true ``min(0, fixed - savings)`` cost. Time:
    ``2^f + 1`` times the plain DP over the layer's rows; memory: one DP vector per layer plus one
    layer's choices.
    """
    fz = t.fusion
    rows = np.arange(len(fz.layer))
    masks = fz.masks()

    def cells_of(raw: np.ndarray) -> np.ndarray:
        return np.ceil(raw / g - (1e-9 if exact else 0.0)).astype(np.int64)

    def stage(members: np.ndarray, layer: int, mask: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int, float]:
        v = t.objective[members].copy()
        raw = extra_raw[members].copy()
        for j in fz.mask_columns(mask):
            v[:, j] -= fz.saving_obj[members, j]
            raw[:, j] -= fz.saving_use[members, j] * t.usage_scale
        fixed_q = int(cells_of(np.array([fz.mask_fixed(layer, mask, usage=True) * t.usage_scale]))[0])
        return cells_of(np.maximum(raw, 0.0)), v, fixed_q, fz.mask_fixed(layer, mask)

    free = rows[fz.layer < 0]
    q_free = cells_of(extra_raw[free])
    dp, free_choice = _dp_rows(q_free, t.objective[free], np.zeros(cells + 1))
    stages = []
    for layer in range(fz.layers):
        members = rows[fz.layer == layer]
        best, best_mask = np.full(cells + 1, np.inf), np.zeros(cells + 1, dtype=np.int64)
        for k, mask in enumerate(masks):
            q, v, fixed_q, fixed_v = stage(members, layer, mask)
            h, _ = _dp_rows(q, v, dp)
            cand = np.full(cells + 1, np.inf)
            if fixed_q <= cells:
                cand[fixed_q:] = h[: cells + 1 - fixed_q] + fixed_v
            better = cand < best
            best[better], best_mask[better] = cand[better], k
        stages.append((members, dp, best_mask))
        dp = best
    if not np.isfinite(dp[cells]):
        raise RuntimeError("internal error: the fused-dispatch DP found no feasible allocation for a feasible "
                           "budget; please report this with the problem")
    idx = np.zeros(len(rows), dtype=np.int64)
    c = cells
    for layer in range(fz.layers - 1, -1, -1):
        members, before, best_mask = stages[layer]
        mask = masks[int(best_mask[c])]
        q, v, fixed_q, _ = stage(members, layer, mask)
        _, choice = _dp_rows(q, v, before)
        idx[members], c = _backtrack(q, choice, c - fixed_q)
    idx[free], _ = _backtrack(q_free, free_choice, c)
    return idx


def _front(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indices of the states no other beats on both use and objective, by increasing use."""
    order = np.lexsort((v, w))
    vs = v[order]
    keep = np.ones(len(vs), dtype=bool)
    keep[1:] = vs[1:] < np.minimum.accumulate(vs)[:-1]
    return order[keep]


def _step(w: np.ndarray, v: np.ndarray, r: np.ndarray, ew: np.ndarray, ev: np.ndarray, er: np.ndarray,
          room: float, rmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One class of the core DP: every state with every option, kept if its use fits ``room`` and its reduced
    costs ``rmax``, then pruned to the Pareto front. Returns the new states, their parents and options."""
    k = len(ew)
    cw, cv, cr = (w[:, None] + ew).ravel(), (v[:, None] + ev).ravel(), (r[:, None] + er).ravel()
    parent, opt = np.repeat(np.arange(len(w)), k), np.tile(np.arange(k), len(w))
    ok = np.flatnonzero((cw <= room) & (cr <= rmax))
    keep = ok[_front(cw[ok], cv[ok])]
    return cw[keep], cv[keep], cr[keep], parent[keep], opt[keep]


class _Overflow(Exception):
    """A Pareto list of the core DP outgrew ``max_states``."""


def _fused_parts(t: ProblemTables, extra: np.ndarray) -> tuple[np.ndarray, list]:
    """The rows that never fuse, and per fusing layer its rows and, per set of fused widths (``fz.masks()``),
    the rows' objective and extra use inside it and the set's fixed objective and use."""
    fz = t.fusion
    layers = []
    for layer in range(fz.layers):
        members = np.flatnonzero(fz.layer == layer)
        opts = []
        for mask in fz.masks():
            v, e = t.objective[members].copy(), extra[members].copy()
            for j in fz.mask_columns(mask):
                v[:, j] -= fz.saving_obj[members, j]
                e[:, j] -= fz.saving_use[members, j] * t.usage_scale
            opts.append((v, e, fz.mask_fixed(layer, mask), fz.mask_fixed(layer, mask, usage=True) * t.usage_scale))
        layers.append((members, opts))
    return np.flatnonzero(fz.layer < 0), layers


def _fused_dual(t: ProblemTables, extra: np.ndarray, free: np.ndarray, layers: list, cap: float,
                lam: float) -> float:
    """``L(lam)``: the least ``objective + lam * (use - cap)`` over allocations and sets of fused widths."""
    total = float((t.objective[free] + lam * extra[free]).min(axis=1).sum()) if len(free) else 0.0
    for _, opts in layers:
        total += min(float((v + lam * e).min(axis=1).sum()) + fv + lam * fe for v, e, fv, fe in opts)
    return total - lam * cap


def _fused_lambda(t: ProblemTables, extra: np.ndarray, free: np.ndarray, layers: list,
                  cap: float) -> tuple[float, float]:
    """The (nearly) best multiplier of the fused dual and its bound: ``L`` is concave, so a doubling
    search for a range, then 100 ternary steps."""
    def dual(lam: float) -> float:
        return _fused_dual(t, extra, free, layers, cap, lam)

    hi = max(float(np.ptp(t.objective)) / max(float(np.ptp(extra)), 1e-300), 1e-300)
    while dual(2 * hi) > dual(hi) and hi < 1e300:
        hi *= 2
    lo, hi = 0.0, 2 * hi
    for _ in range(100):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if dual(a) < dual(b):
            lo = a
        else:
            hi = b
    return max((dual(x), x) for x in (0.0, lo, hi))


def _least_use_argmin(vals: np.ndarray, e: np.ndarray) -> np.ndarray:
    low = vals.min(axis=1)
    tie = vals <= low[:, None] + 1e-12 * np.maximum(1.0, np.abs(low))[:, None]
    return np.where(tie, e, np.inf).argmin(axis=1)


def _fused_minimiser(t: ProblemTables, extra: np.ndarray, free: np.ndarray, layers: list,
                     lam: float) -> np.ndarray:
    """An allocation minimising ``objective + lam * use`` (the least-use one among near-ties)."""
    idx = np.zeros(len(extra), dtype=np.int64)
    idx[free] = _least_use_argmin(t.objective[free] + lam * extra[free], extra[free])
    for members, opts in layers:
        best = min(range(len(opts)), key=lambda k: (float((opts[k][0] + lam * opts[k][1]).min(axis=1).sum())
                                                    + opts[k][2] + lam * opts[k][3]))
        v, e, _, _ = opts[best]
        idx[members] = _least_use_argmin(v + lam * e, e)
    return idx


def _fused_core(t: ProblemTables, extra: np.ndarray, cap: float, max_states: int) -> tuple[np.ndarray | None, int, float]:
    """The core DP with fused dispatch: every layer's sets of fused widths are options of one stage, whose
    Lagrangian reduced cost (the set's stage value less the layer's best) joins its rows' (module docstring).

    Returns the allocation (None where a list outgrew ``max_states`` or no incumbent was found), the longest
    list and the Lagrangian bound.
    """
    free, layers = _fused_parts(t, extra)
    bound, lam = _fused_lambda(t, extra, free, layers, cap)
    # incumbent: the minimiser at a multiplier raised until it fits, or the additive projection of it
    cands = []
    x = _fused_minimiser(t, extra, free, layers, lam)
    with contextlib.suppress(ValueError):
        cands.append(project_indices(t, x))  # the additive use bounds the true one: feasible
    mult = lam
    for _ in range(80):
        if fits(t.used(x), t.capacity):
            cands.append(x)
            break
        mult = mult * 1.25 + 1e-300
        x = _fused_minimiser(t, extra, free, layers, mult)
    if not cands:
        return None, 0, bound
    incumbent = min(t.value(c) for c in cands)
    rmax = max(incumbent - bound, 0.0) + 1e-9 * (abs(incumbent) + abs(bound)) + 1e-12
    vals = t.objective[free] + lam * extra[free]
    rc_free = vals - vals.min(axis=1)[:, None]
    keep_free = [np.flatnonzero(row <= rmax) for row in rc_free]
    stages = []  # per layer: [(set, fixed use, fixed objective, set's reduced cost, options kept per row, rcs)]
    for members, opts in layers:
        s = [float((v + lam * e).min(axis=1).sum()) + fv + lam * fe for v, e, fv, fe in opts]
        sets = []
        for k, (v, e, fv, fe) in enumerate(opts):
            if s[k] - min(s) > rmax:
                continue
            vals_k = v + lam * e
            rc = vals_k - vals_k.min(axis=1)[:, None]
            sets.append((k, fe, fv, s[k] - min(s), [np.flatnonzero(row <= rmax) for row in rc], rc))
        stages.append((members, opts, sets))
    # least use still to come after each free row and each layer (an infeasibility prune)
    layer_least = [min(fe + sum(float(opts[k][1][p, kept].min()) for p, kept in enumerate(keeps))
                       for k, fe, _, _, keeps, _ in sets) for _, opts, sets in stages]
    after_layers = np.concatenate([np.cumsum(layer_least[::-1])[::-1], [0.0]]) if layer_least else np.zeros(1)
    free_least = [float(extra[i, kept].min()) for i, kept in zip(free, keep_free)]
    after_free = np.concatenate([np.cumsum(free_least[::-1])[::-1], [0.0]]) + after_layers[0]
    w, v, r = np.zeros(1), np.zeros(1), np.zeros(1)
    largest, total = 1, 0

    def count(n: int) -> None:
        nonlocal largest, total
        largest, total = max(largest, n), total + n
        if n > max_states or total > 40 * max_states:
            raise _Overflow

    free_trail = []
    try:
        for p, (i, kept) in enumerate(zip(free, keep_free)):
            w, v, r, parent, opt = _step(w, v, r, extra[i, kept], t.objective[i, kept], rc_free[p, kept],
                                         cap - after_free[p + 1], rmax)
            free_trail.append((parent.astype(np.int32), kept[opt].astype(np.int16)))
            count(len(w))
        layer_trail = []
        for li, (members, opts, sets) in enumerate(stages):
            parts = []
            for k, fe, fv, rck, keeps, rc in sets:
                ve, ee = opts[k][0], opts[k][1]
                least = [float(ee[p, kept].min()) for p, kept in enumerate(keeps)]
                suffix = np.concatenate([np.cumsum(least[::-1])[::-1], [0.0]])
                w1, v1, r1 = w + fe, v + fv, r + rck
                start = np.flatnonzero((w1 + suffix[0] + after_layers[li + 1] <= cap) & (r1 <= rmax))
                w1, v1, r1 = w1[start], v1[start], r1[start]
                trail = []
                for p, kept in enumerate(keeps):
                    w1, v1, r1, parent, opt = _step(w1, v1, r1, ee[p, kept], ve[p, kept], rc[p, kept],
                                                    cap - suffix[p + 1] - after_layers[li + 1], rmax)
                    trail.append((parent.astype(np.int32), kept[opt].astype(np.int16)))
                    count(len(w1))
                parts.append((start, trail, w1, v1, r1))
            w_all = np.concatenate([q[2] for q in parts])
            v_all = np.concatenate([q[3] for q in parts])
            r_all = np.concatenate([q[4] for q in parts])
            which = np.concatenate([np.full(len(q[2]), n) for n, q in enumerate(parts)]).astype(np.int64)
            pos = np.concatenate([np.arange(len(q[2])) for q in parts]).astype(np.int64)
            front = _front(w_all, v_all)
            w, v, r = w_all[front], v_all[front], r_all[front]
            layer_trail.append((parts, which[front], pos[front]))
            count(len(w))
    except _Overflow:
        return None, largest, bound
    if len(w) == 0:
        raise RuntimeError("internal error: the fused core DP lost every allocation of a feasible problem; "
                           "please report this with the problem")
    idx = np.zeros(len(extra), dtype=np.int64)
    s = int(np.argmin(v))
    for li in range(len(stages) - 1, -1, -1):
        members = stages[li][0]
        parts, which, pos = layer_trail[li]
        start, trail, *_ = parts[int(which[s])]
        s = int(pos[s])
        for p in range(len(trail) - 1, -1, -1):
            parent, col = trail[p]
            idx[members[p]] = int(col[s])
            s = int(parent[s])
        s = int(start[s])
    for p in range(len(free_trail) - 1, -1, -1):
        parent, col = free_trail[p]
        idx[free[p]] = int(col[s])
        s = int(parent[s])
    return idx, largest, bound


def solve(problem: AllocationProblem, max_cells: int = 100_000, latency_cells: int = 50_000,
          max_states: int = 500_000) -> Solution:
    """Solve the multiple-choice knapsack (module docstring).

    Args:
        problem: The allocation problem (needs every sensitivity).
        max_cells: Largest exact integer grid of the grid DP before it falls back to a coarse one.
        latency_cells: Grid cells of the grid DP for real-valued (latency) budgets.
        max_states: Longest Pareto list of the core DP before it gives way to the grid DP.

    Returns:
        The :class:`Solution`.

    Raises:
        InfeasibleBudgetError: If no allocation meets the budget.
    """
    check_feasible(problem)
    t = build_tables(problem)
    lowest = t.raw_usage if t.fusion is None else t.raw_usage - t.fusion.saving_use * t.usage_scale
    base = lowest.min(axis=1)
    extra = t.raw_usage - base[:, None]
    cap = problem.capacity
    cap_raw = t.usage_scale * (cap + FEASIBILITY_RTOL * max(1.0, abs(cap)))
    cap_extra = max(0.0, cap_raw - float(base.sum()))
    integral = problem.budget.kind in ("bits", "bytes", "stored-bits")
    start = None
    if t.fusion is None:
        rel = _relax(extra, t.objective, cap_extra)
        start = project_indices(t, rel.idx, problem)  # spend what the relaxation's allocation leaves
        incumbent = t.value(start)
        idx, largest = _core_dp(extra, t.objective, cap_extra, rel, incumbent, max_states)
        if idx is not None:
            return _finish(problem, t, idx, True, 0.0, largest, rel.bound)
        bound = rel.bound
        logger.info("core DP list outgrew max_states=%d: using the grid DP", max_states)
    else:
        idx, largest, bound = _fused_core(t, extra, cap_extra, max_states)
        if idx is not None:
            return _finish(problem, t, idx, True, 0.0, largest, bound)
        logger.info("fused core DP list outgrew max_states=%d: using the grid DP", max_states)
    g, exact = _grid(extra, cap_extra, integral, max_cells, latency_cells)
    q = np.ceil(extra / g - (0.0 if not exact else 1e-9)).astype(np.int64)
    cells = math.floor(cap_extra / g + (1e-9 if exact else 0.0))
    if t.fusion is not None:  # the additive polish below would optimise the per-expert bound, not the cost
        idx = _fused_dp(t, extra, g, exact, cells)
        return _finish(problem, t, idx, exact, g, cells, None if exact else bound)
    idx = _dp(q, t.objective, cells)
    if not exact:
        idx = _polish(problem, t, idx)
        if t.value(start) < t.value(idx):
            idx = start
    return _finish(problem, t, idx, exact, g, cells, None if exact else bound)


def _polish(problem: AllocationProblem, t: ProblemTables, idx: np.ndarray) -> np.ndarray:
    """Inexact grid: refine the DP result on exact values; keep it or the refined greedy if better."""
    rows = np.arange(len(idx))
    dp = refine_indices(t, project_indices(t, idx, problem), kicks=8)
    top = np.full(len(idx), len(t.bits) - 1)
    greedy = refine_indices(t, project_indices(t, top, problem), kicks=8)
    return greedy if t.objective[rows, greedy].sum() < t.objective[rows, dp].sum() else dp


def _finish(problem: AllocationProblem, t: ProblemTables, idx: np.ndarray, exact: bool, g: float,
            cells: int, bound: float | None) -> Solution:
    used = t.used(idx)
    if not fits(used, problem.capacity):
        raise RuntimeError(f"internal error: DP allocation uses {problem.budget.describe(problem.budget.fixed + used)} > "
                           f"{problem.budget.describe()}; please report this with the problem")
    value = t.value(idx)
    if exact:
        bound = value
    else:
        bound = min(bound, value)
        logger.info("optimal: not proven optimal: objective %.6g, lower bound %.6g (gap %.3g, %.3g %% of the "
                    "objective)", value, bound, value - bound, 100 * (value - bound) / max(abs(value), 1e-300))
    logger.debug("optimal: objective %.6g, %d cells of %.4g (exact=%s)", value, cells, g, exact)
    return Solution(t.allocation(idx), value, exact, g, cells, bound)


@dataclass(frozen=True)
class OptimalAllocator:
    """Exact optimum of the additive objective (grid-bounded, with a proven gap, only where the module
    docstring says).

    Attributes:
        max_cells: Largest exact integer grid of the grid DP before a coarse one is used.
        latency_cells: Grid DP cells for latency budgets (fused dispatch, or the fallback).
        max_states: Longest Pareto list of the core DP before it gives way to the grid DP.
    """

    name: ClassVar[str] = "optimal"
    needs: ClassVar[tuple[str, ...]] = ("sensitivity",)
    measures: ClassVar[bool] = False
    places_nonexperts: ClassVar[bool] = True
    summary: ClassVar[str] = ("exact optimum of the additive sensitivity + cost objective (LP bound + "
                              "exact DP over the core)")
    max_cells: int = 100_000
    latency_cells: int = 50_000
    max_states: int = 500_000

    def __post_init__(self) -> None:
        if self.max_cells < 1 or self.latency_cells < 1 or self.max_states < 1:
            raise ValueError(f"max_cells, latency_cells and max_states must be >= 1, got {self.max_cells}, "
                             f"{self.latency_cells}, {self.max_states}")

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Return the DP optimum; see :func:`solve`."""
        return solve(problem, self.max_cells, self.latency_cells, self.max_states).allocation

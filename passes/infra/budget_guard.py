"""The budget guard: an instrument that checks, after every pass that follows ``allocate``, that
the experts' bits (and those of the non-expert nodes it placed) still meet allocate's budget and
bit-widths.

Passes run after allocate (plugins through ``--pass``, for instance) may rewrite ``bits``; the
allocators keep to the budget, but nothing else did. Usage is computed exactly as allocate
computes it (:func:`.allocate.problem.budget_usage` on the problem :func:`..allocate.base.build_problem`
builds), for every budget kind (code bits, stored bits, bytes, latency) alike.

Two kinds of breakage:

* bits the target cannot emit (or experts left without bits): always an error, since the backend
  could not lower them anyway;
* usage over the budget, or bits outside allocate's ``bits`` choices: an error naming the first
  pass after which the check failed, or with ``allow_overrun`` one warning naming it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ...ir.graph import Graph
from ..allocate.base import AllocatePass, build_problem, nonexpert_items
from ..allocate.problem import Budget, budget_usage, fits
from .base import PassContext, PassError
from .manager import Instrument

log = logging.getLogger(__name__)

DEFAULT_BITS = (2, 3, 4, 8, 16)  # what allocate offers without a backend (allocate.base.bits_choices)


class BudgetOverrunError(PassError):
    """A pass after allocate left an allocation over the budget or with bits the target cannot emit."""


class BudgetGuard(Instrument):
    """Checks the allocation after every pass from ``allocate`` on (see the module docstring).

    Attributes:
        broken_by: ``(pipeline position, pass name)`` of the pass after which the allocation
            went over the budget and has not come back within it since, or None.
        used: the last measured usage (budget units), None before allocate ran.
    """

    def __init__(self, backend: Any, allow_overrun: bool = False) -> None:
        self.backend, self.allow_overrun = backend, allow_overrun
        self.options = None  # AllocateOptions of the last allocate pass: the budget in force
        self.budget: Budget | None = None
        self.broken_by: tuple[int, str] | None = None
        self.used: float | None = None

    def after(self, index, p, result):
        if isinstance(p, AllocatePass):
            self.options, self.broken_by = p.options, None
            self.budget = Budget(p.options.budget_kind, p.options.budget)
        if self.options is None:
            return
        problems, used = self.check(result.graph)
        before, self.used = self.used, used
        if not problems:
            if self.broken_by is not None:
                log.info("budget: back within %s after pass %r", self.budget.describe(), p.name)
            self.broken_by = None
            return
        if self.broken_by is not None:
            return  # already reported for the pass that broke it
        self.broken_by = (index, p.name)
        where = f"pass {p.name!r} (#{index + 1})"
        prior = "" if isinstance(p, AllocatePass) or before is None else \
            f" (before it: {self.budget.describe(before)} used)"
        msg = f"{where} broke allocate's constraints: {'; '.join(problems)}{prior}"
        if not self.allow_overrun:
            raise BudgetOverrunError(f"{msg}. Make the pass keep to the budget, raise the budget, or pass "
                                     "--allow-budget-overrun (allow_budget_overrun = true) to emit it anyway")
        log.warning("%s; continuing, as --allow-budget-overrun allows", msg)

    def check(self, graph: Graph) -> tuple[list[str], float | None]:
        """``(problems, usage)`` of the graph's bits against the budget in force.

        Raises:
            BudgetOverrunError: experts without bits, or bits the target cannot emit (never allowed).
        """
        o = self.options
        supported = tuple(getattr(self.backend, "supported_bits", ()) or DEFAULT_BITS)
        ctx = PassContext(backend=self.backend)
        items = nonexpert_items(graph, dataclasses.replace(o, bits=supported), ctx)  # --nonexpert-bits auto
        bits = {n.id: n.ann.get("bits") for n in graph.experts()} | {k: graph.node(k).ann.get("bits") for k in items}
        missing = [k for k, b in bits.items() if b is None]
        unsupported = {k: b for k, b in bits.items() if b is not None
                       and b not in (set(items[k].values()) if k in items else supported)}
        if missing or unsupported:
            target = getattr(self.backend, "name", None) or "no target"
            raise BudgetOverrunError(
                f"after allocate, {len(missing)} expert(s) have no bits {missing[:5]} and {len(unsupported)} have "
                f"bits the target ({target}) cannot emit {dict(list(unsupported.items())[:5])}; supported: "
                f"{supported}")
        problems = []
        outside = {k: b for k, b in bits.items() if o.bits is not None and b not in o.bits}
        if outside:
            problems.append(f"{len(outside)} expert(s) use bits outside the allowed {tuple(o.bits)} "
                            f"(e.g. {dict(list(outside.items())[:3])})")
        problem = build_problem(graph, dataclasses.replace(o, bits=supported), ctx)
        used = budget_usage(problem, bits)
        if not fits(used, problem.budget.value):
            problems.append(f"{self.budget.describe(used)} used, over the budget of {self.budget.describe()}")
        return problems, used


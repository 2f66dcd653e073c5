"""Adding an allocator is one class: its declarations drive the pass, the driver and the CLI.

A toy allocator registered here (never a built-in) must appear in ``--allocator``'s choices and
help, get the analyses it declares run before it, and compile end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from dmpq_compile.passes import make_pass
from dmpq_compile.passes.allocate import _REGISTRY as REGISTRY
from dmpq_compile.passes.allocate import (
    ALLOCATORS,
    Allocation,
    AllocationProblem,
    allocator_class,
    allocators,
    register_allocator,
)
from dmpq_compile.passes.allocate.base import check_nonexpert_allocation
from dmpq_compile.passes.infra.base import PassError

from dmpq_compile.cli import build_parser
from dmpq_compile.compiler import CompileConfig, analysis_passes, run_pipeline
from dmpq_compile.frontend import load
from dmpq_compile.registry import PluginError


@dataclass(frozen=True)
class LeastSensitiveLowest:
    """Toy: the most sensitive half of the experts at the highest bits, the rest at the lowest."""

    name: ClassVar[str] = "toy-halves"
    needs: ClassVar[tuple[str, ...]] = ("sensitivity",)
    measures: ClassVar[bool] = False
    places_nonexperts: ClassVar[bool] = False
    summary: ClassVar[str] = "toy: the most sensitive half high, the rest low"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        lo, hi = min(problem.bits_choices), max(problem.bits_choices)
        ranked = sorted(problem.experts, key=lambda e: -e.sensitivity.get(lo, 0.0))
        return {e.key: hi if i < len(ranked) // 2 else lo for i, e in enumerate(ranked)}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(REGISTRY, "_items", dict(REGISTRY._items))
    monkeypatch.setattr(REGISTRY, "_origin", dict(REGISTRY._origin))
    return register_allocator(LeastSensitiveLowest)


def test_a_registered_allocator_reaches_the_cli_and_its_help(toy):
    assert allocator_class("toy-halves") is toy and "toy-halves" not in ALLOCATORS
    parser = build_parser("compile")
    sub = next(a for a in parser._actions if a.dest == "command").choices["compile"]
    action = next(a for a in sub._actions if "--allocator" in a.option_strings)
    assert "toy-halves" in action.choices
    assert "toy-halves (toy: the most sensitive half high, the rest low)" in action.help
    assert action.help.startswith("bit allocator: optimal (default: ")


def test_its_declared_needs_run_before_it_and_it_compiles(toy, tiny_dirs, tiny_corpus):
    path = tiny_dirs("mixtral")
    cfg = CompileConfig.from_dict({
        "target": None, "allocate": {"allocator": "toy-halves", "budget": 16.0, "bits": (2, 8)},
        "sensitivity": {"enabled": False, "sequences": 4}, "quantize": {"group_size": 32},
        "calibration": {"corpus": str(tiny_corpus), "sequences": 4, "seq_len": 32}})
    assert [p.name for p in analysis_passes(cfg, None)] == ["profile", "sensitivity"]  # needs sensitivity
    assert make_pass("allocate", allocator="toy-halves").requires == ("freq", "kl")
    graph, records = run_pipeline(load(path), path, cfg, progress=False)
    assert [r.name for r in records] == ["profile", "sensitivity", "allocate", "quantize"]
    bits = sorted(n.ann["bits"] for n in graph.experts())
    assert bits == [2] * (len(bits) - len(bits) // 2) + [8] * (len(bits) // 2)


def test_what_it_declares_is_enforced(toy):
    with pytest.raises(PassError, match="places non-expert weights with allocators .*'optimal'"):
        check_nonexpert_allocation("toy-halves", "stored-bits", False)

    class Undeclared:
        name = "toy-undeclared"

        def allocate(self, problem):
            return {}

    with pytest.raises(PluginError, match="lacks .*needs"):
        register_allocator(Undeclared)
    with pytest.raises(PluginError, match="clashes"):
        register_allocator(type("Other", (LeastSensitiveLowest,), {}))
    assert set(ALLOCATORS) <= set(allocators())

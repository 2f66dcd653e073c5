"""Plugin passes on the compile command line, and budgets that hold after
every pass.

The plugin is the worked example of docs/extending.md (docs/examples/dmpq-pin-bits), built into a
wheel and installed with pip into a temporary folder: dmpq-compile finds it through
importlib.metadata entry points exactly as it would in a user's environment.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from dmpq_compile.passes import PASSES, Pass, PassResult, make_pass

from dmpq_compile.cli import main
from dmpq_compile.commands.compile import pass_insertions
from dmpq_compile.compiler import CompileConfig, allocation_passes, analysis_passes, run_pipeline
from dmpq_compile.extra_passes import PassInsertion
from dmpq_compile.frontend import load

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dmpq-pin-bits"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example package built as a wheel and pip-installed into a temporary site folder."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(EXAMPLE, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True)
    wheel, = (tmp / "dist").glob("dmpq_pin_bits-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True)
    return tmp / "site"


@pytest.fixture
def plugin_registry(plugin_site, monkeypatch):
    """The process-wide pass registry, reloading plugins with the installed example on sys.path."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setattr(PASSES, "_items", dict(PASSES._items))
    monkeypatch.setattr(PASSES, "_origin", dict(PASSES._origin))
    monkeypatch.setattr(PASSES, "_plugins_loaded", False)
    yield PASSES
    sys.modules.pop("dmpq_pin_bits", None)


def _cli(plugin_site, *argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "dmpq_compile.cli", *argv], capture_output=True, text=True,
                          env=env, check=False, timeout=300)


def _compile_argv(model, corpus, out, *extra):
    return ["compile", str(model), "-o", str(out), "--target", "ort-cpu", "--allocator", "uniform",
            "--no-sensitivity", "--calib-corpus", str(corpus), "--calib-sequences", "4", "--seq-len", "32",
            "--group-size", "32", "--no-progress", *extra]


def test_installed_distribution_exposes_the_entry_point(plugin_site):
    dist, = metadata.distributions(path=[str(plugin_site)])
    assert dist.metadata["Name"] == "dmpq-pin-bits"
    assert [(ep.name, ep.value) for ep in dist.entry_points if ep.group == "dmpq_compile.passes"] == \
        [("pin-bits", "dmpq_pin_bits:PinBits")]
    res = _cli(plugin_site, "passes")
    assert res.returncode == 0 and "pin-bits" in res.stdout and "plugin dmpq-pin-bits" in res.stdout


def test_compile_runs_the_plugin_where_asked(plugin_site, tiny_dirs, tiny_corpus, tmp_path):
    out = tmp_path / "art"
    res = _cli(plugin_site, *_compile_argv(tiny_dirs("mixtral"), tiny_corpus, out, "--budget-code-bits", "6",
                                           "--bits", "4,8", "--pass", "pin-bits:layers=[0],bits=8",
                                           "--after", "allocate"))
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["profile", "cost", "allocate", "pin-bits", "quantize"]
    assert {(e["layer"], e["bits"]) for e in report["experts"]} == {(0, 8), (1, 4)}
    assert report["config"]["extra_passes"] == [{"name": "pin-bits", "after": "allocate",
                                                 "options": {"layers": [0], "bits": 8}}]


def test_a_pass_that_breaks_the_budget_is_named(plugin_site, tiny_dirs, tiny_corpus, tmp_path):
    out = tmp_path / "art"
    argv = _compile_argv(tiny_dirs("mixtral"), tiny_corpus, out, "--budget-code-bits", "4", "--pass",
                         "pin-bits:layers=[0],bits=8")
    res = _cli(plugin_site, *argv)  # used to write a 6-bit model under a 4-bit budget, silently
    assert res.returncode == 1 and not out.exists()
    assert ("pass 'pin-bits' (#4) broke allocate's constraints: 6.00 average bits used, over the budget of "
            "4.00 average bits (before it: 4.00 average bits used)") in res.stderr
    assert "--allow-budget-overrun" in res.stderr and "Traceback" not in res.stderr
    res = _cli(plugin_site, *argv, "--allow-budget-overrun")
    assert res.returncode == 0, res.stderr
    assert "WARNING" in res.stderr and "pass 'pin-bits' (#4) broke allocate's constraints" in res.stderr
    bits = {(e["layer"], e["bits"]) for e in json.loads((out / "report.json").read_text())["experts"]}
    assert bits == {(0, 8), (1, 4)}


@pytest.mark.parametrize(("kind", "budget"), [("bits", 3.0), ("bytes", None)])
def test_every_budget_kind_is_checked_after_each_pass(plugin_registry, tiny_dirs, tiny_corpus, kind, budget):
    """uniform at the lowest bits fits any feasible budget; pinning layer 0 to 8 bits then breaks it."""
    from dmpq_compile.passes.infra.budget_guard import BudgetOverrunError

    path = tiny_dirs("mixtral")
    cfg = CompileConfig.from_dict({
        "target": "ort-cpu", "extra_passes": ({"name": "pin-bits", "options": {"bits": 8}},),
        "allocate": {"allocator": "uniform", "budget_kind": kind, "budget": budget or 1.0, "bits": (2, 4, 8)},
        "sensitivity": {"enabled": False}, "calibration": {"corpus": str(tiny_corpus), "sequences": 4, "seq_len": 32},
        "quantize": {"group_size": 32}})
    if budget is None:  # what every expert at 2 bits uses (the smallest feasible budget), plus 1%
        from dmpq_compile.passes.allocate.base import build_problem
        from dmpq_compile.passes.allocate.problem import min_feasible_budget
        from dmpq_compile.passes.infra.base import PassContext

        from dmpq_compile.compiler import get_backend, run_passes

        backend = get_backend("ort-cpu")
        graph = load(path)
        graph.meta["group_size"] = cfg.quantize.group_size  # as run_pipeline sets it: the cost tables depend on it
        graph, _ = run_passes(graph, analysis_passes(cfg, backend), path, cfg, backend, progress=False)
        o = make_pass("allocate", budget_kind=kind, budget=1.0, bits=(2, 4, 8)).options
        low = min_feasible_budget(build_problem(graph, o, PassContext(backend=backend)))
        cfg = cfg.replace(allocate={"budget": low * 1.01})
    with pytest.raises(BudgetOverrunError, match=r"pass 'pin-bits' \(#4\) broke allocate's constraints: .* used, "
                       r"over the budget of"):
        run_pipeline(load(path), path, cfg, progress=False)
    allowed = cfg.replace(allow_budget_overrun=True)
    graph, records = run_pipeline(load(path), path, allowed, progress=False)
    assert [r.name for r in records] == ["profile", "cost", "allocate", "pin-bits", "quantize"]
    assert {n.ann["bits"] for n in graph.experts() if n.attrs["layer"] == 0} == {8}


@pytest.mark.parametrize("kind", ["bits", "bytes", "latency"])
def test_guard_on_a_hand_built_allocation(plugin_registry, tiny_dirs, kind, caplog):
    """Cost rows by hand (latency grows with bits here; measured CPU latencies need not)."""
    from dmpq_compile.passes import PassContext
    from dmpq_compile.passes.infra.budget_guard import BudgetGuard, BudgetOverrunError

    backend = type("Fake", (), {"name": "fake", "supported_bits": (2, 4, 8, 16)})()
    g = load(tiny_dirs("mixtral"))
    for n in g.experts():
        g.annotate(n.id, "freq", 0.5)
        g.annotate(n.id, "cost", {"fake": {b: {"decode_ms": 0.1 * b, "prefill_ms": 1.0, "bytes": 100 * b,
                                               "energy_mj": 0.0} for b in (2, 4, 8, 16)}})
        g.annotate(n.id, "bits", 4)
    n_experts = len(g.experts())
    per_expert = {"bits": None, "bytes": 400, "latency": 0.5 * 0.4}[kind]
    budget = 4.0 if kind == "bits" else n_experts * per_expert  # exactly what the allocation uses
    alloc = make_pass("allocate", allocator="uniform", budget_kind=kind, budget=budget)
    pin = make_pass("pin-bits", layers=(0,), bits=8)
    guard = BudgetGuard(backend)
    guard.after(2, alloc, PassResult(g, True))  # at the budget exactly: fine
    assert guard.broken_by is None
    quantize = make_pass("quantize")
    guard.after(3, quantize, PassResult(g, False))  # passes that keep the bits are fine too
    g = pin.run(g, PassContext(backend=backend)).graph
    with pytest.raises(BudgetOverrunError, match=r"pass 'pin-bits' \(#5\) broke allocate's constraints"):
        guard.after(4, pin, PassResult(g, True))
    lenient = BudgetGuard(backend, allow_overrun=True)
    lenient.after(2, alloc, PassResult(g, True))  # allocate's own result over budget: named too
    assert lenient.broken_by == (2, "allocate") and "pass 'allocate' (#3)" in caplog.text


@dataclasses.dataclass(frozen=True)
class _SetBitsOptions:
    bits: int = 3


class _SetBits(Pass):
    """Sets every expert's bits without asking the target (what a careless plugin might do)."""

    name = "set-bits-test"
    requires = provides = ("bits",)
    Options = _SetBitsOptions

    def run(self, graph, ctx):
        for node_id in [n.id for n in graph.experts()]:
            graph.annotate(node_id, "bits", self.options.bits)
        return PassResult(graph, True)


def test_bits_the_target_cannot_emit_are_always_an_error(plugin_registry, tiny_dirs, tiny_corpus):
    from dmpq_compile.passes.infra.budget_guard import BudgetOverrunError

    plugin_registry.register(_SetBits)
    path = tiny_dirs("mixtral")
    cfg = CompileConfig.from_dict({
        "target": "ort-cpu", "allow_budget_overrun": True,
        "extra_passes": ({"name": "set-bits-test", "options": {"bits": 3}},),
        "allocate": {"allocator": "uniform", "budget": 16.0}, "sensitivity": {"enabled": False},
        "calibration": {"corpus": str(tiny_corpus), "sequences": 4, "seq_len": 32}, "quantize": {"group_size": 32}})
    with pytest.raises(BudgetOverrunError, match=r"8 have bits the target \(ort-cpu\) cannot emit .*supported: "
                       r"\(2, 4, 8, 16\)"):
        run_pipeline(load(path), path, cfg, progress=False)


def _cfg(**kw):
    return CompileConfig.from_dict({"target": None, "allocate": {"allocator": "uniform"},
                                    "sensitivity": {"enabled": False}}).replace(**kw)


def test_placement_after_any_pipeline_pass_and_after_each_other(plugin_registry):
    cfg = _cfg(qat={"enabled": True}, extra_passes=pass_insertions([
        ("--pass", "pin-bits:bits=4"), ("--after", "qat"),
        ("--pass", "pin-bits:bits=8"),  # default anchor: allocate
    ]))
    assert [p.name for p in allocation_passes(cfg)] == ["allocate", "pin-bits", "qat", "pin-bits", "quantize"]
    assert [p.options.bits for p in allocation_passes(cfg) if p.name == "pin-bits"] == [8, 4]
    twice = _cfg(extra_passes=pass_insertions([("--pass", "pin-bits:bits=8"), ("--pass", "pin-bits:bits=2"),
                                                ("--after", "pin-bits")]))
    assert [(p.name, getattr(p.options, "bits", None)) for p in allocation_passes(twice)] == \
        [("allocate", None), ("pin-bits", 8), ("pin-bits", 2), ("quantize", None)]
    chained = _cfg(extra_passes=(PassInsertion("pin-bits", "quantize"),))
    assert [p.name for p in allocation_passes(chained)] == ["allocate", "quantize", "pin-bits"]
    assert [p.name for p in allocation_passes(chained, final=False)] == ["allocate"]  # co-design round
    assert [p.name for p in analysis_passes(chained, None)] == ["profile"]


def test_config_file_tables(plugin_registry, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[compile.allocate]\nallocator = "uniform"\n\n[[compile.extra_passes]]\nname = "pin-bits"\n'
                    'after = "allocate"\noptions = {layers = [1], bits = 4}\n')
    from dmpq_compile.commands.compile import _read_toml

    cfg = CompileConfig.from_dict(_read_toml(str(path)))
    assert cfg.extra_passes == (PassInsertion("pin-bits", "allocate", {"layers": (1,), "bits": 4}),)


@pytest.mark.parametrize(("flags", "message"), [
    (["--pass", "pin-bit"], "--pass pin-bit: unknown pass 'pin-bit'; available: .*pin-bits.*install the plugin"),
    (["--pass", "pin-bits:layer=0"], ("pass 'pin-bits' has no option 'layer'; its options: bits, layers; "
                                      "`dmpq-compile passes` lists its options")),
    (["--pass", "pin-bits:bits=eight"], r"pass 'pin-bits' option bits='eight': expected int"),
    (["--pass", "pin-bits:layers=[0,x]"], r"option layers='\[0,x\]': expected tuple\[int, ...\]"),
    (["--pass", "pin-bits:bits=0"], "bits must be positive, got 0"),
    (["--pass", "pin-bits:bits"], "'bits' is not KEY=VALUE"),
    (["--pass", "pin-bits", "--after", "alocate"], "--pass pin-bits --after alocate: no other pass is named 'alocate'"),
    (["--after", "allocate"], "--after allocate: give it after the --pass it places"),
    (["--pass", "pin-bits", "--after", "qat", "--after", "allocate"], "--pass pin-bits has two --after"),
    (["--pass", "pin-bits", "--after", "qat"], "this compile does not run 'qat' .*; add --qat"),
])
def test_clear_errors(plugin_registry, tiny_dirs, tmp_path, capsys, flags, message):
    argv = ["compile", str(tiny_dirs("mixtral")), "-o", str(tmp_path / "out"), "--target", "ort-cpu",
            "--allocator", "uniform", "--no-sensitivity", "--no-progress", *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dmpq-compile compile: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_option_types_in_a_config_are_checked(plugin_registry):
    with pytest.raises(ValueError, match=r"--pass pin-bits: pass 'pin-bits' option bits='8': expected int \(got str\)"):
        _cfg(extra_passes=({"name": "pin-bits", "options": {"bits": "8"}},))
    with pytest.raises(ValueError, match="extra_passes entry .*: give 'name'"):
        _cfg(extra_passes=({"pass": "pin-bits"},))
    with pytest.raises(ValueError, match="--pass pin-bits --after pin-bits: no other pass is named 'pin-bits'"):
        _cfg(extra_passes=(PassInsertion("pin-bits", "pin-bits"),))
    plugin_registry.register(_SetBits)
    with pytest.raises(ValueError, match=r"--pass anchors form a cycle: pin-bits \(after set-bits-test\) -> "
                       r"set-bits-test \(after pin-bits\)"):
        _cfg(extra_passes=(PassInsertion("pin-bits", "set-bits-test"), PassInsertion("set-bits-test", "pin-bits")))

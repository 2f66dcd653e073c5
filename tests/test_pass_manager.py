import sys
import textwrap

import pytest
from dmpq_compile.passes import (
    DumpIR,
    Pass,
    PassContext,
    PassError,
    PassManager,
    PassResult,
    Timing,
    make_pass,
)

from dmpq_compile.frontend import load
from dmpq_compile.registry import PASS_GROUP, PluginError, Registry


class _Writes(Pass):
    name = "writes-freq"
    provides = ("freq",)

    def run(self, graph, ctx):
        for n in graph.experts():
            graph.annotate(n.id, "freq", 0.5)
        return PassResult(graph, True)


class _Liar(Pass):
    name = "liar"
    provides = ("mass",)

    def run(self, graph, ctx):
        return PassResult(graph, False)


def test_pipeline_checked_before_running(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    ran = []

    class Spy(_Writes):
        def run(self, graph, ctx):
            ran.append(1)
            return super().run(graph, ctx)

    pm = PassManager([Spy(), make_pass("allocate", allocator="optimal")])
    with pytest.raises(PassError, match=r"'allocate' \(#2\) requires \['kl'\].*writes-freq"):
        pm.run(g, PassContext(progress=False))
    assert not ran


def test_broken_promise_and_failures_name_the_pass(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    with pytest.raises(PassError, match="'liar' promised annotations \\['mass'\\]"):
        PassManager([_Liar()]).run(g, PassContext(progress=False))

    class Boom(Pass):
        name = "boom"

        def run(self, graph, ctx):
            raise ZeroDivisionError("x")

    with pytest.raises(PassError, match=r"pass 'boom' \(#2; passes run before it: writes-freq\) failed"):
        PassManager([_Writes(), Boom()]).run(g, PassContext(progress=False))


def test_options_are_typed_and_closed():
    with pytest.raises(PassError, match="unknown option.*'bogus'.*valid options"):
        make_pass("profile", bogus=1)


def test_calibration_required(tiny_dirs):
    with pytest.raises(PassError, match="needs calibration data"):
        make_pass("profile").call(load(tiny_dirs("mixtral")), PassContext(progress=False))


def test_timing_and_dump(tiny_dirs, tmp_path):
    from dmpq_compile.ir import load_graph

    timing = Timing()
    PassManager([_Writes()], [timing, DumpIR(tmp_path)]).run(load(tiny_dirs("mixtral")), PassContext(progress=False))
    assert timing.records[0].name == "writes-freq" and timing.records[0].seconds >= 0
    assert load_graph(tmp_path / "00-writes-freq").node("L0.E0").ann["freq"] == 0.5


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """An installed distribution (dist-info on sys.path) exposing a pass through the entry-point group."""
    (tmp_path / "dmpq_test_plugin.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from dmpq_compile.passes import Pass, PassResult

        @dataclass(frozen=True)
        class Opts:
            value: float = 0.25

        class HalfFreq(Pass):
            name = "half-freq"
            requires = ("freq",)
            provides = ("freq",)
            Options = Opts
            description = "test plugin"

            def run(self, graph, ctx):
                for n in graph.experts():
                    graph.annotate(n.id, "freq", n.ann["freq"] * self.options.value)
                return PassResult(graph, True)
    """))
    info = tmp_path / "dmpq_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dmpq-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{PASS_GROUP}]\nhalf-freq = dmpq_test_plugin:HalfFreq\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("dmpq_test_plugin", None)


def test_plugin_pass_from_entry_point_runs_in_pipeline(plugin_dist, tiny_dirs, monkeypatch):
    from dmpq_compile import registry

    reg = Registry("pass", PASS_GROUP, "call")
    for name, cls, _ in registry.PASSES.items():
        reg.register(cls)
    monkeypatch.setattr(registry, "PASSES", reg)
    monkeypatch.setattr("dmpq_compile.passes.PASSES", reg)
    cls = reg.get("half-freq")
    assert {n: o for n, _, o in reg.items()}["half-freq"] == "plugin dmpq-test-plugin"
    g = PassManager([_Writes(), cls(value=0.5)]).run(load(tiny_dirs("mixtral")), PassContext(progress=False))
    assert g.node("L1.E2").ann["freq"] == 0.25


def test_broken_plugin_is_reported(tmp_path, monkeypatch):
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{PASS_GROUP}]\nbroken = no_such_module_xyz:Pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="'broken'.*broken-plugin.*failed to load"):
        Registry("pass", PASS_GROUP, "call").get("anything")

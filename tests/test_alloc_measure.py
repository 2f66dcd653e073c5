"""Hardware in the loop: the measured bytes of an allocation are the emitted artifact's, as its
manifest records them, and the same bytes the target's cost table predicts."""

import pytest
from dmpq_compile.backends.base import ExpertCostRow
from dmpq_compile.backends.cost import expert_shapes
from dmpq_compile.backends.ort_cpu import OrtCpuBackend
from dmpq_compile.backends.ort_cpu.cost import ort_cpu_expert_bytes
from dmpq_compile.passes.allocate.measure import artifact_hardware_fn

from dmpq_compile.compiler import open_artifact
from dmpq_compile.frontend import load

GROUP = 32


class _TableFromLayout(OrtCpuBackend):
    """ort-cpu with an analytical table (layout bytes, unit latency): nothing to time in a test."""

    def cost_table(self, graph, **options):
        return {key: {b: ExpertCostRow(1.0, 1.0, ort_cpu_expert_bytes(h, i, b, GROUP), 1.0)
                      for b in self.supported_bits}
                for key, (h, i) in expert_shapes(graph).items()}


@pytest.mark.parametrize("bits", [(4,), (2, 8, 16)])
def test_hardware_fn_reports_the_artifacts_expert_bytes(tiny_dirs, bits):
    g = load(tiny_dirs("mixtral"))
    g.meta["group_size"] = GROUP
    for n in g.experts():
        g.annotate(n.id, "freq", 0.5)
    backend = _TableFromLayout()
    fn = artifact_hardware_fn(g, backend, open_artifact, decode_tokens=2, repeats=1)
    allocation = {n.id: bits[k % len(bits)] for k, n in enumerate(g.experts())}
    measured = fn(allocation)
    table = backend.cost_table(g)
    assert measured["bytes"] == sum(table[key][b].bytes for key, b in allocation.items())
    assert measured["latency_ms"] > 0

import pytest

from dmpq_compile.compiler import CompileConfig, run_pipeline
from dmpq_compile.frontend import load


def _cfg(tiny_corpus, **kw):
    base = {"target": None, "calibration": {"corpus": str(tiny_corpus), "sequences": 8, "seq_len": 32},
            "sensitivity": {"sequences": 4}, "quantize": {"group_size": 32}, "allocate": {"bits": (2, 4, 8, 16)}}
    return CompileConfig.from_dict(base).replace(**kw)


def test_pipeline_without_backend_allocates_and_quantizes(tiny_dirs, tiny_corpus):
    path = tiny_dirs("qwen2_moe")
    cfg = _cfg(tiny_corpus, allocate={"allocator": "optimal", "budget": 3.0})
    graph, records = run_pipeline(load(path), path, cfg, progress=False)
    assert [r.name for r in records] == ["profile", "sensitivity", "allocate", "quantize"]
    bits = [n.ann["bits"] for n in graph.experts()]
    n_params = [sum(graph.weights[n.params[r]].numel() for r in ("gate", "up", "down")) for n in graph.experts()]
    assert sum(b * p for b, p in zip(bits, n_params)) / sum(n_params) <= 3.0 + 1e-9
    assert all("quant" in n.ann for n in graph.experts())


def test_codesign_alternates_allocation_and_qat(tiny_dirs, tiny_corpus):
    path = tiny_dirs("mixtral")
    cfg = _cfg(tiny_corpus, allocate={"allocator": "optimal", "budget": 3.0}, qat={"codesign_rounds": 1, "steps": 3})
    _graph, records = run_pipeline(load(path), path, cfg, progress=False)
    names = [r.name for r in records]
    assert names == ["profile", "sensitivity", "allocate", "qat", "sensitivity", "allocate", "qat", "quantize"]


@pytest.mark.parametrize("fields", [{"enabled": True}, {"codesign_rounds": 1}])
@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_qat_with_a_re_rounding_method_is_refused(fields, method):
    with pytest.raises(ValueError, match=f"--quant-method {method} re-rounds them"):
        CompileConfig.from_dict({"quantize": {"method": method}, "qat": fields})
    CompileConfig.from_dict({"quantize": {"method": "rtn"}, "qat": fields})  # what QAT trains for


def test_unknown_setting_rejected():
    with pytest.raises(ValueError, match="unknown compile setting.*'budgt'"):
        CompileConfig.from_dict({"budgt": 3})

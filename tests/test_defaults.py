"""What a compile without budget flags makes: the target's stored-bits budget with the non-expert
weights allocated (or fixed at 4 bits for allocators that cannot place them), raised to the
smallest feasible budget plus headroom where the weights a target keeps in float forbid it."""

import json

import pytest
from dmpq_compile.passes.allocate.base import DEFAULT_CODE_BITS

from dmpq_compile.compiler import (
    DEFAULT_HEADROOM_BITS,
    FIXED_NONEXPERT_BITS,
    CompileConfig,
    compile_model,
    get_backend,
    resolve_defaults,
    smallest_stored_bits,
)
from dmpq_compile.frontend import load
from dmpq_compile.pipeline import PIPELINE, STAGES


@pytest.mark.parametrize("target, value", [("ort-cpu", 4.5), ("trt-a100", 4.8)])
def test_no_budget_is_the_targets_stored_bits_with_nonexperts_allocated(target, value):
    a = resolve_defaults(CompileConfig(target=target)).allocate
    assert (a.budget_kind, a.budget, a.nonexpert_allocate, a.nonexpert_bits) == ("stored-bits", value, True, 16)
    assert a.allocated_kinds  # every quantizable kind outside the experts


def test_given_budgets_and_policies_keep_their_meaning():
    def resolved(**allocate):
        return resolve_defaults(CompileConfig.from_dict({"allocate": allocate})).allocate

    code = resolved(budget=3.0)
    assert (code.budget_kind, code.budget, code.nonexpert_allocate) == ("bits", 3.0, False)
    kind_only = resolved(budget_kind="bits")
    assert (kind_only.budget, kind_only.nonexpert_allocate) == (DEFAULT_CODE_BITS, False)
    fixed = resolved(nonexpert_bits=8)  # a policy given: kept, not allocated
    assert (fixed.budget_kind, fixed.nonexpert_bits, fixed.nonexpert_allocate) == ("stored-bits", 8, False)
    no_target = resolve_defaults(CompileConfig(target=None)).allocate
    assert (no_target.budget_kind, no_target.budget) == ("bits", DEFAULT_CODE_BITS)
    with pytest.raises(ValueError, match="'bytes' budget needs a value"):
        resolved(budget_kind="bytes")


@pytest.mark.parametrize("fields", [{"allocate": {"allocator": "frequency"}},
                                    {"sensitivity": {"enabled": False}, "allocate": {"allocator": "uniform"}},
                                    {"allocate": {"w_lat": 1.0}}])
def test_allocators_that_cannot_place_nonexperts_get_them_fixed(fields):
    a = resolve_defaults(CompileConfig.from_dict(fields)).allocate
    assert (a.budget_kind, a.nonexpert_allocate, a.nonexpert_bits) == ("stored-bits", False, FIXED_NONEXPERT_BITS)


def test_a_default_the_float_weights_forbid_is_raised_to_the_smallest_plus_headroom(tiny_dirs):
    graph = load(tiny_dirs("mixtral"))  # tiny: the fp16 embedding alone is a large share on trt-a100
    cfg = resolve_defaults(CompileConfig(target="trt-a100"), graph)
    smallest = smallest_stored_bits(cfg, graph, get_backend(cfg.target))
    assert cfg.allocate.budget > 4.8 and cfg.allocate.budget == pytest.approx(smallest + DEFAULT_HEADROOM_BITS, abs=0.01)
    assert resolve_defaults(cfg, graph) is cfg  # resolved configs stay as they are


def test_compile_without_budget_flags_stores_what_the_default_says(tiny_dirs, tiny_corpus, tmp_path):
    model = tiny_dirs("mixtral")
    cfg = CompileConfig.from_dict({"target": "ort-cpu", "calibration": {"corpus": str(tiny_corpus), "sequences": 8,
                                   "seq_len": 32}, "sensitivity": {"sequences": 4}, "quantize": {"group_size": 32}})
    art = compile_model(model, tmp_path / "art", cfg, progress=False)
    report = json.loads((art / "report.json").read_text())
    used = report["config"]["allocate"]
    assert used["budget_kind"] == "stored-bits" and used["nonexpert_allocate"] is True
    assert report["storage"]["weights"]["bits_per_weight"] <= used["budget"] + 1e-9
    assert any(r["bits"] < 16 for r in report["nonexpert"])  # the non-experts were quantized too


def test_the_pipeline_is_data_and_the_driver_follows_it():
    assert {s.stage for s in PIPELINE} <= set(STAGES)
    names = [s.name for s in PIPELINE]
    assert names == ["profile", "sensitivity", "cost", "precision", "allocate", "qat", "quantize"]
    from dmpq_compile.extra_passes import ANALYSIS_ANCHORS

    assert ANALYSIS_ANCHORS == tuple(s.name for s in PIPELINE if s.stage == "analysis")

"""CompileConfig's sections: TOML, flags and pass options all come from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from dmpq_compile.commands import compile as cmd
from dmpq_compile.compiler import allocation_passes, analysis_passes
from dmpq_compile.config import CompileConfig, QATConfig, sections, setting, settings

NESTED = """\
target = "ort-cpu"
seed = 3
allow_budget_overrun = true

[calibration]
corpus = "my-corpus"
sequences = 12
seq_len = 64

[sensitivity]
sequences = 6
flip_probe = false
min_routed_tokens = 4
rare = "measured"

[allocate]
allocator = "uniform"
budget_kind = "stored-bits"
budget = 5.0
w_lat = 0.5
bits = [2, 4, 8]
nonexpert_bits = 8
nonexpert_kinds = {lm_head = 16}

[quantize]
group_size = 32
scale_dtype = "float32"

[qat]
enabled = true
steps = 300
time_budget_s = 60.0
lr = 2e-4
mode = "blockwise"

[emit]
dispatch = "gather"
max_length = 512

[[extra_passes]]
name = "precision"
after = "allocate"
"""


def _parse(argv: list[str], cls=CompileConfig) -> CompileConfig:
    p = argparse.ArgumentParser()
    cmd.add_arguments(p) if cls is CompileConfig else cmd.add_setting_arguments(p, cls)
    return cmd.config_from_args(p.parse_args(argv), cls)


def test_nested_toml_round_trips(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(NESTED)
    cfg = CompileConfig.from_dict(cmd._read_toml(str(path)))
    assert (cfg.seed, cfg.calibration.seq_len, cfg.sensitivity.rare, cfg.allocate.bits, cfg.qat.steps) == \
        (3, 64, "measured", (2, 4, 8), 300)
    assert cfg.allocate.nonexpert_kinds == {"lm_head": 16} and cfg.emit.options() == {"dispatch": "gather",
                                                                                      "max_length": 512}
    assert CompileConfig.from_dict(cfg.to_dict()) == cfg  # what report.json stores reads back
    wrapped = tmp_path / "wrapped.toml"  # the same inside a [compile] table
    wrapped.write_text("[compile]\n" + re.sub(r"^\[(\[?)", r"[\1compile.", NESTED, flags=re.MULTILINE))
    assert CompileConfig.from_dict(cmd._read_toml(str(wrapped))) == cfg
    # flags win over the file, field by field; the file's other fields in that section stay
    flagged = _parse(["m", "--config", str(path), "--qat-steps", "5", "--calib-sequences", "2"])
    assert (flagged.qat.steps, flagged.qat.mode, flagged.calibration.sequences, flagged.calibration.seq_len) == \
        (5, "blockwise", 2, 64)


OLD_FLAT_KEYS = {  # the flat layout before the sections, and where each key went
    "allocator": "[allocate] allocator", "budget_kind": "[allocate] budget_kind", "budget": "[allocate] budget",
    "w_acc": "[allocate] w_acc", "w_eng": "[allocate] w_eng", "bits": "[allocate] bits",
    "group_size": "[quantize] group_size", "scale_dtype": "[quantize] scale_dtype",
    "max_length": "[emit] max_length", "dispatch": "[emit] dispatch", "quant_method": "[quantize] method",
    "calib_corpus": "[calibration] corpus", "calib_sequences": "[calibration] sequences",
    "seq_len": "[calibration] seq_len", "sensitivity_sequences": "[sensitivity] sequences",
    "sensitivity": "[sensitivity] enabled", "flip_probe": "[sensitivity] flip_probe",
    "min_routed_tokens": "[sensitivity] min_routed_tokens", "rare_sensitivity": "[sensitivity] rare",
    "metric": "[allocate] metric", "allocator_options": "[allocate] allocator_options", "qat": "[qat] enabled",
    "qat_steps": "[qat] steps", "qat_time_budget_s": "[qat] time_budget_s", "qat_lr": "[qat] lr",
    "qat_mode": "[qat] mode", "codesign_rounds": "[qat] codesign_rounds",
    "nonexpert_bits": "[allocate] nonexpert_bits", "nonexpert_kinds": "[allocate] nonexpert_kinds",
    "nonexpert_allocate": "[allocate] nonexpert_allocate",
}


@pytest.mark.parametrize(("key", "place"), OLD_FLAT_KEYS.items())
def test_a_flat_key_names_its_new_place(key, place):
    value = {"sensitivity": False, "qat": True}.get(key, 1)
    with pytest.raises(ValueError, match=f"compile setting {key!r} has moved: write it as {re.escape(place)}"):
        CompileConfig.from_dict({key: value})


def test_unknown_keys_and_wrong_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown compile setting 'budgt'.*sections: \['\[calibration\]'"):
        CompileConfig.from_dict({"budgt": 3})
    with pytest.raises(ValueError, match=r"unknown setting 'step' in \[qat\]; valid: .*'steps'"):
        CompileConfig.from_dict({"qat": {"step": 3}})
    with pytest.raises(ValueError, match=r"\[qat\] steps takes int, got '300'"):
        CompileConfig.from_dict({"qat": {"steps": "300"}})
    with pytest.raises(ValueError, match=r"\[sensitivity\] enabled takes bool, got 1"):
        CompileConfig.from_dict({"sensitivity": {"enabled": 1}})
    with pytest.raises(ValueError, match=r"\[calibration\] must be a table"):
        CompileConfig.from_dict({"calibration": 3})
    path = tmp_path / "mixed.toml"
    path.write_text("[compile]\nseed = 1\n[qat]\nsteps = 3\n")
    with pytest.raises(ValueError, match=r"inside the \[compile\] table or none.*\['qat'\]"):
        cmd._read_toml(str(path))


def test_section_checks_run_on_every_path():
    with pytest.raises(ValueError, match="--qat-mode must be one of"):
        CompileConfig.from_dict({"qat": {"mode": "half"}})
    with pytest.raises(ValueError, match=r"--dispatch chooses ort-cpu's expert dispatch"):
        CompileConfig().replace(target="trt-a100", emit={"dispatch": "gather"})
    with pytest.raises(TypeError, match="CompileConfig.qat must be a QATConfig"):
        CompileConfig(qat={"steps": 3})


def test_every_setting_has_a_flag_and_a_toml_key():
    """Derived: for each field of each section, its flag (or the flags that set it) parses into it
    and its TOML key reads into it; nothing here lists the fields."""
    sub = argparse.ArgumentParser()
    cmd.add_arguments(sub)
    flags = {o for a in sub._actions for o in a.option_strings}
    for s in settings():
        assert (s.flag or s.set_by.split()[0].rstrip(",")) in flags, s.place
        default = getattr(getattr(CompileConfig(), s.section) if s.section else CompileConfig(), s.name)
        data = {s.section: {s.name: default}} if s.section else {s.name: default}
        assert CompileConfig.from_dict(data) == CompileConfig(), s.place
    assert list(sections()) == ["calibration", "sensitivity", "allocate", "quantize", "qat", "emit"]


def test_flags_reach_their_fields_and_the_passes():
    cfg = _parse(["m", "--qat", "--qat-lr", "0.002", "--sensitivity-sequences", "3", "--no-flip-probe",
                  "--bits", "2,4", "--w-lat", "0.5", "--budget-code-bits", "3", "--target", "ort-cpu"])
    assert (cfg.qat.enabled, cfg.qat.lr, cfg.sensitivity.sequences, cfg.allocate.bits) == (True, 0.002, 3, (2, 4))
    passes = {p.name: p.options for p in analysis_passes(cfg, None) + allocation_passes(cfg)}
    assert (passes["qat"].lr, passes["sensitivity"].max_sequences, passes["sensitivity"].flips) == (0.002, 3, False)
    assert (passes["allocate"].w_lat, passes["allocate"].budget, passes["allocate"].bits) == (0.5, 3.0, (2, 4))


# -- a new setting is one new field: nothing else changes ---------------------------------------------
@dataclass(frozen=True)
class _QATWithWarmup(QATConfig):
    warmup_steps: int = setting(7, "QAT warmup steps (default {default})")


@dataclass(frozen=True)
class _Extended(CompileConfig):
    qat: _QATWithWarmup = field(default_factory=_QATWithWarmup)


def test_a_new_field_is_reachable_from_toml_flags_and_its_pass():
    """``warmup_steps`` is a QATOptions field the compile does not expose: declaring it in the qat
    section is all it takes to set it from TOML and from ``--qat-warmup-steps`` down to the pass."""
    from_toml = _Extended.from_dict({"qat": {"enabled": True, "warmup_steps": 3}})
    (qat,) = [p for p in allocation_passes(from_toml) if p.name == "qat"]
    assert qat.options.warmup_steps == 3
    from_flag = _parse(["--qat", "--qat-warmup-steps", "5"], _Extended)
    assert from_flag.qat.warmup_steps == 5
    (qat,) = [p for p in allocation_passes(from_flag) if p.name == "qat"]
    assert qat.options.warmup_steps == 5
    assert dataclasses.asdict(_Extended())["qat"]["warmup_steps"] == 7

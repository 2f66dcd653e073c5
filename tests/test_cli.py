import json
import subprocess
import sys

import pytest

from dmpq_compile.cli import build_parser, main


def test_passes_lists_builtins(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("profile", "sensitivity", "cost", "allocate", "quantize"):
        assert f"  {name} " in out
    assert "requires freq" in out


def test_inspect_saved_ir(tiny_dirs, calib_ids, tmp_path, capsys):
    from dmpq_compile.passes import PassContext, PassManager, make_pass

    from dmpq_compile.frontend import load
    from dmpq_compile.ir import save_graph

    g = PassManager([make_pass("profile"), make_pass("sensitivity", bits=(2, 4), gradvar=False),
                     make_pass("allocate", allocator="frequency", budget=3.0, bits=(2, 4, 16))]).run(
        load(tiny_dirs("mixtral")), PassContext(calibration=calib_ids("mixtral"), progress=False))
    save_graph(g, tmp_path / "ir")
    assert main(["inspect", str(tmp_path / "ir")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["layer", "expert", "freq", "mass", "dNLL@2", "dNLL@4", "bits"]
    assert len(lines) >= 1 + 2 * 4 and lines[1 + 2 * 4].startswith("experts with fewer than 8 routed calibration tokens")
    assert main(["inspect", str(tmp_path / "ir"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["bits"] for r in out["experts"]} <= {2, 4, 16} and out["storage"] is None  # an IR has no files
    assert out["rare_experts"]["min_routed_tokens"] == 8 and set(out["rare_experts"]["per_layer"]) == {"0", "1"}


def test_eval_checkpoint_on_text_folder(tiny_dirs, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_dirs("olmoe")), "--corpus", str(tiny_corpus), "--context", "32", "--no-progress",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["sets"][0]
    assert res["split"] == "all" and res["scored_tokens"] == res["windows"] * 15
    assert res["ppl"]["lo"] < res["ppl"]["value"] < res["ppl"]["hi"] and 1.0 < res["ppl"]["value"] < 200
    assert res["max_doc_share"] <= 0.15 and res["bootstrap"]["n_boot"] == 2000
    out_line = capsys.readouterr().out
    assert f"/all  ppl={res['ppl']['value']:.4f} [" in out_line and "95% bootstrap over documents" in out_line


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "not a folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "dmpq_compile.cli", "compile", "--help"], capture_output=True, check=False,
                         text=True)
    assert res.returncode == 0
    for flag in ("--target", "--budget-bits", "--budget-code-bits", "--budget-mb", "--budget-ms", "--allocator", "--w-lat"):
        assert flag in res.stdout


@pytest.mark.parametrize("argv", [["compile", "x", "-o", "y", "--budget-bits", "3", "--budget-mb", "2"]])
def test_budget_flags_are_exclusive(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_compile_config_file_and_flags(tmp_path):
    import argparse

    from dmpq_compile.commands import compile as cmd

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[compile.allocate]\nbudget_kind = \"bits\"\nbudget = 3.0\n[compile.calibration]\nsequences = 8\n"
                        "[compile.sensitivity]\nsequences = 4\n")
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    cfg = cmd.config_from_args(parser.parse_args(["m", "-o", "o", "--config", str(cfg_file)]))
    assert (cfg.allocate.budget, cfg.sensitivity.sequences, cfg.calibration.sequences, cfg.allocate.allocator) == \
        (3.0, 4, 8, "optimal")
    cfg = cmd.config_from_args(parser.parse_args(["m", "-o", "o", "--config", str(cfg_file), "--budget-mb", "2",
                                                  "--calib-sequences", "16"]))
    assert (cfg.allocate.budget_kind, cfg.allocate.budget, cfg.calibration.sequences) == ("bytes", 2 * 2**20, 16)
    assert cfg.sensitivity.sequences == 4  # the file's, where no flag was given
    cfg_file.write_text("[compile]\nbudgett = 3\n")
    with pytest.raises(ValueError, match="unknown compile setting"):
        cmd.config_from_args(parser.parse_args(["m", "-o", "o", "--config", str(cfg_file)]))


def test_every_compile_setting_has_a_flag_or_names_the_flags_that_set_it():
    """Derived from CompileConfig's fields (nothing listed here): tests/test_config.py checks the TOML side."""
    from dmpq_compile.config import settings

    sub = next(a for a in build_parser("compile")._actions if a.dest == "command").choices["compile"]
    flags = {o for a in sub._actions for o in a.option_strings}
    for s in settings():
        named = [s.flag] if s.flag else [f.split()[0] for f in s.set_by.split(", ")]
        assert set(named) <= flags, (s.place, named)

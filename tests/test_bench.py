import json
from pathlib import Path

import numpy as np
import pytest
from dmpq_compile.backends import get_backend
from dmpq_compile.passes import PassContext, PassManager, make_pass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.bench import BenchConfig, bench, format_results
from dmpq_compile.cli import main
from dmpq_compile.frontend import load


@pytest.fixture(scope="module")
def artifacts(tiny_dirs, calib_ids, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("bench")
    for bits in (16, 4):
        g = load(tiny_dirs("mixtral"))
        g.meta["group_size"] = 32
        g = PassManager([make_pass("profile"), make_pass("allocate", allocator="uniform", budget=bits),
                         make_pass("quantize", group_size=32)]).run(
            g, PassContext(calibration=calib_ids("mixtral"), progress=False))
        report = {"experts": [{"id": n.id, "freq": n.ann["freq"]} for n in g.experts()]}
        out[bits] = write_artifact(g, get_backend("ort-cpu"), root / f"u{bits}", report=report)
    return out


def test_bench_measures_every_metric(artifacts, tiny_corpus):
    cfg = BenchConfig(prefill_tokens=16, decode_tokens=4, rounds=2, corpus=str(tiny_corpus), windows=16,
                      context=32, rss=True)
    res = bench([artifacts[16], artifacts[4]], cfg, progress=False)
    fp, q = res
    for r in res:
        assert r["prefill_tok_s"] > 0 and r["decode_ms"] > 0 and r["peak_rss_mb"] > 10
        assert 1 < r["ppl"] < 200 and r["energy_mj_per_token"] > 0 and r["bandwidth_gb_s"] > 0
        (name, quality), = r["quality"].items()  # a user's corpus: one set, the whole of it
        assert name.endswith("/all") and quality["ppl"]["lo"] <= r["ppl"] <= quality["ppl"]["hi"]
        assert quality["set"]["max_doc_share"] <= 0.15
    assert "ppl_ratio" not in fp["quality"][name]  # the first artifact is the baseline
    ratio = q["quality"][name]["ppl_ratio"]  # paired: same windows, same resampled documents
    assert ratio["value"] == pytest.approx(q["ppl"] / fp["ppl"]) and ratio["lo"] <= ratio["value"] <= ratio["hi"]
    # 4-bit experts: fewer bytes on disk and fewer bytes read per token than fp32 experts
    assert q["weight_bytes"] < fp["weight_bytes"]
    assert q["read_bytes_per_token"] < fp["read_bytes_per_token"]
    assert q["bits_histogram"] == {"4": 8}  # 2 layers x 4 experts
    table = format_results(res)
    assert "(1.00x)" in table.splitlines()[1] and "decode ms/tok (mean)" in table.splitlines()[0]
    assert f"{name} ppl {fp['ppl']:.3f} [" in table


def test_decode_statistic_is_the_mean_time_per_token(monkeypatch):
    """bench's decode_ms is llama-bench's statistic: the mean over every decoded token of every round."""
    from types import SimpleNamespace

    import dmpq_compile.bench as bench_mod

    session = SimpleNamespace(keeps_logits=True, manifest={"quantization": {}, "target": {"backend": "ort-cpu"}})

    steps = [0.001, 0.001, 0.001, 0.010]  # one slow step: mean 3.25 ms, median 1 ms
    monkeypatch.setattr(bench_mod, "weight_stats", lambda *a: (_ for _ in ()).throw(bench_mod.ArtifactError("no")))
    cfg = BenchConfig(prefill_tokens=4, decode_tokens=4, corpus=None, rss=False)
    out = bench_mod._summarise(Path("x"), session, cfg, [0.1, 0.2, 0.3], steps, np.zeros((1, 4), dtype=np.int64))
    assert out["decode_ms"] == pytest.approx(3.25) and out["decode_mean_ms"] == out["decode_ms"]
    assert out["decode_median_ms"] == pytest.approx(1.0)
    assert out["prefill_tok_s"] == pytest.approx(4 / 0.2)
    assert "mean time per decoded token" in bench_mod.STATISTICS["decode_ms"]


def test_bench_cli_writes_json(artifacts, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(artifacts[16]), str(artifacts[4]), "--corpus", "none", "--rounds", "1",
                 "--decode-tokens", "2", "--prefill-tokens", "8", "--no-rss", "--no-progress",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2 and "ppl" not in data["results"][0]
    assert main(["bench", str(tmp_path)]) == 1
    assert "not an artifact folder" in capsys.readouterr().err


def test_compile_run_inspect_eval_end_to_end(tiny_dirs, tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path / "cache"))
    art = tmp_path / "art"
    assert main(["compile", str(tiny_dirs("olmoe")), "-o", str(art), "--budget-code-bits", "3", "--allocator", "optimal",
                 "--calib-corpus", str(tiny_corpus), "--calib-sequences", "4", "--seq-len", "32",
                 "--group-size", "32", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((art / "manifest.json").read_text())
    bits = [e["bits"] for e in manifest["experts"].values()]
    assert set(bits) <= {2, 4, 8, 16} and len(set(bits)) > 1
    assert main(["inspect", str(art)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("stored bits per weight:"))
    rare = next(i for i, line in enumerate(lines) if line.startswith("experts with fewer than 8 routed"))
    assert rare == 1 + len(bits)  # header + one row per expert, the rare-expert count, then the stored-bits summary
    assert all(line.startswith("  layer ") for line in lines[rare + 1:summary])
    quantized = sum(b < 16 for b in bits)
    assert lines[-4] == f"  scales: float16 ({quantized} nodes)"  # ort-cpu's default format
    assert lines[-3] == "expert dispatch: fused"  # the default, standard onnxruntime ops only
    assert lines[-2].startswith("onnxruntime-genai: genai_config.json, max_length ")
    assert lines[-1].startswith("chat template: none in the source checkpoint")  # tiny checkpoints have none
    assert main(["run", str(art), "the expert", "--max-new-tokens", "5"]) == 0
    assert main(["eval", str(art), "--corpus", str(tiny_corpus), "--context", "32", "--no-progress"]) == 0
    assert "ppl=" in capsys.readouterr().out
    # a second compile to the same folder is refused, and nothing is changed
    assert main(["compile", str(tiny_dirs("olmoe")), "-o", str(art), "--calib-corpus", str(tiny_corpus)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_infeasible_budget_names_smallest(tiny_dirs, tiny_corpus, tmp_path, capsys):
    assert main(["compile", str(tiny_dirs("mixtral")), "-o", str(tmp_path / "a"), "--budget-code-bits", "1.5",
                 "--no-sensitivity", "--calib-corpus", str(tiny_corpus), "--calib-sequences", "2",
                 "--seq-len", "16", "--no-progress", "--target", "trt-a100"]) == 1
    err = capsys.readouterr().err
    assert "infeasible" in err and "4.00 average bits" in err
    assert not (tmp_path / "a").exists()


def test_trt_artifact_without_engine_is_refused_clearly(tiny_dirs, calib_ids, tmp_path):
    g = load(tiny_dirs("qwen3_moe"))
    g.meta["group_size"] = 32
    g = PassManager([make_pass("profile"), make_pass("allocate", allocator="uniform", budget=4, bits=(4, 8, 16)),
                     make_pass("quantize", group_size=32)]).run(
        g, PassContext(calibration=calib_ids("qwen3_moe"), progress=False, backend=get_backend("trt-a100")))
    art = write_artifact(g, get_backend("trt-a100"), tmp_path / "trt")
    with pytest.raises(RuntimeError, match="without an engine.*dmpq-compile build"):
        bench([art], BenchConfig(corpus=None, rss=False), progress=False)

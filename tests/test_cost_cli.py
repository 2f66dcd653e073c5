"""``dmpq-compile cost`` command line."""

import json

from dmpq_compile.cli import main


def test_trt_shape_table_and_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["cost", "--target", "trt-a100", "--shape", "4096,14336", "--shape", "2048,1024",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4096x14336" in text and "2048x1024" in text and "2,039 GB/s" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["h"], r["bits"]) for r in rows] == [(2048, 4), (2048, 8), (2048, 16), (4096, 4), (4096, 8), (4096, 16)]
    assert all(r["decode_bound"] == "memory" for r in rows)


def test_ort_cpu_shape_and_model(tmp_path, monkeypatch, capsys, tiny_dirs):
    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path))
    args = ["cost", "--target", "ort-cpu", "--repeats", "1", "--evict-mb", "1", "--bits", "4,16"]
    assert main([*args, "--shape", "64,128"]) == 0
    assert "64x128" in capsys.readouterr().out
    assert main([*args, str(tiny_dirs("olmoe"))]) == 0
    text = capsys.readouterr().out
    assert "64x32" in text and "12 experts in 1 distinct shape(s)" in text


def test_errors_are_one_line_messages(capsys):
    assert main(["cost", "--target", "trt-a100"]) == 1
    assert "MODEL_DIR or at least one --shape" in capsys.readouterr().err
    assert main(["cost", "--target", "trt-a100", "--shape", "8,8", "--bits", "2"]) == 1
    assert "not supported" in capsys.readouterr().err
    assert main(["cost", "--target", "trt-a100", "--shape", "8,8", "--variant", "h100"]) == 1

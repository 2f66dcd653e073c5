"""Experts the calibration set never reaches: counted, priced from their weights, not sent to the
fewest bits only because calibration missed them (passes/sensitivity/rare_experts.py)."""

import json

import pytest
from dmpq_compile.passes import PassContext, PassError, PassManager, make_pass

from dmpq_compile.frontend import load


def _unrouted_case(tiny_dirs, calib_ids):
    """A tiny Qwen3-MoE (8 experts, top-2) on 4 calibration tokens, where some expert of layer 0 gets
    none; that expert's weights are scaled up (routing does not depend on them, so the calibration
    forward is unchanged): its weights alone say it is the most sensitive of its layer."""
    ids = calib_ids("qwen3_moe")[:1, :4]
    g = load(tiny_dirs("qwen3_moe"))
    g = PassManager([make_pass("profile")]).run(g, PassContext(calibration=ids, progress=False))
    unrouted = [n for n in g.experts() if n.attrs["layer"] == 0 and n.ann["tokens"] == 0]
    assert unrouted, "setup: expected an expert of layer 0 that 4 tokens never reach"
    node = unrouted[0]
    for role in ("gate", "up", "down"):
        key = node.params[role]
        g.weights.set(key, g.weights[key] * 4)
    return g, ids, node.id


@pytest.mark.parametrize("mode", ["estimate", "measured"])
def test_never_routed_expert_is_not_sent_to_lowest_bits_for_lack_of_data(tiny_dirs, calib_ids, mode):
    g, ids, unrouted = _unrouted_case(tiny_dirs, calib_ids)
    passes = [make_pass("sensitivity", bits=(2, 4), gradvar=False, min_tokens=1, rare=mode),
              make_pass("allocate", allocator="optimal", budget=3.0, bits=(2, 4))]
    g = PassManager(passes).run(g, PassContext(calibration=ids, progress=False))
    node = g.node(unrouted)
    layer = [n for n in g.experts() if n.attrs["layer"] == 0]
    assert node.ann["sensitivity_tokens"] == 0
    if mode == "measured":  # what the flag asks for: the measurement as it is, zero, so the fewest bits
        assert node.ann["kl"][2] == 0.0 and node.ann["bits"] == 2
        assert "sensitivity_estimated" not in node.ann
        return
    assert node.ann["sensitivity_estimated"] is True
    measured = [n for n in layer if n.ann["sensitivity_tokens"] >= 1]
    assert node.ann["kl"][2] > 0 and node.ann["kl"][2] >= node.ann["kl"][4] > 0
    # its weights err most at 2 bits, so it is priced above the median measured expert of its layer
    assert node.ann["kl"][2] > sorted(n.ann["kl"][2] for n in measured)[len(measured) // 2]
    assert node.ann["sensitivity"] == node.ann["kl"]
    assert node.ann["bits"] == 4  # not the lowest bit-width
    assert all("sensitivity_estimated" not in n.ann for n in measured)


def test_estimate_never_lowers_a_measurement_and_counts_per_layer(tiny_dirs, calib_ids):
    from dmpq_compile.rare_counts import rare_counts

    ids = calib_ids("qwen3_moe")[:2, :16]
    g = load(tiny_dirs("qwen3_moe"))
    ctx = PassContext(calibration=ids, progress=False)
    ref = PassManager([make_pass("profile"), make_pass("sensitivity", bits=(2, 4), gradvar=False, rare="measured")]).run(
        load(tiny_dirs("qwen3_moe")), ctx)
    g = PassManager([make_pass("profile"), make_pass("sensitivity", bits=(2, 4), gradvar=False, min_tokens=6)]).run(
        g, ctx)
    for n in g.experts():
        before = ref.node(n.id).ann
        assert all(n.ann["kl"][b] >= before["kl"][b] for b in (2, 4))
        if n.ann["sensitivity_tokens"] >= 6:
            assert n.ann["kl"] == before["kl"] and "sensitivity_estimated" not in n.ann
        else:
            assert n.ann.get("sensitivity_estimated") is True
    from dmpq_compile.compiler import expert_table

    counts = rare_counts(expert_table(g), 6)
    assert set(counts) == {0, 1}
    for layer, c in counts.items():
        rows = [n for n in g.experts() if n.attrs["layer"] == layer]
        assert c["experts"] == len(rows)
        assert c["rare"] == sum(n.ann["tokens"] < 6 for n in rows)
        assert c["unrouted"] == sum(n.ann["tokens"] == 0 for n in rows)
        assert c["estimated"] == sum(bool(n.ann.get("sensitivity_estimated")) for n in rows)


def test_compile_report_and_inspect_count_rare_experts(tiny_dirs, tiny_corpus, tmp_path, capsys):
    from dmpq_compile.cli import main

    out = tmp_path / "art"
    assert main(["compile", str(tiny_dirs("qwen3_moe")), "--target", "ort-cpu", "-o", str(out), "--no-progress",
                 "--calib-corpus", str(tiny_corpus), "--calib-sequences", "1", "--seq-len", "8",
                 "--min-routed-tokens", "3", "--no-cache"]) == 0
    report = json.loads((out / "report.json").read_text())
    rare = report["rare_experts"]
    assert rare["min_routed_tokens"] == 3 and rare["mode"] == "estimate"
    rows = report["experts"]
    total = sum(r["tokens"] < 3 for r in rows)
    assert sum(c["rare"] for c in rare["per_layer"].values()) == total > 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"experts with fewer than 3 routed calibration tokens: {total} " in text
    assert main(["inspect", str(out), "--min-routed-tokens", "0", "--json"]) == 0
    assert all(c["rare"] == 0 for c in json.loads(capsys.readouterr().out)["rare_experts"]["per_layer"].values())


def test_bad_options_are_refused():
    from dmpq_compile.compiler import CompileConfig

    with pytest.raises(ValueError, match="min-routed-tokens"):
        CompileConfig.from_dict({"sensitivity": {"min_routed_tokens": -1}})
    with pytest.raises(ValueError, match="rare-sensitivity"):
        CompileConfig.from_dict({"sensitivity": {"rare": "zero"}})
    with pytest.raises(PassError, match="rare must be one of"):
        make_pass("sensitivity", rare="zero")

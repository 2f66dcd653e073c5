"""Per-layer progress lines with an ETA (passes/infra/layer_clock.py) and per-pass CPU time."""

import logging

from dmpq_compile.passes.infra.layer_clock import LayerClock, _clock


def test_layer_clock_logs_progress_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="dmpq_compile.passes.infra.layer_clock")
    clock = LayerClock("sensitivity", 3, every=0.0)
    for label in ("L2", "L1", "L0"):
        clock.step(label)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("sensitivity: step 1/3 (L2)") and "ETA" in lines[0]
    assert lines[-1].startswith("sensitivity: step 3/3 (L0)") and lines[-1].endswith("ETA 0:00")


def test_layer_clock_rate_limits_but_always_logs_the_last_step(caplog):
    caplog.set_level(logging.INFO, logger="dmpq_compile.passes.infra.layer_clock")
    clock = LayerClock("quantize", 50, every=3600)
    for _ in range(50):
        clock.step()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["quantize: step 50/50"]


def test_clock_format():
    assert _clock(59.6) == "1:00" and _clock(3725) == "1:02:05"


def test_pass_records_carry_cpu_time(tiny_dirs, calib_ids):
    from dmpq_compile.passes import PassContext, PassManager, Timing, make_pass

    from dmpq_compile.frontend import load

    timing = Timing()
    PassManager([make_pass("profile")], [timing]).run(load(tiny_dirs("olmoe")),
                                                      PassContext(calibration=calib_ids("olmoe"), progress=False))
    (rec,) = timing.records
    assert rec.cpu_seconds is not None and rec.cpu_seconds >= 0 and rec.seconds > 0


def test_resumed_steps_count_as_done_but_not_in_the_time_a_step_costs(caplog, monkeypatch):
    from dmpq_compile.passes.infra import layer_clock

    now = [100.0]
    monkeypatch.setattr(layer_clock.time, "perf_counter", lambda: now[0])
    caplog.set_level(logging.INFO, logger="dmpq_compile.passes.infra.layer_clock")
    clock = LayerClock("sensitivity", 10, every=0.0, resumed=6)  # 6 steps loaded from an interrupted run
    now[0] += 30.0
    clock.step("backward L3")
    line = caplog.records[-1].getMessage()
    assert line.startswith("sensitivity: step 7/10 (backward L3, 6 resumed), 30 s elapsed")
    assert "30.0 s a step, ETA 1:30" in line  # 3 steps left at the one step's 30 s, not at 30 s / 7


def test_eta_weighs_steps_by_their_work_and_skipped_steps_take_no_time(caplog, monkeypatch):
    """A pass whose steps differ (a forward layer 1 unit, a backward layer 8) gets an ETA from the
    work left, not the steps left; steps another pass did (skip) count as done at no time."""
    from dmpq_compile.passes.infra import layer_clock

    now = [0.0]
    monkeypatch.setattr(layer_clock.time, "perf_counter", lambda: now[0])
    caplog.set_level(logging.INFO, logger="dmpq_compile.passes.infra.layer_clock")
    clock = LayerClock("sensitivity", 8, every=0.0, work=4 * 1 + 4 * 8)
    clock.skip(2)  # the first two forward layers came from another pass
    for _ in range(2):
        now[0] += 1.0
        clock.step("forward", 1.0)
    assert caplog.records[-1].getMessage().endswith("ETA 0:32")  # 32 units left at 1 s a unit
    now[0] += 8.0
    clock.step("backward", 8.0)
    line = caplog.records[-1].getMessage()
    assert line.startswith("sensitivity: step 5/8 (backward)") and line.endswith("ETA 0:24")

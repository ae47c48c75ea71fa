"""Timing until stable: the stopping rule on a fake clock, the spread and noisy mark of each row, the load
warning, and a sweep that measured nothing. No timing assertions on real kernels."""

from __future__ import annotations

import itertools
import json
import os

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.bench import BenchSweep, Measurement, load_warning
from toroidal.bench import sweep as sweep_module
from toroidal.runtime.timing import MIN_SAMPLES, MIN_TIME, StopRule, spread, timed_rounds
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
TINY = ["--seq-len", "16", "--d-model", "32", "--heads", "2", "--depth", "2", "--warmup", "0"]
TINY += ["--repeats", "2", "--no-isolate", "--max-time", "0"]
STEP = 1 / 16  # seconds, exact in binary: elapsed times add up without rounding


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self, durations):
        """A step that 'runs' for the next of `durations` seconds."""
        durations = iter(durations)

        def run():
            self.now += next(durations)

        return run


def no_sync():
    pass


# --- the stopping rule -----------------------------------------------------------------------------------


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([2.0, 2.0, 2.0, 2.0]) == 0
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)
    assert spread([1.0]) is None


def test_stable_runs_stop_as_soon_as_the_rule_allows():
    clock = FakeClock()
    steady = clock.step(itertools.repeat(STEP))
    (times,) = timed_rounds([steady], StopRule(3, max_time=60.0), no_sync, clock=clock)
    assert times == [STEP] * max(MIN_SAMPLES, int(MIN_TIME / STEP) + 1)  # far short of max_time


def test_stable_runs_never_stop_before_the_repeats():
    clock = FakeClock()
    steady = clock.step(itertools.repeat(STEP))
    (times,) = timed_rounds([steady], StopRule(12, max_time=60.0), no_sync, clock=clock)
    assert len(times) == 12


def test_noisy_runs_go_on_until_max_time():
    clock = FakeClock()
    noisy = clock.step(itertools.cycle([STEP, 4 * STEP]))
    (times,) = timed_rounds([noisy], StopRule(3, max_time=5.0), no_sync, clock=clock)
    assert sum(times[:-1]) < 5.0 <= sum(times)  # stopped by the first run past max_time
    assert spread(times) > 0.1


def test_max_time_never_cuts_the_repeats_and_zero_means_exactly_the_repeats():
    clock = FakeClock()
    slow = clock.step(itertools.cycle([1.0, 3.0]))
    (times,) = timed_rounds([slow], StopRule(4, max_time=2.0), no_sync, clock=clock)
    assert len(times) == 4
    steady = clock.step(itertools.repeat(STEP))
    (times,) = timed_rounds([steady], StopRule(7, max_time=0.0), no_sync, clock=clock)
    assert len(times) == 7


def test_paired_rounds_alternate_and_wait_for_the_noisiest_series():
    clock, order = FakeClock(), []

    def traced(name, durations):
        run = clock.step(durations)
        return lambda: (order.append(name), run())

    row = traced("row", itertools.repeat(STEP))
    baseline = traced("base", itertools.cycle([STEP, 3 * STEP]))  # never stable
    rule = StopRule(2, max_time=3.0)
    times, base = timed_rounds([row, baseline], rule, no_sync, made=[[STEP]], clock=clock)
    assert order[:3] == ["base", "row", "base"]  # the row's first run was made before: round one skips it
    assert len(times) == len(base) and sum(times) + sum(base) - STEP >= 3.0  # went on to max_time
    assert spread(times) == 0 and spread(base) > 0.1


# --- rows: spread, noisy, the table ----------------------------------------------------------------------


STEADY, VARYING = [0.001] * 6, [0.001, 0.004, 0.001, 0.006, 0.002, 0.001]


def _fake_measure(case, timing):
    """sdpa: steady runs and baselines; reference: varying runs; blockwise: a varying baseline."""
    times = VARYING if case.backend == "reference" else STEADY
    torus = VARYING if case.backend == "blockwise" else [0.0005] * 6
    return Measurement(times, None, None, baseline_times={"sdpa_torus": torus, "sdpa_standard": STEADY})


def _table_line(stdout: str, backend: str) -> str:
    return next(line for line in stdout.splitlines() if line.strip("│ ").startswith(backend))


def test_noisy_rows_are_marked_in_the_json_and_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "measure_toroidal", _fake_measure)
    out = tmp_path / "bench.json"
    args = ["bench", *TINY, "--backend", "sdpa,reference,blockwise", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = read_result(out, command="bench")
    rows = {row["backend"]: row for row in record["rows"]}
    steady, varying = spread(STEADY), spread(VARYING)
    assert (rows["sdpa"]["runs"], rows["sdpa"]["spread"], rows["sdpa"]["baseline_spread"]) == (6, 0, 0)
    assert rows["sdpa"]["noisy"] is False
    assert varying > 0.1 and rows["reference"]["spread"] == pytest.approx(varying)
    assert rows["reference"]["noisy"] is True
    assert rows["blockwise"]["spread"] == steady and rows["blockwise"]["baseline_spread"] == pytest.approx(
        varying
    )
    assert rows["blockwise"]["noisy"] is True  # its ratios rest on a noisy baseline
    assert record["summary"]["noisy"] == 2 and record["config"]["max_time"] == 0
    json.dumps(record)  # plain JSON

    assert "spread" in result.stdout and "~" not in _table_line(result.stdout, "sdpa")
    reference, blockwise = _table_line(result.stdout, "reference"), _table_line(result.stdout, "blockwise")
    assert f"{varying * 100:.1f}% ~" in reference and reference.count("~") == 1  # the spread, not the ratios
    assert "0.0% ~" not in blockwise and blockwise.count("~") == 2  # both ratios, not the spread
    assert "2 rows were noisy (spread > 10%, marked ~): rerun on a quieter machine or raise --max-time" in (
        " ".join(result.stdout.split())
    )


def test_a_failed_baseline_leaves_the_others_to_judge(monkeypatch):
    def measure(case, timing):
        baselines = {"sdpa_torus": [0.001, 0.003, 0.001, 0.004], "sdpa_standard": "RuntimeError: no room"}
        return Measurement([0.002] * 4, None, None, baseline_times=baselines)

    monkeypatch.setattr(sweep_module, "measure_toroidal", measure)
    sweep = BenchSweep(backend=["sdpa"], seq_len=[16], depth=[2], heads=[2], d_model=[32], isolate=False)
    (row,) = sweep_module.run_sweep(sweep).rows
    assert row["spread"] == 0 and row["baseline_spread"] == pytest.approx(
        spread([0.001, 0.003, 0.001, 0.004])
    )
    assert row["noisy"] is True and "sdpa_standard failed" in row["reason"]


def test_the_noisy_threshold_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "measure_toroidal", _fake_measure)
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", *TINY, "--backend", "reference", "--noisy", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = read_result(out, command="bench")["rows"]
    assert row["noisy"] is False and "was noisy" not in result.stdout and "~" not in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"), [(["--max-time", "-1"], "--max-time"), (["--noisy", "0"], "noisy")]
)
def test_bad_timing_settings_are_one_line_errors(args, fragment):
    assert_one_line_error(runner.invoke(app, ["bench", *TINY, *args]), fragment)


# --- the load warning and a sweep that measured nothing ---------------------------------------------------


def test_a_loaded_machine_gets_one_warning_line_on_stderr(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    result = runner.invoke(app, ["bench", *TINY, "--backend", "sdpa", "--threads", "2"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "load average" in line]
    assert len(warnings) == 1 and "9.5" in warnings[0] and "2 thread(s)" in warnings[0]
    assert "load average" not in result.stdout

    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    result = runner.invoke(app, ["bench", *TINY, "--backend", "sdpa", "--threads", "2"])
    assert result.exit_code == 0 and "load average" not in result.output


def test_the_load_warning_is_for_cpu_sweeps_and_readable_load_averages(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    assert "64.0" in load_warning(BenchSweep(threads=4))
    assert load_warning(BenchSweep(threads=4, device="cuda")) is None

    def unreadable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unreadable)
    assert load_warning(BenchSweep(threads=4)) is None


def test_a_sweep_that_measured_nothing_exits_non_zero_without_out(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    result = runner.invoke(app, ["bench", *TINY, "--backend", "flash2"])
    assert_one_line_error(result, "toroidal bench: nothing was measured", "skipped or failed (1 skipped)")
    assert "flash" in result.stdout  # the skip reason is shown

"""`toroidal bench` and `toroidal.bench`: rows, skips, OOM, presets, compare, errors. No timing assertions."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, small_cpu_default
from typer.testing import CliRunner

import toroidal.bench as bench
from toroidal.bench import BenchCase, BenchSweep, ForkWorker, WorkerDied, attention_flops, measure
from toroidal.functional import selected_backend as chosen_backend
from toroidal.kernels import BackendUnavailable
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
# Tiny shapes: head dim 16, platter width 8. --no-isolate where peak memory is not the point (no worker).
TINY = [
    "--seq-len",
    "16",
    "--d-model",
    "32",
    "--heads",
    "2",
    "--depth",
    "2",
    "--warmup",
    "0",
    "--repeats",
    "2",
    "--max-time",
    "0",
]
ROW_FIELDS = {
    *bench.KEY_FIELDS,
    *bench.METRIC_FIELDS,
    *bench.TELEMETRY_FIELDS,
    "chosen",
    "status",
    "reason",
    "mechanism_metrics",
    "estimated_memory_mb",
    "platter_tokens",
    "memory_method",
}


def invoke(*args: str):
    return runner.invoke(app, ["bench", *args])


def run_to_json(tmp_path: Path, *args: str, name: str = "bench.json") -> dict:
    out = tmp_path / name
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    return read_result(out, command="bench")


# --- end to end -----------------------------------------------------------------------------------------


def test_isolated_sweep_writes_rows_with_every_field(tmp_path):
    record = run_to_json(tmp_path, *TINY, "--seq-len", "16,32", "--backend", "auto,sdpa,flash2")
    rows = record["rows"]
    assert [(r["backend"], r["seq_len"]) for r in rows] == [
        (b, n) for n in (16, 32) for b in ("auto", "sdpa", "flash2")
    ]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert (row["batch"], row["heads"], row["d_model"], row["head_dim"], row["depth"]) == (
            1,
            2,
            32,
            16,
            2,
        )
    ok = [r for r in rows if r["backend"] != "flash2"]
    for row in ok:
        assert row["status"] == "ok" and row["chosen"] == (
            small_cpu_default() if row["backend"] == "auto" else "sdpa"
        )
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        for metric in (
            "tokens_per_s",
            "tflops",
            "overhead",
            "vs_standard",
            "sdpa_torus_ms",
            "sdpa_standard_ms",
        ):
            assert row[metric] > 0, metric
        assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] >= 0  # forked worker's RSS
        assert row["gpu_name"] is None  # CPU: no telemetry
    skipped = [r for r in rows if r["backend"] == "flash2"]
    assert all(
        r["status"] == "skipped" and "flash" in r["reason"] and r["median_ms"] is None for r in skipped
    )
    assert record["summary"]["ok"] == 4 and record["summary"]["skipped"] == 2
    assert any("telemetry" in note for note in record["summary"]["notes"])
    assert record["config"]["seq_len"] == [16, 32] and record["command"]["argv"][:2] == ["toroidal", "bench"]


def test_table_and_skip_reasons_on_the_terminal():
    result = invoke(*TINY, "--no-isolate", "--backend", "auto,flex,flash2", "--mode", "fwd+bwd")
    assert result.exit_code == 0, result.output
    for header in ("backend", "median ms", "tokens/s", "TFLOP/s", "peak MiB", "× SDPA(L)", "reason"):
        assert header in result.stdout
    assert "auto→sdpa" in result.stdout
    assert "forward-only" in result.stdout  # flex on CPU cannot train
    assert "1 ok, 2 skipped" in result.stdout


def test_skipped_rows_carry_the_backend_reason_and_measuring_nothing_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # no load warning on stderr
    out = tmp_path / "bench.json"
    result = invoke(*TINY, "--no-isolate", "--backend", "flex,flash2", "--mode", "fwd+bwd", "--out", str(out))
    assert_one_line_error(result, "nothing was measured: every row was skipped or failed (2 skipped)", "in ")
    assert str(out) in " ".join(result.stderr.split())  # where the rows and their reasons went
    assert "forward-only" in result.stdout  # the table with the reasons came first
    record = read_result(out, command="bench")  # and the result was still written
    assert record["summary"]["ok"] == 0 and record["summary"]["skipped"] == 2
    reasons = {row["backend"]: row["reason"] for row in record["rows"]}
    assert all(row["status"] == "skipped" for row in record["rows"])
    assert "forward-only" in reasons["flex"]
    assert "flash" in reasons["flash2"]


def test_shapes_that_cannot_exist_are_skipped_rows(tmp_path):
    record = run_to_json(tmp_path, *TINY, "--no-isolate", "--backend", "sdpa", "--depth", "2,3")
    by_depth = {row["depth"]: row for row in record["rows"]}
    assert by_depth[2]["status"] == "ok"
    assert by_depth[3]["status"] == "skipped" and "does not divide" in by_depth[3]["reason"]


def test_memory_budget_skips_materializing_rows_with_the_estimate(tmp_path):
    record = run_to_json(
        tmp_path, *TINY, "--no-isolate", "--backend", "reference,blockwise", "--memory-budget-gb", "0.00001"
    )
    rows = {row["backend"]: row for row in record["rows"]}
    assert rows["reference"]["status"] == "skipped" and "GiB" in rows["reference"]["reason"]
    assert rows["blockwise"]["status"] == "ok"  # tiled: nothing (L x L) to budget


def test_out_of_memory_becomes_an_oom_row(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(measure, "timed_rounds", out_of_memory)  # the timed runs
    monkeypatch.setattr(measure, "timed_run", out_of_memory)  # a first run inside the memory measurement
    out = tmp_path / "bench.json"
    result = invoke(*TINY, "--no-isolate", "--backend", "sdpa,blockwise", "--out", str(out))
    assert result.exit_code == 1 and "nothing was measured" in result.stderr  # every row failed
    record = read_result(out, command="bench")
    assert [row["status"] for row in record["rows"]] == ["oom", "oom"]
    assert "Tried to allocate" in record["rows"][0]["reason"]
    assert record["summary"]["oom"] == 2


# --- config files and presets ---------------------------------------------------------------------------


def test_preset_by_name_with_flags_overriding_it(tmp_path):
    record = run_to_json(tmp_path, "--config", "quick", *TINY, "--no-isolate", "--backend", "sdpa")
    assert Path(record["config"]["config_file"]).name == "quick.yaml"
    assert record["config"]["lambda"] == [0.1] and record["config"]["causal"] == [True]  # from the preset
    assert [row["seq_len"] for row in record["rows"]] == [16]  # the flag won


def test_no_config_means_the_quick_preset(tmp_path):
    record = run_to_json(tmp_path, *TINY, "--no-isolate", "--backend", "sdpa")
    assert Path(record["config"]["config_file"]).name == "quick.yaml"


def test_yaml_file_with_dashed_and_snake_keys(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(
        "backend: [sdpa, blockwise]\nseq-len: 8, 16\nhead_dim: 8\nheads: 2\ndepth: 2\n"
        "mode: fwd+bwd\ncausal: false\nwindow: none\nwarmup: 0\nrepeats: 1\nisolate: false\n"
    )
    record = run_to_json(tmp_path, "--config", str(config))
    rows = record["rows"]
    assert len(rows) == 4 and {row["status"] for row in rows} == {"ok"}
    assert {(row["d_model"], row["head_dim"], row["causal"], row["mode"]) for row in rows} == {
        (16, 8, False, "fwd+bwd")
    }
    # A width flag replaces the file's width, whichever key it used.
    record = run_to_json(
        tmp_path, "--config", str(config), "--d-model", "32", "--seq-len", "8", name="b.json"
    )
    assert {row["head_dim"] for row in record["rows"]} == {16}


def test_presets_parse():
    from toroidal_cli.commands.bench import build_sweep, read_options

    for name in ("quick", "cpu-scaling", "gpu"):
        flags = {"device": "cpu"}  # the gpu preset on this machine: only its values are checked
        sweep = build_sweep(read_options(name, flags, None))
        assert sweep.cases(), name
    assert len(build_sweep(read_options("quick", {}, None)).cases()) == 12


# --- compare and regressions ------------------------------------------------------------------------------


def _edited_copy(tmp_path: Path, record: dict, median_ms: float) -> Path:
    old = json.loads(json.dumps(record))
    for row in old["rows"]:
        row["median_ms"] = median_ms
    path = tmp_path / f"old-{median_ms:g}.json"
    path.write_text(json.dumps(old))
    return path


def test_compare_prints_deltas_and_fails_only_on_a_regression(tmp_path):
    args = [*TINY, "--no-isolate", "--backend", "sdpa"]
    record = run_to_json(tmp_path, *args)

    faster_before = _edited_copy(tmp_path, record, 1e-9)
    result = invoke(*args, "--compare", str(faster_before), "--fail-on-regression", "10")
    assert result.exit_code == 1, result.output
    assert "Δ time" in result.stdout and "Δ memory" in result.stdout and "regression" in result.stdout

    slower_before = _edited_copy(tmp_path, record, 1e9)
    result = invoke(*args, "--compare", str(slower_before), "--fail-on-regression", "10")
    assert result.exit_code == 0, result.output
    assert "-100.0%" in result.stdout and "no row slower" in result.stdout

    result = invoke(*args, "--seq-len", "8", "--compare", str(faster_before))  # no matching row
    assert result.exit_code == 0 and "only in the old result" in result.stdout


def test_fail_on_regression_needs_compare():
    assert_one_line_error(invoke(*TINY, "--fail-on-regression", "5"), "--fail-on-regression needs --compare")


@pytest.mark.parametrize("rows", ["x", [1, 2]])
def test_compare_with_malformed_rows_fails_before_running(tmp_path, monkeypatch, rows):
    record = run_to_json(tmp_path, *TINY, "--no-isolate", "--backend", "reference", name="old.json")
    record["rows"] = rows
    old = tmp_path / "old.json"
    old.write_text(json.dumps(record))
    monkeypatch.setattr(bench, "run_sweep", lambda *a, **k: pytest.fail("the sweep ran"))  # read at run time
    assert_one_line_error(invoke(*TINY, "--compare", str(old)), "has no list of 'rows'")


def test_compare_with_a_missing_file_fails_before_running(tmp_path):
    assert_one_line_error(invoke(*TINY, "--compare", str(tmp_path / "nope.json")), "does not exist")


def test_an_out_path_that_cannot_be_written_fails_before_running(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    # Running would be a failure: the sweep must not start.
    monkeypatch.setattr(bench, "run_sweep", lambda *a, **k: pytest.fail("the sweep ran"))  # read at run time
    result = invoke(*TINY, "--out", str(blocker / "sub" / "run.json"))
    assert_one_line_error(result, "cannot write --out", "is not a folder")
    assert blocker.read_text() == "kept"


# --- bad values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--backend", "nope"], ["unknown backend 'nope'", "sdpa"]),
        (["--seq-len", "abc"], ["--seq-len", "'abc'", "integer"]),
        (["--seq-len", "-5"], ["--seq-len", "'-5'"]),
        (["--batch", "0"], ["--batch"]),
        (["--depth", "3"], ["depth 3 does not divide the head dim 16"]),
        (["--dtype", "fp8"], ["unknown dtype 'fp8'"]),
        (["--mode", "sideways"], ["unknown mode 'sideways'", "fwd+bwd"]),
        (["--window", "-1"], ["--window"]),
        (["--lambda", "x"], ["--lambda", "number"]),
        (["--repeats", "0"], ["--repeats"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
        (["--head-dim", "16"], ["mutually exclusive"]),
        (["--config", "no-such-preset"], ["unknown bench preset", "quick"]),
        (["--config", "missing/file.yaml"], ["does not exist"]),
        (["--mechanism", "nope"], ["unknown mechanism 'nope'", "standard"]),
        (["--option", "budget"], ["--option", "NAME=VALUES"]),
        (["--option", "depth=2"], ["depth", "sweep axes", "own flags"]),
        (["--mechanism", "standard", "--option", "budget=2"], ["budget", "not accepted", "standard"]),
    ],
)
def test_bad_values_are_one_line_errors(args, fragments):
    assert_one_line_error(invoke(*TINY, *args), "toroidal bench:", *fragments)


def test_a_config_that_is_not_utf8_is_a_one_line_error(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("d\xe9pth: 2\n".encode("latin-1"))
    assert_one_line_error(invoke(*TINY, "--config", str(config)), "not UTF-8")


def test_a_nan_regression_threshold_is_refused(tmp_path):
    run_to_json(tmp_path, *TINY, "--no-isolate", "--backend", "reference", name="old.json")
    result = invoke(*TINY, "--compare", str(tmp_path / "old.json"), "--fail-on-regression", "nan")
    assert_one_line_error(result, "--fail-on-regression nan")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_one_line_error():
    assert_one_line_error(invoke(*TINY, "--device", "cuda"), "not available", "--device cpu")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("seq_len: [16\n", "not valid YAML"),
        ("sequence: 16\n", "unknown key(s) sequence"),
        ("- 16\n", "must be a mapping"),
        ("seq_len: [abc]\n", "seq_len in"),
        ("d_model: 32\nhead_dim: 16\n", "mutually exclusive"),
    ],
)
def test_bad_yaml_is_a_one_line_error(tmp_path, text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert_one_line_error(invoke("--config", str(config)), fragment)


# --- library pieces ----------------------------------------------------------------------------------------


def test_chosen_backend_matches_what_auto_picks():
    q = torch.randn(1, 2, 16, 16)
    assert chosen_backend(q, q, q, depth=2, causal=True) == small_cpu_default()
    assert chosen_backend(q, q, q, depth=2, backend="blockwise") == "blockwise"
    case = BenchCase("auto", seq_len=16, depth=2, batch=1, heads=2, d_model=32)
    assert bench.case_backend(case) == small_cpu_default()
    with pytest.raises(BackendUnavailable):
        bench.case_backend(BenchCase("flash2", seq_len=16, depth=2, batch=1, heads=2, d_model=32))


def test_effective_flops_follow_the_flash_attention_convention():
    case = BenchCase("sdpa", seq_len=8, depth=2, batch=3, heads=4, d_model=64, causal=False)  # L=16, w=8
    assert attention_flops(case) == 4 * 3 * 4 * 16 * 16 * 8
    causal = BenchCase("sdpa", seq_len=8, depth=2, batch=3, heads=4, d_model=64, causal=True)
    assert attention_flops(causal) == attention_flops(case) / 2
    training = BenchCase(
        "sdpa", seq_len=8, depth=2, batch=3, heads=4, d_model=64, causal=False, mode="fwd+bwd"
    )
    assert attention_flops(training) == 3.5 * attention_flops(case)


def test_sweep_is_the_cartesian_product_backends_innermost():
    sweep = BenchSweep(backend=["sdpa", "auto"], seq_len=[8, 16], head_dim=[8, 16], heads=[2])
    cases = sweep.cases()
    assert len(cases) == 8
    assert [c.backend for c in cases[:2]] == ["sdpa", "auto"] and cases[0].seq_len == cases[1].seq_len
    assert {c.d_model for c in cases} == {16, 32}
    with pytest.raises(ValueError, match="not both"):
        BenchSweep(d_model=[32], head_dim=[16])


def _die_by_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(not bench.can_isolate(), reason="isolation needs Linux")
def test_fork_worker_returns_results_and_reports_failures(monkeypatch):
    # The worker imports this module (and the helpers it imports) to run `_die_by_sigkill`.
    here = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(here.parent)]))
    torch.randn(1 << 20).exp_()  # OpenMP used here first: the worker's forks must still work
    with ForkWorker() as worker:
        assert worker.call(dict, n=1) == {"n": 1}
        with pytest.raises(MemoryError) as caught:
            worker.call(bytearray, source=1 << 62)
        assert bench.is_out_of_memory(caught.value)
        with pytest.raises(WorkerDied) as died:
            worker.call(_die_by_sigkill)
        assert "SIGKILL" in str(died.value) and bench.is_out_of_memory(died.value)
        assert worker.call(dict, n=2) == {"n": 2}  # the worker outlives its forks


def test_in_process_rows_do_not_inherit_cached_masks():
    from toroidal.kernels import get_backend
    from toroidal_cli.commands.bench import build_sweep, read_options

    sweep = build_sweep(read_options(None, {"backend": "sdpa", "isolate": False}, "quick") | {"seq_len": [8]})
    sweep.warmup, sweep.repeats, sweep.max_time = 0, 1, 0.0
    bench.run_sweep(sweep)
    assert not get_backend("sdpa")._cache


def test_paired_timing_alternates_the_row_with_its_baselines():
    calls = []

    def factory(name):
        def make_step(device):
            return lambda: calls.append(name)

        return make_step

    def failing(device):
        raise RuntimeError("no room")

    timing = measure.Timing(warmup=2, repeats=3)
    measured = measure.measure_steps(factory("row"), timing, {"base": factory("base"), "broken": failing})
    assert calls == ["row"] * 2 + ["base"] * 2 + ["row", "base"] * 3
    assert len(measured.times) == 3 and len(measured.baseline_times["base"]) == 3
    assert measured.baseline_times["broken"] == "RuntimeError: no room"


@pytest.mark.parametrize("paired", ["--paired", "--no-paired"])
def test_rows_carry_both_ratios_paired_or_not(tmp_path, paired):
    record = run_to_json(tmp_path, *TINY, "--no-isolate", "--backend", "sdpa", paired)
    row = record["rows"][0]
    assert row["status"] == "ok" and row["reason"] is None
    assert row["overhead"] > 0 and row["vs_standard"] > 0
    assert row["sdpa_torus_ms"] > 0 and row["sdpa_standard_ms"] > 0
    assert record["config"]["paired"] is (paired == "--paired")


def test_without_baselines_rows_have_times_but_no_ratios(tmp_path):
    record = run_to_json(tmp_path, *TINY, "--no-isolate", "--backend", "sdpa", "--no-baselines")
    row = record["rows"][0]
    assert row["status"] == "ok" and row["median_ms"] > 0
    assert row["overhead"] is row["vs_standard"] is row["sdpa_torus_ms"] is None
    assert record["config"]["baselines"] is False

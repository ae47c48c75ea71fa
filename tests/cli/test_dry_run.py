"""`--dry-run` on every command (resolved settings, their sources, the memory estimate; nothing run or
written) and the fail-fast refusal of runs whose estimated peak memory does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.runtime import memory
from toroidal_cli.app import app
from toroidal_cli.results import make_record, write_result

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
DONE = "dry run: nothing was run or written"
MICRO = ["--model", "micro", "--seq-len", "32", "--batch-size", "2"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def files_under(folder) -> set:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def row(output: str, key: str) -> str:
    """The table line of setting `key`."""
    return next(line for line in output.splitlines() if line.startswith(f"│ {key} "))


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(memory.LIMIT_VARIABLE, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "micro"
    result = invoke(
        "train", *MICRO, "--steps", "1", "--eval-batches", "1", "--device", "cpu", "--out", str(folder)
    )
    assert result.exit_code == 0, result.output
    return folder


def test_train_dry_run_shows_each_value_with_its_source_and_writes_nothing(workdir):
    (workdir / "exp.yaml").write_text("seq_len: 64\nbatch_size: 4\nlambda: 0.3\n")
    before = files_under(workdir)
    result = invoke("train", "--config", "exp.yaml", "--model", "micro", "--batch-size", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "flag" in row(result.output, "batch_size") and "│ 2 " in row(result.output, "batch_size")
    assert "config exp.yaml" in row(result.output, "seq_len") and "64" in row(result.output, "seq_len")
    assert "config exp.yaml" in row(result.output, "lambda_distance")
    assert "default" in row(result.output, "depth")
    assert "memory: estimated peak" in result.output and "available on cpu" in result.output
    assert DONE in result.output
    assert files_under(workdir) == before  # no run folder, no runs/


def test_eval_dry_run_of_a_model_and_of_a_checkpoint(workdir, run_folder):
    result = invoke("eval", *MICRO, "--attention", "toroidal", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "memory: estimated peak" in result.output and DONE in result.output
    result = invoke("eval", "--checkpoint", str(run_folder), "--batch-size", "3", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "checkpoint" in row(result.output, "seq_len") and "32" in row(result.output, "seq_len")
    assert "flag" in row(result.output, "batch_size")
    assert files_under(workdir) == set()


def test_bench_and_profile_dry_runs_estimate_without_measuring(workdir):
    result = invoke("bench", "--dry-run", "-n", "128,256", "-b", "sdpa,reference", "--out", "b.json")
    assert result.exit_code == 0, result.output
    assert "flag" in row(result.output, "seq_len") and "preset quick" in row(result.output, "heads")
    assert "memory: 4 of 4 rows estimated; the largest" in result.output
    assert "(reference N=256" in result.output
    (workdir / "sweep.yaml").write_text("seq_len: 64\ndepth: 2\n")
    result = invoke("bench", "--config", "sweep.yaml", "--dry-run")
    assert "config sweep.yaml" in row(result.output, "seq_len") and "default" in row(result.output, "heads")
    result = invoke("profile", "-n", "64", "--d-model", "64", "--heads", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "memory: estimated peak" in result.output and DONE in result.output
    assert files_under(workdir) == {Path("sweep.yaml")}  # no b.json


def test_the_other_commands_dry_run_too(workdir, run_folder):
    bench_result = workdir / "bench.json"
    write_result(bench_result, make_record("bench", {}, {"rows": [{"status": "ok"}]}))
    before = files_under(workdir)
    for args in (
        ["validate", "-b", "sdpa"],
        ["plot", "attention", "--out", "a.png", "--seq-len", "8"],
        ["plot", "bench", str(bench_result), "--out", "b.png"],
        ["plot", "train", str(run_folder), "--out", "t.png"],
        ["longbench", *MICRO[:2], "--tasks", "passkey", "--lengths", "256"],
        ["scrolls", *MICRO[:2], "--tasks", "quality"],
    ):
        result = invoke(*args, "--dry-run")
        assert result.exit_code == 0, (args, result.output)
        assert DONE in result.output, args
    assert files_under(workdir) == before


# --- fail fast on size -----------------------------------------------------------------------------


def test_train_eval_and_profile_refuse_a_run_that_does_not_fit(workdir, monkeypatch):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.04")  # 41 MiB: room for the micro model at small sizes only
    result = invoke("train", "--model", "micro", "--seq-len", "256", "--batch-size", "64", "--out", "run")
    assert_one_line_error(result, "estimated peak memory", "exceeds the 41 MiB available on cpu", "fits (~")
    assert "--batch-size" in result.stderr and memory.LIMIT_VARIABLE in result.stderr
    assert not (workdir / "run").exists()

    result = invoke("eval", "--model", "micro", "--seq-len", "256", "--batch-size", "256")
    assert_one_line_error(result, "estimated peak memory", "available on cpu")

    result = invoke("profile", "-n", "2048", "-b", "reference", "--heads", "8", "--d-model", "256")
    assert_one_line_error(result, "estimated peak memory", "--batch 1 --seq-len")

    result = invoke("train", "--model", "micro", "--seq-len", "256", "--batch-size", "64", "--dry-run")
    assert result.exit_code == 0 and "would be refused: estimated peak memory" in result.output
    assert files_under(workdir) == set()


def test_a_malformed_memory_limit_is_a_user_error(workdir, monkeypatch):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "plenty")
    result = invoke("train", "--model", "micro", "--dry-run")
    assert_one_line_error(result, memory.LIMIT_VARIABLE, "number of GiB")

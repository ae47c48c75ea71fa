"""The same command with the same seed on the same machine writes the same metrics JSON, timings and
timestamps aside (`toroidal_cli.results.VOLATILE_KEYS`)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from toroidal_cli.app import app
from toroidal_cli.results import VOLATILE_KEYS, without_volatile

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
MICRO = ["--model", "micro", "--seq-len", "16", "--batch-size", "4", "--seed", "3", "--device", "cpu"]


def run_twice(args: list[str], written) -> tuple[dict, dict]:
    """Run the command twice (clearing its output in between) and load what it wrote each time."""
    records = []
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        records.append(json.loads(written().read_text()))
    return records[0], records[1]


def test_train_twice_writes_the_same_metrics(tmp_path):
    run = tmp_path / "run"
    args = ["train", *MICRO, "--attention", "toroidal", "--steps", "4", "--eval-every", "2"]
    args += ["--eval-batches", "2", "--warmup-steps", "1", "--out", str(run)]

    def metrics():
        path = run / "metrics.json"
        copy = tmp_path / f"metrics-{len(list(tmp_path.glob('metrics-*')))}.json"
        shutil.copy(path, copy)
        shutil.rmtree(run)  # the same --out again: a run folder must be new
        return copy

    first, second = run_twice(args, metrics)
    assert first["created"] and first["timing"]["wall_time_s"] is not None  # what is left out exists
    assert without_volatile(first) == without_volatile(second)
    assert len(first["loss_curve"]) == 4 and first["validation"]  # and what is compared is the run


def test_eval_twice_writes_the_same_metrics(tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", *MICRO, "--attention", "toroidal", "--max-batches", "2", "--out", str(out)]
    first, second = run_twice(args, lambda: out)
    assert without_volatile(first) == without_volatile(second)
    assert first["metrics"]["loss"] == second["metrics"]["loss"]  # exactly, not approximately


def test_only_timestamps_and_timings_are_volatile():
    record = {"created": "now", "metrics": {"loss": 1.0, "seconds": 2.0, "tokens_per_s": 3.0}, "rows": [{}]}
    assert without_volatile(record) == {"metrics": {"loss": 1.0}, "rows": [{}]}
    assert {"loss", "perplexity", "loss_curve", "validation", "config"}.isdisjoint(VOLATILE_KEYS)

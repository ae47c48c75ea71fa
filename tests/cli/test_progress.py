"""Progress without a terminal: plain lines on stderr (rate-limited, the first and the last always)
for bench rows, train steps, eval samples and validate checks; stdout keeps only the results.
CliRunner's streams are not terminals. Also: tokens/s is written one way by every command."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from toroidal_cli import render
from toroidal_cli.app import app
from toroidal_cli.progress import LINE, Progress

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
RATE = re.compile(r"^(\d{1,3}(,\d{3})*|\d+(\.\d+)?)$")  # '83,012' or '12.3'


def progress_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{command}: ")]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_rate_limited_keeping_the_first_and_the_last(capsys):
    clock = Clock()
    with Progress("bench", "row", total=5, plain=True, per_second=2, clock=clock) as progress:
        for row in range(1, 6):
            progress.running(f"case {row}")  # no line: the bar's label only
            progress.advance(f"row {row} done")
            clock.now += 0.3  # rows 2 and 4 come under 0.5 s after the last line shown
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["bench: row 1/5 row 1 done", "bench: row 3/5 row 3 done", "bench: row 5/5 row 5 done"]
    assert all(LINE.match(line) for line in lines)


def test_the_newest_line_is_shown_when_the_work_ends_early(capsys):
    clock = Clock()
    with Progress("eval", "sample", plain=True, clock=clock) as progress:
        progress.update(8, total=64)
        progress.update(16, total=64)  # at once: held back...
    assert capsys.readouterr().err.splitlines() == ["eval: sample 8/64", "eval: sample 16/64"]  # ...not lost


def test_tokens_per_second_format():
    shown = [render.format_tokens_per_s(v) for v in (None, 0.5, 12.34, 99.9, 100.4, 83012.4, 1.5e7)]
    assert shown == ["-", "0.5", "12.3", "99.9", "100", "83,012", "15,000,000"]


def test_bench_rows_as_lines_on_stderr_and_the_table_on_stdout():
    args = ["bench", "-b", "sdpa", "-n", "16,32", "--depth", "1", "--heads", "1", "--d-model", "8"]
    result = runner.invoke(app, [*args, "--warmup", "0", "--repeats", "1", "--no-paired", "--max-time", "0"])
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "bench")
    assert lines[0].startswith("bench: row 1/2 sdpa N=16 D=1 fp32 fwd ") and lines[0].endswith(" tok/s")
    assert lines[-1].startswith("bench: row 2/2 sdpa N=32 D=1 fp32 fwd ")
    assert "bench: row" not in result.stdout and "toroidal bench on cpu" in result.stdout
    cells = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│ sdpa")]
    header = next(line.split("┃") for line in result.stdout.splitlines() if "tokens/s" in line)
    column = [name.strip() for name in header].index("tokens/s")
    assert len(cells) == 2 and all(RATE.match(row[column].strip()) for row in cells), cells
    assert re.search(r", (\d{1,3}(,\d{3})*|\d+(\.\d+)?) tok/s$", lines[0])  # the same format in the line


def test_validate_checks_as_lines():
    result = runner.invoke(app, ["validate", "--quick", "--backend", "sdpa"])
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "validate")
    assert lines[0].startswith("validate: check 1/") and re.search(r": \d+ pass", lines[0])
    total = lines[0].split()[2].split("/")[1]
    assert lines[-1].startswith(f"validate: check {total}/{total} ")
    assert "validate: check" not in result.stdout and "all checks pass" in result.stdout


def test_train_steps_and_eval_samples_as_lines(tmp_path):
    run = tmp_path / "run"
    flags = ["--model", "micro", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
    trained = runner.invoke(app, ["train", *flags, "--steps", "3", "--eval-every", "0", "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    lines = progress_lines(trained.stderr, "train")
    assert lines[0].startswith("train: step 1/3 loss ") and lines[-1].startswith("train: step 3/3 loss ")
    assert all(re.search(r"  \S+ tok/s$", line) for line in lines)
    assert "train: step" not in trained.stdout
    rate = next(line for line in trained.stdout.splitlines() if "tokens/s" in line).split("│")[2].strip()
    assert RATE.match(rate), rate

    args = ["eval", "--checkpoint", str(run), "--max-batches", "1", "--batch-size", "2"]
    evaluated = runner.invoke(app, args)
    assert evaluated.exit_code == 0, evaluated.output
    lines = progress_lines(evaluated.stderr, "eval")
    assert lines and lines[-1] == "eval: sample 2/2"
    assert "eval: sample" not in evaluated.stdout
    row = next(line for line in evaluated.stdout.splitlines() if "tokens_per_s" in line)
    rate = row.split("│")[2].strip()
    assert RATE.match(rate), rate

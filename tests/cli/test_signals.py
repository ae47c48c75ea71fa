"""Ctrl-C and SIGTERM: `train` and `bench` stop at a safe point, keep what they have, exit 130 / 143.

The command-level tests run `toroidal` in a subprocess and send the signal once the first
step (a checkpoint on disk) or the first bench row (the progress bar, read from a pseudo
terminal) is done; they wait for events, never for a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toroidal.bench import BenchSweep, run_sweep
from toroidal.training import TrainConfig, train
from toroidal.training.checkpoint import latest_checkpoint, list_checkpoints
from toroidal_cli.signals import StopSignals

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
MICRO = dict(model="micro", seq_len=16, batch_size=4, eval_batches=2, warmup_steps=2, lr=0.01, device="cpu")
WAIT_S = 240  # generous: a loaded machine may take long to import torch; never a timing assertion


# --- the handler ---------------------------------------------------------------------------------------


def test_first_signal_asks_to_stop_and_a_second_leaves_at_once(capfd):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals("the current step") as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.name == "SIGTERM" and stop.exit_code == 143
        with pytest.raises(SystemExit) as leaving:
            os.kill(os.getpid(), signal.SIGTERM)
        assert leaving.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored on the way out
    assert "SIGTERM: stopping after the current step" in capfd.readouterr().err

    with StopSignals("the current row") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):  # the command wrapper turns it into exit 130
            os.kill(os.getpid(), signal.SIGINT)


# --- the library stops between units of work ---------------------------------------------------------


def test_a_stopped_training_run_checkpoints_and_resumes_to_the_uninterrupted_run(tmp_path):
    whole = train(TrainConfig(**MICRO, steps=4, eval_every=2), tmp_path / "whole")
    steps = []
    stopped = train(
        TrainConfig(**MICRO, steps=4, eval_every=2),
        tmp_path / "cut",
        progress=lambda event: steps.append(event.step) if event.kind == "step" else None,
        should_stop=lambda: len(steps) >= 3,
    )
    assert stopped.stopped and stopped.payload["final"]["step"] == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "cut")] == [3]  # saved without --save-every
    assert not (tmp_path / "cut" / "model").exists()  # only a finished run writes its model
    resumed = train(TrainConfig(**MICRO, steps=4, eval_every=2), tmp_path / "cut", resume=True)
    assert not resumed.stopped and resumed.payload["resumed_from_step"] == 3
    assert resumed.payload["loss_curve"] == whole.payload["loss_curve"]
    assert resumed.payload["validation"] == whole.payload["validation"]


def test_a_stopped_sweep_returns_the_rows_measured_so_far():
    sweep = BenchSweep(
        backend=["sdpa", "reference"], seq_len=[16, 32], depth=[2], heads=[2], d_model=[16], warmup=0,
        repeats=1, isolate=False, paired=False,
    )  # fmt: skip
    rows = []
    result = run_sweep(sweep, on_row=rows.append, should_stop=lambda: len(rows) >= 1)
    assert result.partial and result.summary["partial"] and len(result.rows) == 1
    assert result.rows[0]["status"] == "ok"
    assert not run_sweep(sweep).partial


# --- the commands ---------------------------------------------------------------------------------------


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    # A session of its own: the signal goes to the whole group, as Ctrl-C in a terminal does.
    return subprocess.Popen(
        [sys.executable, "-m", "toroidal_cli", *args], cwd=ROOT, start_new_session=True, **kwargs
    )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert proc.poll() is None, "the command ended before it could be interrupted"
        assert time.monotonic() < deadline, "the command never got going"
        time.sleep(0.05)


TRAIN = ["train", "--model", "micro", "--seq-len", "16", "--batch-size", "2", "--steps", "100000"]
TRAIN += ["--save-every", "1", "--eval-every", "0", "--eval-batches", "1", "--device", "cpu"]


def test_train_stopped_by_sigterm_keeps_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = _start([*TRAIN, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: bool(list_checkpoints(run)), proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        _kill(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    step = int(latest_checkpoint(run).name.split("-")[1])
    record = json.loads((run / "metrics.json").read_text())
    assert record["interrupted"] == {"signal": "SIGTERM", "step": step}
    assert record["final"]["step"] == step and len(record["loss_curve"]) == step
    line = next(line for line in err.splitlines() if "resume with:" in line)
    assert line.startswith(f"interrupted at step {step}; resume with: toroidal train --model micro")
    assert line.endswith(f"--out {run} --resume")


def test_bench_interrupted_writes_the_rows_measured_so_far_marked_partial(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "-b", "sdpa,reference", "-n", "64,128,256,512", "--depth", "2", "--heads", "2"]
    args += ["--d-model", "32", "--warmup", "0", "--repeats", "1", "--no-paired", "--out", str(out)]
    terminal, progress = pty.openpty()  # Rich draws its progress bar (rows done / 8) on a terminal only
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = _start(args, stdout=subprocess.PIPE, stderr=progress, stdin=subprocess.DEVNULL, env=env)
    os.close(progress)
    drawn = b""

    def a_row_is_done() -> bool:
        nonlocal drawn
        if select.select([terminal], [], [], 0.1)[0]:
            drawn += os.read(terminal, 65536)
        return re.search(rb"(?<![0-9])[1-7]/8(?![0-9])", drawn) is not None

    try:
        _wait_for(a_row_is_done, proc)
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(OSError):  # keep reading the terminal, or a full one blocks the command
            while proc.poll() is None or select.select([terminal], [], [], 0)[0]:
                a_row_is_done()
        proc.wait(timeout=WAIT_S)
    finally:
        _kill(proc)
        os.close(terminal)
    assert proc.returncode == 130
    assert b"Traceback" not in drawn and b"SIGINT: stopped after" in drawn
    record = json.loads(out.read_text())
    assert record["partial"] is True and record["summary"]["partial"] is True
    assert 1 <= len(record["rows"]) < 8
    assert all(row["status"] == "ok" for row in record["rows"])

"""Experiment logging: `csv` (built in), `tensorboard`, `wandb` (offline unless configured).

`check_logger` runs before any work, so a missing package is a one-line error at startup
instead of a crash after the first steps.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from toroidal.runtime.install import install_command
from toroidal.training.errors import SetupError

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_logger(kind: str | None) -> None:
    if kind is None or kind == "csv":
        return
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
        else:
            import wandb  # noqa: F401
    except ImportError:
        raise SetupError(
            f"--log {kind} needs the {_PACKAGES[kind]} package, which is not installed",
            f"{install_command('log')} (or pip install {_PACKAGES[kind]}), or use --log csv",
        ) from None


class CsvLogger:
    """`log.csv` in the run folder, one row per (step, metric, value).

    Resuming from step S keeps the rows up to S (later ones came from the interrupted part).
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        path = Path(run_dir) / "log.csv"
        kept = []
        if resume_step and path.exists():
            with path.open(newline="", encoding="utf-8") as old:
                kept = [row for row in list(csv.reader(old))[1:] if row and int(row[0]) <= resume_step]
        self._file = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerows([["step", "metric", "value"], *kept])

    def log(self, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.writerow([step, name, value])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorboardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        # Without an account or explicit mode there is nothing to sync to: keep the log on disk.
        if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        self._run = wandb.init(project="toroidal", name=Path(run_dir).name, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict) -> None:
        self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._run.finish()


def open_logger(kind: str | None, run_dir: Path, config: dict, resume_step: int = 0):
    if kind is None:
        return None
    if kind == "csv":
        return CsvLogger(run_dir, resume_step)
    if kind == "tensorboard":
        return TensorboardLogger(run_dir)
    return WandbLogger(run_dir, config)

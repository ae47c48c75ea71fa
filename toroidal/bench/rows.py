"""The row schema of `toroidal bench` results (KEY_FIELDS identify a row, METRIC_FIELDS measure it),
row statuses, the rows of problems, and the result record of a sweep."""

from __future__ import annotations

import signal
import statistics
from dataclasses import dataclass

import torch

from toroidal.bench.cases import BenchCase
from toroidal.bench.worker import WorkerDied
from toroidal.runtime.timing import TELEMETRY_FIELDS, percentile, spread

OK, SKIPPED, OOM, ERROR = "ok", "skipped", "oom", "error"

# The fields that identify a row: two results are compared row by row on all of them.
KEY_FIELDS = (
    "mechanism",
    "options",
    "backend",
    "ring_world_size",
    "device",
    "dtype",
    "mode",
    "causal",
    "window",
    "lambda",
    "period",
    "batch",
    "heads",
    "d_model",
    "head_dim",
    "depth",
    "seq_len",
)
METRIC_FIELDS = (
    "median_ms",
    "p10_ms",
    "p90_ms",
    "tokens_per_s",
    "tflops",
    "peak_memory_mb",
    "sdpa_torus_ms",
    "sdpa_standard_ms",
    "overhead",
    "vs_standard",
    "error",
    "runs",  # timed runs of the row (--repeats at least; more until stable, within --max-time)
    "spread",  # IQR / median of the row's runs (null for a single run)
    "baseline_spread",  # the largest IQR / median among the runs of the row's paired baselines
    "noisy",  # spread or baseline_spread above the sweep's --noisy threshold
)


@dataclass
class BenchResult:
    rows: list[dict]
    summary: dict
    notes: list[str]
    partial: bool = False  # stopped early by `should_stop`: the rows measured so far


def empty_row(case: BenchCase, status: str, reason: str | None, chosen: str | None = None) -> dict:
    """A row with the case's key fields, a status and reason, and every measurement null."""
    row = {**case.key(), "chosen": chosen, "platter_tokens": case.platter_tokens, "status": status}
    row["reason"] = reason
    row.update(dict.fromkeys(METRIC_FIELDS))
    row["memory_method"] = None
    row["estimated_memory_mb"] = None
    row["mechanism_metrics"] = None
    row.update(dict.fromkeys(TELEMETRY_FIELDS))
    return row


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, WorkerDied):
        return error.signal_number == signal.SIGKILL
    # The CPU allocator raises a plain RuntimeError when malloc fails.
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def failed_row(case: BenchCase, error: BaseException, chosen: str | None = None) -> dict:
    """The row of a measurement that raised: `oom` when it ran out of memory, else `error`."""
    status = OOM if is_out_of_memory(error) else ERROR
    return empty_row(case, status, f"{type(error).__name__}: {error}".strip(), chosen)


def time_fields(times: list[float]) -> dict:
    """median_ms, p10_ms and p90_ms of run times in seconds."""
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p10_ms": percentile(times, 0.1) * 1e3,
        "p90_ms": percentile(times, 0.9) * 1e3,
    }


def stability_fields(times: list[float], baselines: list[list[float]], threshold: float) -> dict:
    """runs, spread, baseline_spread and noisy of a row from its run times and its paired baselines'.

    A ratio is as trustworthy as its noisier side, so a noisy baseline makes the row noisy too.
    """
    own = spread(times)
    others = [value for value in map(spread, baselines) if value is not None]
    worst = max(others, default=None)
    known = [value for value in (own, worst) if value is not None]
    noisy = any(value > threshold for value in known) if known else None
    return {"runs": len(times), "spread": own, "baseline_spread": worst, "noisy": noisy}


def summarize(rows: list[dict], seconds: float) -> dict:
    counts = {status: sum(row["status"] == status for row in rows) for status in (OK, SKIPPED, OOM, ERROR)}
    noisy = sum(bool(row.get("noisy")) for row in rows)
    return {"rows": len(rows), **counts, "noisy": noisy, "seconds": round(seconds, 2)}

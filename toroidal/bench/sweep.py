"""`run_sweep`: measure every case of a `BenchSweep` into one plain dict per row (nothing prints).

Each row times its case against two plain-SDPA baselines (`overhead`: SDPA on the L
platter-tokens; `vs_standard`: SDPA on the N tokens); docs/internals.md "Measuring" says how.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from toroidal.bench.cases import (
    BenchCase,
    BenchSweep,
    SdpaCall,
    attention_flops,
    baseline_calls,
    case_backend,
    case_estimate,
    materialized_bytes,
)
from toroidal.bench.measure import Timing, clear_backend_caches, measure_sdpa, measure_toroidal
from toroidal.bench.ring import measure_ring, ring_chosen
from toroidal.bench.rows import (
    OK,
    SKIPPED,
    BenchResult,
    empty_row,
    failed_row,
    stability_fields,
    summarize,
    time_fields,
)
from toroidal.bench.stream import bench_stream_case
from toroidal.bench.worker import can_isolate, runner
from toroidal.kernels import BackendUnavailable
from toroidal.runtime import memory
from toroidal.runtime.timing import GpuTelemetry, load_average

_MB = 1024**2


class _Baselines:
    """Plain-SDPA times, measured once per tensor shape within a sweep (unpaired timing)."""

    def __init__(self, run: Callable, timing: Timing):
        self._run, self._timing = run, timing
        self._cache: dict[SdpaCall, float | BaseException] = {}

    def median(self, call: SdpaCall) -> float:
        if call not in self._cache:
            try:
                self._cache[call] = statistics.median(
                    self._run(measure_sdpa, call=call, timing=self._timing).times
                )
            except Exception as error:
                self._cache[call] = error
        value = self._cache[call]
        if isinstance(value, BaseException):
            raise value
        return value


def _budget_problem(chosen: str, case: BenchCase, budget_gb: float | None) -> str | None:
    if budget_gb is None:
        return None
    estimate = materialized_bytes(chosen, case)
    if estimate <= budget_gb * 1024**3:
        return None
    return (
        f"{chosen} would materialize ~{estimate / 1024**3:.1f} GiB of (L x L) scores "
        f"at L={case.platter_tokens}, over the memory budget of {budget_gb:g} GiB"
    )


def bench_case(case: BenchCase, run: Callable, baselines: _Baselines, timing: Timing, budget_gb=None) -> dict:
    """Measure one case into a row dict; problems become `skipped`, `oom` or `error` rows."""
    if case.mode == "stream":
        return bench_stream_case(case, run, timing, budget_gb)
    problem = case.problem()
    if problem is not None:
        return empty_row(case, SKIPPED, problem)
    measure = measure_toroidal
    try:
        if case.ring_world_size is not None:  # W spawned processes
            chosen, measure = ring_chosen(case), measure_ring
        else:
            chosen = case_backend(case)
    except BackendUnavailable as error:
        return empty_row(case, SKIPPED, str(error))
    estimate = case_estimate(chosen, case)
    problem = _budget_problem(chosen, case, budget_gb)
    if problem is None and estimate is not None:  # refused here rather than killed by the OS
        problem = memory.over_available(estimate, case.device)
    estimated_mb = estimate.total / _MB if estimate is not None else None
    if problem is not None:
        return {**empty_row(case, SKIPPED, problem, chosen), "estimated_memory_mb": estimated_mb}
    try:
        measured = run(measure, case=case, timing=timing)
    except BackendUnavailable as error:
        return empty_row(case, SKIPPED, str(error), chosen)
    except Exception as error:
        return failed_row(case, error, chosen)

    row = empty_row(case, OK, None, chosen)
    row["estimated_memory_mb"] = estimated_mb
    median = statistics.median(measured.times)
    row.update(
        time_fields(measured.times),
        tokens_per_s=case.batch * case.seq_len / median,
        tflops=attention_flops(case) / median / 1e12,
        memory_method=measured.memory_method,
        error=measured.error,
        mechanism_metrics=measured.metrics,
    )
    if measured.peak_memory_bytes is not None:
        row["peak_memory_mb"] = measured.peak_memory_bytes / _MB
    paired_runs = [runs for runs in measured.baseline_times.values() if not isinstance(runs, str)]
    row.update(stability_fields(measured.times, paired_runs, timing.noisy))
    if not timing.baselines:
        return row
    calls = baseline_calls(case)
    for name, ratio in (("sdpa_torus", "overhead"), ("sdpa_standard", "vs_standard")):
        paired = measured.baseline_times.get(name)
        if isinstance(paired, str):
            row["reason"] = f"baseline {name} failed: {paired}"
            continue
        if paired:  # timed in alternation with the row: the median of the per-round ratios
            ratios = [mine / theirs for mine, theirs in zip(measured.times, paired, strict=True)]
            row[f"{name}_ms"], row[ratio] = statistics.median(paired) * 1e3, statistics.median(ratios)
            continue
        try:
            baseline = baselines.median(calls[name])
        except Exception as error:
            row["reason"] = f"baseline {name} failed: {type(error).__name__}: {error}"
            continue
        row[f"{name}_ms"], row[ratio] = baseline * 1e3, median / baseline
    return row


def sweep_threads(sweep: BenchSweep) -> int:
    """The threads a sweep's rows use: its `threads`, else torch's current setting."""
    return sweep.threads or torch.get_num_threads()


def load_warning(sweep: BenchSweep) -> str | None:
    """One line when a CPU sweep starts on a machine whose load average exceeds the threads it uses:
    other work competes for the cores, and rows will be slow and noisy."""
    load = load_average()
    threads = sweep_threads(sweep)
    if torch.device(sweep.device).type != "cpu" or load is None or load <= threads:
        return None
    return (
        f"the machine's load average is {load:.1f}, more than the {threads} thread(s) this sweep uses: "
        "other work competes for the CPU and times will be noisy"
    )


def run_sweep(
    sweep: BenchSweep,
    *,
    on_case: Callable[[int, BenchCase], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BenchResult:
    """Measure every case of `sweep`. `on_case(index, case)` before and `on_row(row)` after each one;
    `should_stop()` is asked before each case, and True ends the sweep there (a partial result)."""
    start = time.perf_counter()
    device = torch.device(sweep.device)
    if sweep.threads is not None:
        torch.set_num_threads(sweep.threads)
    isolate = device.type == "cpu" and (can_isolate() if sweep.isolate is None else sweep.isolate)
    if isolate and not can_isolate():
        raise ValueError("isolated CPU measurements need Linux (fork and /proc)")
    load = load_average()
    timing = Timing(
        str(device),
        sweep.warmup,
        sweep.repeats,
        sweep_threads(sweep),
        isolate,
        sweep.paired,
        sweep.baselines,
        max_time=sweep.max_time,
        noisy=sweep.noisy,
    )
    telemetry = GpuTelemetry(device)
    notes = [telemetry.note] if telemetry.note else []
    if device.type == "cpu" and not isolate:
        notes.append("no CPU peak memory: rows ran in this process (isolation off)")

    rows, partial = [], False
    with runner(isolate) as run:
        baselines = _Baselines(run, timing)
        for index, case in enumerate(sweep.cases()):
            if should_stop is not None and should_stop():
                partial = True
                break
            if on_case is not None:
                on_case(index, case)
            row = bench_case(case, run, baselines, timing, sweep.memory_budget_gb)
            if row["status"] == OK:
                row.update(telemetry.sample())
            if not isolate:  # a fork takes its caches with it; this process keeps them
                clear_backend_caches()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    summary = {**summarize(rows, time.perf_counter() - start), "isolated": isolate, "threads": timing.threads}
    summary["load_average"] = load  # at the start, 1 minute
    summary["partial"] = partial
    return BenchResult(rows, summary, notes, partial)

"""`toroidal bench`: sweeps of attention calls timed against plain SDPA, ring and streaming rows,
the backend tuner (`toroidal.bench.tune`) and the stage profiler (`toroidal.bench.profile`).

Modules inside this package import their siblings directly, never this face.
"""

from toroidal.bench.cases import (
    MODES,
    BenchCase,
    BenchSweep,
    attention_flops,
    case_backend,
    case_estimate,
    case_shape,
    materialized_bytes,
    sweep_options,
)
from toroidal.bench.measure import Measurement, Timing
from toroidal.bench.rows import (
    ERROR,
    KEY_FIELDS,
    METRIC_FIELDS,
    OK,
    OOM,
    SKIPPED,
    TELEMETRY_FIELDS,
    BenchResult,
    is_out_of_memory,
)
from toroidal.bench.sweep import load_warning, run_sweep
from toroidal.bench.worker import ForkWorker, WorkerDied, can_isolate

__all__ = [
    "ERROR",
    "KEY_FIELDS",
    "METRIC_FIELDS",
    "MODES",
    "OK",
    "OOM",
    "SKIPPED",
    "TELEMETRY_FIELDS",
    "BenchCase",
    "BenchResult",
    "BenchSweep",
    "ForkWorker",
    "Measurement",
    "Timing",
    "WorkerDied",
    "attention_flops",
    "can_isolate",
    "case_backend",
    "case_estimate",
    "case_shape",
    "is_out_of_memory",
    "load_warning",
    "materialized_bytes",
    "run_sweep",
    "sweep_options",
]

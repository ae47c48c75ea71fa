"""Benchmark toroidal attention: time, throughput and memory of each backend, against plain SDPA.

A `BenchSweep` is the cartesian product of its axes; `run_sweep` measures every
`BenchCase` and returns one plain dict per row (nothing here prints). Each row times
`toroidal_attention` on random unit-normal q, k, v of shape (B, H, N, e), and two
baselines measured the same way in the same run:

- `overhead`:    time / plain SDPA on the B*H*L platter-tokens of width w = e/D
                 (what the torus costs over the best plain kernel at the same size);
- `vs_standard`: time / plain SDPA on the N tokens of full width e
                 (what a user pays versus the attention toroidal attention replaces).

Both baselines use `is_causal` = the row's causal flag and no other mask. By default
(`paired`) every row times its own baselines in the same process, one run of each after
every run of the row, and a ratio is the median of the per-round ratios: the machine's
speed drifts (shared, throttled), and runs made moments apart drift together. Unpaired,
each baseline is timed once per tensor shape in its own process. Without baselines
(`baselines=False`, for scaling runs where SDPA on L tokens would dominate), rows carry
no ratios.

Memory. CUDA rows report `torch.cuda.max_memory_allocated` growth over the row.
CPU has no allocator statistics, so every CPU measurement runs in a fresh fork of a
helper interpreter that has imported torch but never computed (see `ForkWorker`) and
reports the peak resident-set growth of that fork: rows cannot pollute each other.
Forking this process instead would hang: GNU OpenMP, which torch's CPU kernels use,
deadlocks in a forked child once the parent has run a parallel region. Peak memory
includes the inputs, outputs and gradients of the row.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from toroidal.functional import backend_for_shape, toroidal_attention
from toroidal.kernels import BackendUnavailable, backend_names, get_backend
from toroidal.mechanisms import build_kernel, get_mechanism
from toroidal.runtime import memory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd", "stream")  # stream: one decoding step, see toroidal.bench.stream
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
)
TELEMETRY_FIELDS = ("gpu_name", "gpu_util_pct", "gpu_memory_used_mb", "gpu_power_w")
BACKWARD_FLOP_FACTOR = 3.5  # fwd+bwd = forward + 2.5x forward (FlashAttention's convention)
_MB = 1024**2


# --- what to measure -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One row of a sweep: a backend on one shape and torus. `period=None` means P = N."""

    backend: str
    seq_len: int
    depth: int
    batch: int
    heads: int
    d_model: int
    dtype: str = "fp32"
    mode: str = "fwd"
    causal: bool = True
    window: int | None = None
    lambda_distance: float = 0.1
    period: int | None = None
    device: str = "cpu"
    mechanism: str = "toroidal"  # see toroidal.mechanisms; "toroidal" times `toroidal_attention`
    options: tuple[tuple[str, object], ...] = ()  # the mechanism's own options, sorted by name
    ring_world_size: int | None = None  # W: `ring_attention` on W processes (toroidal.bench.ring)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def platter_tokens(self) -> int:
        """L = N*D."""
        return self.seq_len * self.depth

    @property
    def width(self) -> int:
        """w = e/D, the platter width."""
        return self.head_dim // self.depth

    @property
    def training(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def options_label(self) -> str | None:
        """The options as `name=value,...` (None without options): one hashable, readable key field."""
        return ",".join(f"{name}={value}" for name, value in self.options) or None

    def mechanism_kwargs(self) -> dict:
        """Keywords of the mechanism's kernel builder: the torus axes it accepts, then its options."""
        accepted = get_mechanism(self.mechanism).accepts
        axes = {**self.kernel_kwargs(), "max_len": self.period or self.seq_len}
        return {**{k: v for k, v in axes.items() if k in accepted}, **dict(self.options)}

    def kernel_kwargs(self) -> dict:
        """The keyword arguments of `toroidal_attention` for this row."""
        return dict(
            depth=self.depth,
            lambda_distance=self.lambda_distance,
            period=self.period,
            causal=self.causal,
            window=self.window,
            backend=self.backend,
        )

    def problem(self) -> str | None:
        """Why this shape cannot exist (a row to skip), or None."""
        if self.d_model % self.heads:
            return f"d_model {self.d_model} is not divisible by heads {self.heads}"
        if self.head_dim % self.depth:
            return f"depth {self.depth} does not divide the head dim {self.head_dim}"
        return None

    def key(self) -> dict:
        """The row's identifying fields (KEY_FIELDS)."""
        return {
            "mechanism": self.mechanism,
            "options": self.options_label,
            "backend": self.backend,
            "ring_world_size": self.ring_world_size,
            "device": self.device,
            "dtype": self.dtype,
            "mode": self.mode,
            "causal": self.causal,
            "window": self.window,
            "lambda": self.lambda_distance,
            "period": self.period,
            "batch": self.batch,
            "heads": self.heads,
            "d_model": self.d_model,
            "head_dim": self.head_dim if not self.d_model % self.heads else None,
            "depth": self.depth,
            "seq_len": self.seq_len,
        }


# Kernel options that are sweep axes of their own (--depth, --lambda, ...), never --option values.
AXIS_OPTIONS = frozenset({"depth", "lambda_distance", "period", "window", "backend", "max_len"})


def sweep_options(mechanism: str) -> tuple[str, ...]:
    """The options of `mechanism` a sweep may vary. The toroidal rows time the bare kernel
    `toroidal_attention` (no fusion), whose every knob is an axis: none."""
    if mechanism == "toroidal":
        return ()
    return tuple(name for name in get_mechanism(mechanism).accepts if name not in AXIS_OPTIONS)


@dataclass
class BenchSweep:
    """Axes of a benchmark sweep (lists) and how to measure. Give `d_model` or `head_dim`, not both."""

    backend: list[str] = field(default_factory=lambda: ["auto"])
    seq_len: list[int] = field(default_factory=lambda: [1024])
    depth: list[int] = field(default_factory=lambda: [4])
    batch: list[int] = field(default_factory=lambda: [1])
    heads: list[int] = field(default_factory=lambda: [8])
    d_model: list[int] | None = None
    head_dim: list[int] | None = None
    dtype: list[str] = field(default_factory=lambda: ["fp32"])
    mode: list[str] = field(default_factory=lambda: ["fwd"])
    causal: list[bool] = field(default_factory=lambda: [True])
    window: list[int | None] = field(default_factory=lambda: [None])
    lambda_distance: list[float] = field(default_factory=lambda: [0.1])
    period: list[int | None] = field(default_factory=lambda: [None])
    mechanism: list[str] = field(default_factory=lambda: ["toroidal"])
    options: dict[str, list] = field(default_factory=dict)  # mechanism option -> values to sweep
    device: str = "cpu"
    warmup: int = 3  # one warm-up left the first row of a sweep up to 37% slow on CPU
    repeats: int = 5
    threads: int | None = None
    memory_budget_gb: float | None = None  # skip rows whose materialized scores would exceed it
    isolate: bool | None = None  # CPU rows in forked workers; None: wherever it is possible
    paired: bool = True  # baselines timed with each row, alternating (see the module docstring)
    baselines: bool = True  # False: no SDPA baselines, no ratios (scaling runs where SDPA is too slow)
    ring_world_size: list[int] = field(default_factory=list)  # extra `ring` rows on W processes each

    def __post_init__(self) -> None:
        if self.d_model is not None and self.head_dim is not None:
            raise ValueError("give d_model or head_dim, not both")
        if self.d_model is None and self.head_dim is None:
            self.d_model = [512]
        known = {"auto", *backend_names()}
        for name in self.backend:
            if name not in known:
                raise ValueError(f"unknown backend {name!r}; choose from {', '.join(sorted(known))}")
        for name in self.dtype:
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
        for name in self.mode:
            if name not in MODES:
                raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
        for name in self.mechanism:
            get_mechanism(name)  # raises ValueError naming the registered ones
        axes = set(self.options) & AXIS_OPTIONS
        if axes:
            raise ValueError(
                f"option(s) {', '.join(sorted(axes))}: sweep axes, not mechanism options; use their own flags"
            )
        unused = set(self.options) - {option for name in self.mechanism for option in sweep_options(name)}
        if unused:
            raise ValueError(
                f"option(s) {', '.join(sorted(unused))} are not accepted by "
                f"mechanism(s) {', '.join(self.mechanism)}"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if any(world < 1 for world in self.ring_world_size):
            raise ValueError(f"ring world sizes must be >= 1, got {self.ring_world_size}")

    def _variants(self) -> list[tuple[str, str, tuple]]:
        """(mechanism, backend, options) triples: backends only for mechanisms that take one,
        and the cartesian product of only the options each mechanism accepts."""
        variants = []
        for mechanism in self.mechanism:
            accepted = get_mechanism(mechanism).accepts
            backends = self.backend if mechanism == "toroidal" or "backend" in accepted else ["-"]
            names = sorted(name for name in self.options if name in sweep_options(mechanism))
            for values in itertools.product(*(self.options[name] for name in names)):
                options = tuple(zip(names, values, strict=True))
                variants += [(mechanism, backend, options) for backend in backends]
        return variants

    def cases(self) -> list[BenchCase]:
        """Every combination, backends innermost so that rows of one shape sit together."""
        widths = (
            [("d_model", v) for v in self.d_model]
            if self.d_model
            else [("head_dim", v) for v in self.head_dim]
        )
        grid = itertools.product(
            self.dtype,
            self.mode,
            self.causal,
            self.window,
            self.lambda_distance,
            self.period,
            self.batch,
            self.heads,
            widths,
            self.depth,
            self.seq_len,
            self._variants(),
        )
        cases = []
        for dtype, mode, causal, window, lam, period, batch, heads, (kind, size), depth, n, variant in grid:
            mechanism, backend, options = variant
            d_model = size if kind == "d_model" else size * heads
            cases.append(
                BenchCase(
                    backend,
                    n,
                    depth,
                    batch,
                    heads,
                    d_model,
                    dtype,
                    mode,
                    causal,
                    window,
                    lam,
                    period,
                    self.device,
                    mechanism,
                    options,
                )
            )
        return self._with_ring_rows(cases)

    def _with_ring_rows(self, cases: list[BenchCase]) -> list[BenchCase]:
        """After each shape's rows, one toroidal `ring` row per world size (rows of a shape are adjacent)."""
        if not self.ring_world_size or "toroidal" not in self.mechanism:
            return cases
        per_shape, out = len(self._variants()), []
        for start in range(0, len(cases), per_shape):
            shape = cases[start : start + per_shape]
            out += shape
            if shape[0].mode in ("fwd", "fwd+bwd"):  # ring rows time a training or inference step
                ring = replace(shape[0], backend="ring", mechanism="toroidal", options=())
                out += [replace(ring, ring_world_size=world) for world in self.ring_world_size]
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lambda"] = data.pop("lambda_distance")
        return data


# --- which backend runs, what it would materialize, what it computes ------------------------------


def case_backend(case: BenchCase) -> str:
    """The backend a case runs (auto resolved), from stride-0 stand-ins: nothing is allocated or computed.

    A mechanism that takes no backend runs itself: its name is returned.
    """
    if case.mechanism != "toroidal" and "backend" not in get_mechanism(case.mechanism).accepts:
        return case.mechanism
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    return backend_for_shape(
        shape, device=case.device, dtype=DTYPES[case.dtype], training=case.training, **case.kernel_kwargs()
    )


def materialized_bytes(backend: str, case: BenchCase) -> int:
    """Rough peak bytes of the (L x L) tensors a backend materializes; 0 for the tiled kernels.

    reference: about four (B, H, L, L) float32 tensors live at once (scores, masked
    scores, exp, weights; more kept for backward), plus the (L, L) bias. sdpa: the cached
    (L, L) additive mask plus the int64 index grids and float32 bias it is built from.
    """
    return memory.materialized_bytes(backend, case_shape(case))


def case_shape(case: BenchCase) -> memory.AttentionShape:
    return memory.AttentionShape(
        case.batch, case.heads, case.seq_len, case.depth, case.head_dim, case.dtype, case.training
    )


def case_estimate(chosen: str, case: BenchCase) -> memory.Estimate | None:
    """Estimated peak memory of a toroidal kernel row (None for other mechanisms, ring and stream rows)."""
    if case.mechanism != "toroidal" or case.ring_world_size is not None or case.mode == "stream":
        return None
    return memory.attention_call(chosen, case_shape(case))


def attention_flops(case: BenchCase) -> float:
    """Effective FLOPs of one call, FlashAttention's convention on the platter-token problem.

    Forward: QK^T and PV are two (L x L x w) matmuls of 2 FLOPs per multiply-add,
    4*B*H*L*L*w, halved when causal (the masked half is not work). fwd+bwd counts 3.5x
    the forward (backward = 2.5x forward). A window or the bias is not discounted, so a
    windowed kernel that skips tiles shows a higher effective rate.
    """
    flops = 4.0 * case.batch * case.heads * case.platter_tokens**2 * case.width
    if case.causal:
        flops /= 2
    return flops * (BACKWARD_FLOP_FACTOR if case.training else 1.0)


# --- timing and memory of one measurement (these run inside a worker fork on CPU) ------------------


@dataclass(frozen=True)
class Timing:
    """How to measure: runs, threads, and whether this process is a disposable fork (CPU memory)."""

    device: str = "cpu"
    warmup: int = 3
    repeats: int = 5
    threads: int | None = None
    isolated: bool = False
    # Time each row's plain-SDPA baselines in the same process, alternating with the row's own
    # runs, so that a ratio compares runs made moments apart on a machine whose speed drifts.
    paired: bool = True
    baselines: bool = True  # False: time the rows only (overhead and vs_standard stay null)


@dataclass(frozen=True)
class SdpaCall:
    """A plain scaled_dot_product_attention baseline: (B, H, tokens, width), no mask but is_causal."""

    batch: int
    heads: int
    tokens: int
    width: int
    dtype: str
    mode: str
    causal: bool


@dataclass
class Measurement:
    times: list[float]  # seconds, one per timed run
    peak_memory_bytes: int | None
    memory_method: str | None
    metrics: dict | None = None  # the mechanism kernel's get_metrics() after the timed runs
    error: float | None = None  # relative output error against the attention it approximates
    # Paired baselines: name -> seconds per round (aligned with `times`), or why it failed.
    baseline_times: dict[str, list[float] | str] = field(default_factory=dict)


def time_call(step: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Wall time of `repeats` runs of `step` after `warmup` untimed ones; `sync` fences the device."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth of the enclosed code: CUDA allocator stats, or RSS of a disposable fork."""

    def __init__(self, device: torch.device, isolated: bool):
        self.device, self.isolated = device, isolated
        self.bytes: int | None = None
        self.method: str | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.isolated:
            # Reset the high-water mark (Linux >= 4.0); ru_maxrss would keep the worker's.
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")
            self._start = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            self.method = "cuda max_memory_allocated"
        elif self.isolated and self._start is not None:
            peak = _proc_status_bytes("VmHWM")
            if peak is None:  # ru_maxrss is in KiB on Linux
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.bytes = max(0, peak - self._start)
            self.method = "peak RSS growth of a forked worker"
        return False


StepFactory = Callable[[torch.device], Callable[[], object]]


def timed_run(step: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def paired_steps(paired: dict[str, StepFactory], device, warmup: int) -> dict[str, Callable | str]:
    """Each baseline's step, warmed up; a baseline that fails becomes the reason it failed."""
    steps: dict[str, Callable | str] = {}
    for name, make_step in paired.items():
        try:
            step = make_step(device)
            for _ in range(max(warmup, 1)):
                step()
            steps[name] = step
        except Exception as error:
            steps[name] = f"{type(error).__name__}: {error}".strip()
    return steps


def _measure(
    make_step: StepFactory, timing: Timing, paired: dict[str, StepFactory] | None = None
) -> Measurement:
    """Time `make_step(device)()`; with `paired`, alternate each round with one run of every baseline.

    Peak memory covers the step's setup and warm-up runs (and its first timed run when there is
    no warm-up), never the baselines, which are set up after it.
    """
    device = torch.device(timing.device)
    if timing.threads is not None:
        torch.set_num_threads(timing.threads)
    torch.manual_seed(0)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if not paired:
        with PeakMemory(device, timing.isolated) as peak:
            step = make_step(device)
            times = time_call(step, timing.warmup, timing.repeats, sync)
        return Measurement(times, peak.bytes, peak.method)
    with PeakMemory(device, timing.isolated) as peak:
        step = make_step(device)
        for _ in range(timing.warmup):
            step()
        times = [] if timing.warmup else [timed_run(step, sync)]
    baselines = paired_steps(paired, device, timing.warmup)
    baseline_times = {name: [] if callable(s) else s for name, s in baselines.items()}
    for round_ in range(timing.repeats):
        if round_ >= len(times):
            times.append(timed_run(step, sync))
        for name, baseline in baselines.items():
            if callable(baseline):
                baseline_times[name].append(timed_run(baseline, sync))
    return Measurement(times, peak.bytes, peak.method, baseline_times=baseline_times)


def training_step(attend: Callable, q, k, v) -> Callable[[], object]:
    grad = torch.randn_like(attend(q, k, v))

    def step():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).backward(grad)

    return step


def inference_step(attend: Callable, q, k, v) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return attend(q, k, v)

    return step


def random_inputs(shape, dtype: str, training: bool, device):
    return [torch.randn(shape, device=device, dtype=DTYPES[dtype], requires_grad=training) for _ in range(3)]


ERROR_MAX_PLATTER_TOKENS = 16384  # above this, the exact attention for the error column costs too much


def approximation_error(case: BenchCase, kernel, device) -> float | None:
    """Relative Frobenius error of the kernel's output against the attention it approximates.

    None for exact mechanisms and above ERROR_MAX_PLATTER_TOKENS. Computed in float32 on
    fresh unit-normal inputs, without gradients.
    """
    target = get_mechanism(case.mechanism).approximates
    if target is None or case.platter_tokens > ERROR_MAX_PLATTER_TOKENS:
        return None
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, device=device) for _ in range(3))
    with torch.no_grad():
        approximate = kernel.float()(q, k, v, causal=case.causal).float()
        if target == "toroidal":
            exact = toroidal_attention(q, k, v, **{**case.kernel_kwargs(), "backend": "auto"})
        else:
            exact = build_kernel(target, case.heads, case.head_dim).to(device)(q, k, v, causal=case.causal)
    return float((approximate - exact).norm() / exact.norm().clamp_min(1e-30))


def measure_toroidal(case: BenchCase, timing: Timing) -> Measurement:
    """Time one case (runs in a worker fork on CPU): `toroidal_attention` for the toroidal
    mechanism, else the mechanism's kernel module (whose metrics and error the row reports)."""
    kernel = None

    def attend(q, k, v):
        if kernel is not None:
            return kernel(q, k, v, causal=case.causal)
        return toroidal_attention(q, k, v, **case.kernel_kwargs())

    def make_step(device):
        nonlocal kernel
        if case.mechanism != "toroidal":
            kernel = build_kernel(case.mechanism, case.heads, case.head_dim, **case.mechanism_kwargs())
            kernel = kernel.to(device=device, dtype=DTYPES[case.dtype]).requires_grad_(case.training)
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        q, k, v = random_inputs(shape, case.dtype, case.training, device)
        return (training_step if case.training else inference_step)(attend, q, k, v)

    paired = None
    if timing.paired and timing.baselines:
        paired = {name: sdpa_step_factory(call) for name, call in baseline_calls(case).items()}
    measured = _measure(make_step, timing, paired)
    if kernel is not None:
        measured.metrics = kernel.get_metrics() or None
        measured.error = approximation_error(case, kernel, torch.device(timing.device))
    return measured


def sdpa_step_factory(call: SdpaCall) -> StepFactory:
    """A step of plain `scaled_dot_product_attention` on `call`'s shape (a baseline)."""

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=call.causal)

    def make_step(device):
        q, k, v = random_inputs(
            (call.batch, call.heads, call.tokens, call.width), call.dtype, call.mode == "fwd+bwd", device
        )
        return (training_step if call.mode == "fwd+bwd" else inference_step)(attend, q, k, v)

    return make_step


def measure_sdpa(call: SdpaCall, timing: Timing) -> Measurement:
    """Time plain `scaled_dot_product_attention` (a baseline; runs in a worker fork on CPU)."""
    return _measure(sdpa_step_factory(call), timing)


def baseline_calls(case: BenchCase) -> dict[str, SdpaCall]:
    """The two plain-SDPA baselines of a row: on the L platter-tokens of width w, on the N tokens."""
    return {
        "sdpa_torus": SdpaCall(
            case.batch, case.heads, case.platter_tokens, case.width, case.dtype, case.mode, case.causal
        ),
        "sdpa_standard": SdpaCall(
            case.batch, case.heads, case.seq_len, case.head_dim, case.dtype, case.mode, case.causal
        ),
    }


# --- a clean process to fork from (CPU isolation) ------------------------------------------------------


class WorkerDied(RuntimeError):
    """The forked measurement ended without a result (killed, e.g. by the kernel's OOM killer)."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number


def _write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_frame(stream) -> bytes | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    return data if len(data) == size else None


def _execute(payload: bytes) -> bytes:
    """Run a pickled (function, kwargs) and pickle ("ok", value) or ("error", exception)."""
    try:
        func, kwargs = pickle.loads(payload)
        reply = ("ok", func(**kwargs))
    except BaseException as error:  # the parent decides what an exception means
        reply = ("error", error)
    try:
        return pickle.dumps(reply)
    except Exception:
        error = reply[1]
        return pickle.dumps(("error", RuntimeError(f"{type(error).__name__}: {error}")))


def _describe_exit(status: int) -> tuple[str, int | None]:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        hint = " (likely the kernel's out-of-memory killer)" if number == signal.SIGKILL else ""
        return f"measurement process killed by {name}{hint}", number
    return f"measurement process exited with code {os.WEXITSTATUS(status)} and no result", None


def _run_forked(payload: bytes) -> bytes:
    """One job in a fresh fork of this (never computing) worker, so its memory is its own."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, reply, and leave without running any cleanup of the worker
        code = 1
        try:
            os.close(read_end)
            reply = _execute(payload)
            with os.fdopen(write_end, "wb") as out:
                out.write(reply)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        reply = inp.read()
    _, status = os.waitpid(pid, 0)
    if reply:
        return reply
    message, number = _describe_exit(status)
    return pickle.dumps(("died", (message, number)))


def serve() -> None:
    """The worker's loop: framed pickled jobs on stdin, framed pickled replies on the original stdout."""
    # Ctrl-C reaches the whole process group: the parent decides whether a sweep stops, and it
    # stops between rows, so the row in flight here finishes (a second Ctrl-C ends the parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the reply stream
    while (payload := _read_frame(requests)) is not None:
        _write_frame(replies, _run_forked(payload))


def can_isolate() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


class ForkWorker:
    """A helper interpreter that imports torch and never computes; each job runs in a new fork of it.

    Started lazily by the first `call`; use as a context manager to stop it.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (kept open for the worker's life)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from toroidal.bench.core import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        return self._proc

    def _last_error_line(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def call(self, func: Callable, **kwargs):
        """`func(**kwargs)` in a fresh fork of the worker; its exception is raised here."""
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        try:
            _write_frame(proc.stdin, pickle.dumps((func, kwargs)))
            data = _read_frame(proc.stdout)
        except BrokenPipeError:
            data = None
        if data is None:
            raise WorkerDied(f"the benchmark worker stopped: {self._last_error_line() or 'no message'}")
        status, value = pickle.loads(data)
        if status == "ok":
            return value
        if status == "error":
            raise value
        raise WorkerDied(*value)

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> ForkWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- GPU telemetry ---------------------------------------------------------------------------------


class GpuTelemetry:
    """Per-row NVML readings (name, utilization, memory used, power); `note` says why there are none."""

    def __init__(self, device: str | torch.device):
        device = torch.device(device)
        self.note: str | None = None
        self._nvml = self._handle = None
        if device.type != "cuda":
            self.note = f"no GPU telemetry: the device is {device.type}"
            return
        try:
            import pynvml
        except ImportError:
            self.note = "no GPU telemetry: pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self._handle = self._find_handle(pynvml, device)
            self._nvml = pynvml
        except Exception as error:  # NVMLError and friends: no driver, no permission
            self.note = f"no GPU telemetry: NVML failed ({error})"

    @staticmethod
    def _find_handle(pynvml, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:  # CUDA and NVML may number devices differently; the PCI address is shared
            with contextlib.suppress(Exception):
                address = f"{props.pci_domain_id:08X}:{bus:02X}:{props.pci_device_id:02X}.0"
                return pynvml.nvmlDeviceGetHandleByPciBusId(address)
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> dict:
        fields = dict.fromkeys(TELEMETRY_FIELDS)
        if self._nvml is None:
            return fields
        nvml, handle = self._nvml, self._handle
        with contextlib.suppress(Exception):
            name = nvml.nvmlDeviceGetName(handle)
            fields["gpu_name"] = name.decode() if isinstance(name, bytes) else str(name)
        with contextlib.suppress(Exception):
            fields["gpu_util_pct"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        with contextlib.suppress(Exception):
            fields["gpu_memory_used_mb"] = nvml.nvmlDeviceGetMemoryInfo(handle).used / _MB
        with contextlib.suppress(Exception):
            fields["gpu_power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        return fields


# --- the sweep -------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    rows: list[dict]
    summary: dict
    notes: list[str]
    partial: bool = False  # stopped early by `should_stop`: the rows measured so far


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, WorkerDied):
        return error.signal_number == signal.SIGKILL
    # The CPU allocator raises a plain RuntimeError when malloc fails.
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def percentile(times: list[float], fraction: float) -> float:
    ordered = sorted(times)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def empty_row(case: BenchCase, status: str, reason: str | None, chosen: str | None = None) -> dict:
    row = {**case.key(), "chosen": chosen, "platter_tokens": case.platter_tokens, "status": status}
    row["reason"] = reason
    row.update(dict.fromkeys(METRIC_FIELDS))
    row["memory_method"] = None
    row["estimated_memory_mb"] = None
    row["mechanism_metrics"] = None
    row.update(dict.fromkeys(TELEMETRY_FIELDS))
    return row


class _Baselines:
    """Plain-SDPA times, measured once per tensor shape within a sweep."""

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
        from toroidal.bench.stream import bench_stream_case  # it builds on this module

        return bench_stream_case(case, run, timing, budget_gb)
    problem = case.problem()
    if problem is not None:
        return empty_row(case, SKIPPED, problem)
    measure = measure_toroidal
    try:
        if case.ring_world_size is not None:  # W spawned processes
            from toroidal.bench.ring import measure_ring, ring_chosen  # it builds on this module

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
        status = OOM if is_out_of_memory(error) else ERROR
        return empty_row(case, status, f"{type(error).__name__}: {error}".strip(), chosen)

    row = empty_row(case, OK, None, chosen)
    row["estimated_memory_mb"] = estimated_mb
    median = statistics.median(measured.times)
    row.update(
        median_ms=median * 1e3,
        p10_ms=percentile(measured.times, 0.1) * 1e3,
        p90_ms=percentile(measured.times, 0.9) * 1e3,
        tokens_per_s=case.batch * case.seq_len / median,
        tflops=attention_flops(case) / median / 1e12,
        memory_method=measured.memory_method,
        error=measured.error,
        mechanism_metrics=measured.metrics,
    )
    if measured.peak_memory_bytes is not None:
        row["peak_memory_mb"] = measured.peak_memory_bytes / _MB
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


@contextlib.contextmanager
def _runner(isolate: bool) -> Iterator[Callable]:
    """A `run(func, **kwargs)`: in a fresh fork of a clean worker, or in this process."""
    if not isolate:
        yield lambda func, **kwargs: func(**kwargs)
        return
    with ForkWorker() as worker:
        yield worker.call


def clear_backend_caches() -> None:
    """Drop the per-geometry caches backends keep (sdpa's (L x L) masks, flex's block masks).

    In-process rows would otherwise inherit earlier rows' device memory.
    """
    for name in backend_names():
        get_backend(name).clear_cache()


def summarize(rows: list[dict], seconds: float) -> dict:
    counts = {status: sum(row["status"] == status for row in rows) for status in (OK, SKIPPED, OOM, ERROR)}
    return {"rows": len(rows), **counts, "seconds": round(seconds, 2)}


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
    timing = Timing(
        str(device),
        sweep.warmup,
        sweep.repeats,
        sweep.threads or torch.get_num_threads(),
        isolate,
        sweep.paired,
        sweep.baselines,
    )
    telemetry = GpuTelemetry(device)
    notes = [telemetry.note] if telemetry.note else []
    if device.type == "cpu" and not isolate:
        notes.append("no CPU peak memory: rows ran in this process (isolation off)")

    rows, partial = [], False
    with _runner(isolate) as run:
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
    summary["partial"] = partial
    return BenchResult(rows, summary, notes, partial)

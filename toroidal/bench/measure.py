"""Measuring one case (on CPU this runs inside a worker fork): `toroidal_attention` or a mechanism's
kernel, its plain-SDPA baselines timed in alternation with it, and a mechanism's approximation error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from toroidal.bench.cases import BenchCase, SdpaCall, baseline_calls
from toroidal.functional import toroidal_attention
from toroidal.kernels import backend_names, get_backend
from toroidal.mechanisms import build_kernel, get_mechanism
from toroidal.runtime.devices import DTYPES
from toroidal.runtime.timing import NOISY, PeakMemory, StopRule, device_sync, timed_rounds, timed_run

ERROR_MAX_PLATTER_TOKENS = 16384  # above this, the exact attention for the error column costs too much

StepFactory = Callable[[torch.device], Callable[[], object]]


@dataclass(frozen=True)
class Timing:
    """How to measure: runs, threads, and whether this process is a disposable fork (CPU memory)."""

    device: str = "cpu"
    warmup: int = 3
    repeats: int = 5  # the fewest timed runs
    threads: int | None = None
    isolated: bool = False
    # Time each row's plain-SDPA baselines in the same process, alternating with the row's own
    # runs, so that a ratio compares runs made moments apart on a machine whose speed drifts.
    paired: bool = True
    baselines: bool = True  # False: time the rows only (overhead and vs_standard stay null)
    # Seconds of timed runs per measurement: repeat until the spread (IQR / median) of every timed
    # series is below `noisy`, at most this long. 0: exactly `repeats` runs.
    max_time: float = 0.0
    noisy: float = NOISY

    def stop_rule(self) -> StopRule:
        return StopRule(min_runs=self.repeats, max_time=self.max_time, target=self.noisy)


@dataclass
class Measurement:
    times: list[float]  # seconds, one per timed run
    peak_memory_bytes: int | None
    memory_method: str | None
    metrics: dict | None = None  # the mechanism kernel's get_metrics() after the timed runs
    error: float | None = None  # relative output error against the attention it approximates
    # Paired baselines: name -> seconds per round (aligned with `times`), or why it failed.
    baseline_times: dict[str, list[float] | str] = field(default_factory=dict)


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


def measure_steps(
    make_step: StepFactory, timing: Timing, paired: dict[str, StepFactory] | None = None
) -> Measurement:
    """Time `make_step(device)()`; with `paired`, alternate each round with one run of every baseline.

    Rounds repeat until `timing.stop_rule()` stops them: at least `repeats`, then until the row's and
    every baseline's runs are stable or `max_time` is spent. Peak memory covers the step's setup and
    warm-up runs (and its first timed run when there is no warm-up), never the baselines, which are
    set up after it.
    """
    device = torch.device(timing.device)
    if timing.threads is not None:
        torch.set_num_threads(timing.threads)
    torch.manual_seed(0)
    sync = device_sync(device)
    if not paired:
        with PeakMemory(device, timing.isolated) as peak:
            step = make_step(device)
            for _ in range(timing.warmup):
                step()
            (times,) = timed_rounds([step], timing.stop_rule(), sync)
        return Measurement(times, peak.bytes, peak.method)
    with PeakMemory(device, timing.isolated) as peak:
        step = make_step(device)
        for _ in range(timing.warmup):
            step()
        first = [] if timing.warmup else [timed_run(step, sync)]
    baselines = paired_steps(paired, device, timing.warmup)
    running = [name for name, baseline in baselines.items() if callable(baseline)]
    times, *paired_times = timed_rounds(
        [step, *(baselines[name] for name in running)], timing.stop_rule(), sync, made=[first]
    )
    baseline_times = {**baselines, **dict(zip(running, paired_times, strict=True))}
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
    """Time one case: `toroidal_attention` for the toroidal mechanism, else the mechanism's kernel
    module (whose metrics and error the row reports)."""
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
    measured = measure_steps(make_step, timing, paired)
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
    """Time plain `scaled_dot_product_attention` (a baseline, unpaired)."""
    return measure_steps(sdpa_step_factory(call), timing)


def clear_backend_caches() -> None:
    """Drop the per-geometry caches backends keep (sdpa's (L x L) masks, flex's block masks).

    In-process rows would otherwise inherit earlier rows' device memory.
    """
    for name in backend_names():
        get_backend(name).clear_cache()

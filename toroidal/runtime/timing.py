"""Measuring on a device: the fence before and after a timed run, timed runs with warm-up, the rule
that repeats them until their spread is small (`StopRule`, `timed_rounds`), the peak memory a block
of code adds, per-measurement GPU telemetry (NVML), and the profiler ranges modules label stages with."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd import profiler as autograd_profiler

STAGE_PREFIX = "toroidal::"  # profiler ranges of the stages of a layer (`toroidal profile` reads them)
TELEMETRY_FIELDS = ("gpu_name", "gpu_util_pct", "gpu_memory_used_mb", "gpu_power_w")
_MB = 1024**2
# The stopping rule of torch.utils.benchmark's `Timer.adaptive_autorange`, applied per run (see StopRule).
NOISY = 0.10  # spread (IQR / median) above which a measurement is noisy: adaptive_autorange's threshold
MIN_TIME = 0.2  # seconds of runs before a small spread may stop them (adaptive_autorange: > 3 x 0.05 s)
MIN_SAMPLES = 5  # runs per series before its spread may stop them (adaptive_autorange wants more than 3)


def _nothing() -> None:
    pass


def stage(name: str) -> contextlib.AbstractContextManager:
    """The profiler range `toroidal::<name>` while a torch profiler runs, else nothing.

    An idle `record_function` still costs ~10 us (6 ranges took 20% of a small CPU forward);
    the check is the one torch's own compiler uses before opening its ranges.
    """
    if autograd_profiler._is_profiler_enabled:
        return torch.profiler.record_function(STAGE_PREFIX + name)
    return contextlib.nullcontext()


def device_sync(device: str | torch.device) -> Callable[[], None]:
    """A fence for `device`: waits for its queued work (CUDA); on the CPU work is done when it returns."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _nothing


def synchronize(device: str | torch.device) -> None:
    """Wait until `device` has finished the work queued on it."""
    device_sync(device)()


def timed_run(
    step: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds of one run of `step`, fenced by `sync` on both sides."""
    sync()
    start = clock()
    step()
    sync()
    return clock() - start


def time_call(step: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Wall time of `repeats` runs of `step` after `warmup` untimed ones; `sync` fences the device."""
    for _ in range(warmup):
        step()
    return [timed_run(step, sync) for _ in range(repeats)]


def percentile(times: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `times`, interpolated linearly between the nearest runs."""
    ordered = sorted(times)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(times: Sequence[float]) -> float | None:
    """The interquartile range over the median of run times (None for fewer than two runs)."""
    if len(times) < 2:
        return None
    median = statistics.median(times)
    iqr = percentile(times, 0.75) - percentile(times, 0.25)
    return iqr / median if median > 0 else math.inf


@dataclass(frozen=True)
class StopRule:
    """When timed runs may stop: `Timer.adaptive_autorange`'s rule, counted in runs, not blocks.

    Never before `min_runs` runs of every series; then once every series' spread is below `target`,
    with at least MIN_SAMPLES runs and `min_time` seconds spent; in any case after `max_time`
    seconds. `max_time` 0 gives exactly `min_runs` runs.
    """

    min_runs: int = 1
    max_time: float = 0.0
    target: float = NOISY
    min_time: float = MIN_TIME

    def done(self, series: Sequence[Sequence[float]], elapsed: float) -> bool:
        runs = min((len(times) for times in series), default=0)
        if runs < self.min_runs:
            return False
        if elapsed >= self.max_time:
            return True
        if runs < MIN_SAMPLES or elapsed < self.min_time:
            return False
        return all(spread(times) < self.target for times in series)


def timed_rounds(
    steps: Sequence[Callable[[], object]],
    rule: StopRule,
    sync: Callable[[], None],
    made: Sequence[Sequence[float]] = (),
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Rounds of one timed run of each step in turn until `rule` stops them: seconds per step.

    Paired steps timed moments apart drift together on a machine whose speed drifts. `made` holds
    runs already timed (step by step, e.g. a first run inside a memory measurement); they count,
    and a round skips a step whose runs are ahead of the others.
    """
    times = [list(made[index]) if index < len(made) else [] for index in range(len(steps))]
    if not steps:
        return times
    start = clock()
    while not rule.done(times, clock() - start):
        rounds = min(len(runs) for runs in times)
        for step, runs in zip(steps, times, strict=True):
            if len(runs) <= rounds:
                runs.append(timed_run(step, sync, clock))
    return times


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable processes), or None where it cannot be read."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # no getloadavg (Windows), or it failed
        return None


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
    """Peak memory growth of the enclosed code: CUDA allocator stats, or the resident-set growth of
    a disposable process (`isolated`: one that ran nothing else; Linux). Elsewhere `bytes` stays None."""

    def __init__(self, device: str | torch.device, isolated: bool):
        self.device, self.isolated = torch.device(device), isolated
        self.bytes: int | None = None
        self.method: str | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.isolated:
            # Reset the high-water mark (Linux >= 4.0); ru_maxrss would keep the process's own.
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


class GpuTelemetry:
    """Per-measurement NVML readings (TELEMETRY_FIELDS); `note` says why there are none."""

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
            from toroidal.runtime.install import missing_module_message

            self.note = f"no GPU telemetry: {missing_module_message('pynvml')}"
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

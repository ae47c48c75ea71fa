"""Profile one attention layer step with torch.profiler: top operators, time per stage, peak memory.

Stages are the `record_function` ranges the layers label themselves with (`toroidal::projections`,
`rotary`, `kernel`, `fusion`, `output`: see `ToroidalAttention.forward`); fwd+bwd adds `backward`.
Time in no stage (reshapes, dropout) is `other`. Another mechanism runs as its standalone layer
(`toroidal.mechanisms.build_attention`), which labels projections, kernel and output.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from toroidal.attention import ToroidalAttention
from toroidal.config import ToroidalConfig
from toroidal.functional import backend_for_shape
from toroidal.mechanisms import build_attention
from toroidal.runtime.devices import DTYPES
from toroidal.runtime.timing import STAGE_PREFIX, GpuTelemetry, PeakMemory, device_sync

LABEL = STAGE_PREFIX
FORWARD_STAGES = ("projections", "rotary", "kernel", "fusion", "output")
_MB = 1024**2


@dataclass
class ProfileSpec:
    """One configuration to profile: the layer's config and the input it sees."""

    config: ToroidalConfig
    batch: int = 1
    seq_len: int = 1024
    dtype: str = "fp32"
    mode: str = "fwd+bwd"
    device: str = "cpu"
    warmup: int = 1
    steps: int = 1  # profiled steps; times are per step
    top: int = 15
    threads: int | None = None
    mechanism: str = "toroidal"  # another one runs `build_attention(mechanism, ...)`
    options: dict = field(default_factory=dict)  # the kernel options of a mechanism other than toroidal

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.mode not in ("fwd", "fwd+bwd"):  # a decoding step (stream) is `toroidal bench --mode stream`
            raise ValueError(f"mode {self.mode!r} cannot be profiled; choose fwd or fwd+bwd")
        if min(self.batch, self.seq_len, self.steps, self.top) < 1 or self.warmup < 0:
            raise ValueError("batch, seq_len, steps and top must be >= 1, warmup >= 0")


@dataclass
class ProfileResult:
    stages: list[dict]  # stage, calls, cpu_ms, device_ms, pct (per step)
    operators: list[dict]  # the top operators by self time (per step)
    summary: dict
    notes: list[str]
    profiler: profile | None = field(default=None, repr=False)

    def export_trace(self, path: str | os.PathLike) -> Path:
        """Write the Chrome trace (chrome://tracing, Perfetto) to `path` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self.profiler.export_chrome_trace(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path


def chosen_backend(spec: ProfileSpec) -> str | None:
    """The backend the layer's kernel call runs (auto resolved); None where it is not `toroidal_attention`
    (another mechanism, or the FFT approximation)."""
    cfg = spec.config
    if spec.mechanism != "toroidal" or cfg.approximation == "fft":
        return None
    return backend_for_shape(
        (spec.batch, cfg.n_heads, spec.seq_len, cfg.head_dim),
        device=spec.device,
        dtype=DTYPES[spec.dtype],
        training=spec.mode == "fwd+bwd",
        backend=cfg.backend,
        depth=cfg.depth,
        lambda_distance=cfg.lambda_distance,
        period=cfg.period_for(spec.seq_len),
        causal=cfg.causal,
        window=cfg.window,
    )


def _ms(microseconds: float, steps: int) -> float:
    return microseconds / 1e3 / steps


def _device_us(event) -> float:
    # torch >= 2.4 says "device"; older releases only "cuda"
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0) or 0.0


def _self_device_us(event) -> float:
    return (
        getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0) or 0.0
    )


def stage_rows(averages, steps: int, on_device: bool) -> list[dict]:
    """Per-step time of each labelled stage, `other` (step minus stages) and the whole step."""
    by_name = {event.key: event for event in averages if event.key.startswith(LABEL)}

    def row(name, cpu_us, device_us, calls):
        return {
            "stage": name,
            "calls": calls / steps,
            "cpu_ms": _ms(cpu_us, steps),
            "device_ms": _ms(device_us, steps) if on_device else None,
        }

    step = by_name.get(LABEL + "step")
    stages = FORWARD_STAGES + (("backward",) if LABEL + "backward" in by_name else ())
    rows = []
    for stage in stages:
        event = by_name.get(LABEL + stage)
        if event is not None:
            rows.append(row(stage, event.cpu_time_total, _device_us(event), event.count))
    if step is not None:
        cpu_rest = step.cpu_time_total - sum(r["cpu_ms"] for r in rows) * 1e3 * steps
        device_rest = _device_us(step) - sum(r["device_ms"] or 0.0 for r in rows) * 1e3 * steps
        rows.append(row("other", max(cpu_rest, 0.0), max(device_rest, 0.0), step.count))
        rows.append(row("step", step.cpu_time_total, _device_us(step), step.count))
    total = rows[-1] if rows and rows[-1]["stage"] == "step" else None
    basis = "device_ms" if on_device and total and total["device_ms"] else "cpu_ms"
    for r in rows:
        r["pct"] = 100.0 * r[basis] / total[basis] if total and total[basis] else None
    return rows


def operator_rows(averages, steps: int, top: int, on_device: bool) -> list[dict]:
    """The `top` operators by self time (device time on CUDA), our stage labels left out."""
    events = [e for e in averages if not e.key.startswith(LABEL) and not e.key.startswith("ProfilerStep")]
    self_time = _self_device_us if on_device else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    rows = []
    for event in events[:top]:
        rows.append(
            {
                "name": event.key,
                "calls": event.count / steps,
                "self_cpu_ms": _ms(event.self_cpu_time_total, steps),
                "cpu_total_ms": _ms(event.cpu_time_total, steps),
                "self_device_ms": _ms(_self_device_us(event), steps) if on_device else None,
                "device_total_ms": _ms(_device_us(event), steps) if on_device else None,
                "self_pct": 100.0 * self_time(event) / total,
            }
        )
    return rows


def peak_allocated_bytes(prof: profile, device_type: str) -> int | None:
    """Peak bytes allocated during profiling on `device_type`, replayed from the allocation events.

    Uses the profiler's event tree (a private torch API): None where it is missing.
    """
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:
        return None
    allocations, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device_type:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def _layer(spec: ProfileSpec) -> torch.nn.Module:
    if spec.mechanism == "toroidal":
        return ToroidalAttention(spec.config)
    cfg = spec.config
    return build_attention(
        spec.mechanism, cfg.d_model, cfg.n_heads, causal=cfg.causal, bias=cfg.bias, **spec.options
    )


def profile_attention(spec: ProfileSpec) -> ProfileResult:
    """Run `spec.warmup` unprofiled steps, then profile `spec.steps` steps of forward (and backward)."""
    device = torch.device(spec.device)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(0)
    training = spec.mode == "fwd+bwd"
    module = _layer(spec).to(device=device, dtype=DTYPES[spec.dtype])
    x = torch.randn(spec.batch, spec.seq_len, spec.config.d_model, device=device, dtype=DTYPES[spec.dtype])
    x.requires_grad_(training)
    on_device = device.type == "cuda"
    sync = device_sync(device)
    chosen = chosen_backend(spec)

    def step():
        with record_function(LABEL + "step"), torch.set_grad_enabled(training):
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out  # ToroidalAttention also returns weights
            if training:
                with record_function(LABEL + "backward"):
                    out.backward(torch.ones_like(out))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    for _ in range(spec.warmup):
        step()
    sync()
    with (
        PeakMemory(device, isolated=False) as cuda_peak,
        profile(activities=activities, profile_memory=True) as prof,
    ):
        start = time.perf_counter()  # not the profiler's own start and stop
        for _ in range(spec.steps):
            step()
        sync()
        wall = time.perf_counter() - start

    if on_device:
        peak, method = cuda_peak.bytes, cuda_peak.method
    else:
        peak, method = peak_allocated_bytes(prof, device.type), "profiler allocation events (CPU allocator)"
    averages = prof.key_averages()
    telemetry = GpuTelemetry(device)
    summary = {
        "mechanism": spec.mechanism,
        "backend": spec.config.backend,
        "chosen": chosen,
        "mechanism_metrics": module.get_metrics() if hasattr(module, "get_metrics") else None,
        "step_ms": wall * 1e3 / spec.steps,
        "peak_memory_mb": peak / _MB if peak is not None else None,
        "memory_method": method if peak is not None else None,
        "steps": spec.steps,
        "tokens_per_s": spec.batch * spec.seq_len * spec.steps / wall,
        **telemetry.sample(),
    }
    notes = [telemetry.note] if telemetry.note else []
    notes.append(
        "times are under the profiler, which adds overhead per operator; use `toroidal bench` for speed"
    )
    return ProfileResult(
        stages=stage_rows(averages, spec.steps, on_device),
        operators=operator_rows(averages, spec.steps, spec.top, on_device),
        summary=summary,
        notes=notes,
        profiler=prof,
    )

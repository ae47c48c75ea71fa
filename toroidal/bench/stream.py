"""The rows of `toroidal bench --mode stream`: one decoding step after N context tokens, streaming
(`StreamingToroidalAttention` on a LatentKV of LATENT_SIZE slots) against exact KV-cache decoding,
with the memory each holds for the context (docs/internals.md "Measuring")."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from toroidal.attention import ToroidalAttention
from toroidal.bench.cases import BenchCase
from toroidal.bench.measure import Measurement, Timing
from toroidal.bench.rows import OK, SKIPPED, empty_row, failed_row, stability_fields, time_fields
from toroidal.config import ToroidalConfig
from toroidal.functional import selected_backend
from toroidal.kernels import BackendUnavailable
from toroidal.kv_cache import KVCache
from toroidal.runtime.devices import DTYPES
from toroidal.runtime.timing import PeakMemory, device_sync, timed_rounds
from toroidal.streaming import LatentKV, StreamingToroidalAttention, slot_of

STREAM = "stream"
LATENT_SIZE = 64
UPDATE = "gru"
PATHS = ("stream", "kv_cache")
STREAM_FIELDS = (
    "kv_cache_ms",
    "stream_vs_kv_cache",
    "state_bytes",
    "kv_cache_bytes",
    "kv_cache_peak_memory_mb",
    "latent_size",
    "update",
)
_MB = 1024**2


def decoding_period(case: BenchCase) -> int:
    return case.period if case.period is not None else case.seq_len


def decoding_module(case: BenchCase) -> ToroidalAttention:
    """The causal module both paths share (standard rotary, low-rank fusion)."""
    config = ToroidalConfig(
        d_model=case.d_model,
        n_heads=case.heads,
        depth=case.depth,
        lambda_distance=case.lambda_distance,
        period=decoding_period(case),
        causal=True,
        window=case.window,
        backend=case.backend,
        max_len=case.seq_len + 1,
    )
    return ToroidalAttention(config).eval()


def context_bytes(case: BenchCase) -> tuple[int, int]:
    """(streaming state bytes, KV-cache bytes) held for a context of N tokens, by arithmetic."""
    item = DTYPES[case.dtype].itemsize
    latent = 2 * case.batch * case.heads * LATENT_SIZE * case.head_dim * item + LATENT_SIZE * 4
    return latent, 2 * case.batch * case.heads * case.seq_len * case.head_dim * item


def kv_cache_backend(case: BenchCase) -> str:
    """The backend that decodes one token at position N (auto resolved), from stride-0 stand-ins."""
    stand_in = torch.empty((), device=case.device, dtype=DTYPES[case.dtype])
    q = stand_in.expand(case.batch, case.heads, 1, case.head_dim)
    k = stand_in.expand(case.batch, case.heads, case.seq_len + 1, case.head_dim)
    return selected_backend(
        q,
        k,
        k,
        depth=case.depth,
        lambda_distance=case.lambda_distance,
        period=decoding_period(case),
        causal=True,
        window=case.window,
        backend=case.backend,
        q_offset=case.seq_len,
    )


def _context_state(stream: StreamingToroidalAttention, case: BenchCase, device, dtype) -> LatentKV:
    """The state after N random tokens: random slots, the counts N tokens leave, step N."""
    state = stream.init_state(case.batch, device, dtype)
    slots = slot_of(torch.arange(case.seq_len), stream.latent_size, decoding_period(case))
    counts = torch.bincount(slots, minlength=stream.latent_size).to(device=device, dtype=state.counts.dtype)
    return LatentKV(torch.randn_like(state.keys), torch.randn_like(state.values), counts, case.seq_len)


def _step(
    case: BenchCase, path: str, module: ToroidalAttention, device, latent_size: int = LATENT_SIZE
) -> Callable[[], object]:
    """Build the context of `path` (inside the memory measurement) and return one decoding step."""
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.batch, case.d_model, device=device, dtype=dtype)
    if path == "stream":
        stream = StreamingToroidalAttention(module, latent_size, UPDATE).to(device=device, dtype=dtype)
        state = _context_state(stream, case, device, dtype)
        return lambda: stream.forward_streaming(x, state)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    keys = torch.randn(shape, device=device, dtype=dtype)
    values = torch.randn(shape, device=device, dtype=dtype)
    # A fresh cache object per step: every timed step decodes position N, not N, N+1, ...
    return lambda: module(x[:, None], cache=KVCache(keys, values))


def measure_decode_step(case: BenchCase, timing: Timing, path: str) -> Measurement:
    """Time one decoding step of `path` ('stream' or 'kv_cache'); runs in a worker fork on CPU."""
    if path not in PATHS:
        raise ValueError(f"path {path!r} must be one of {', '.join(PATHS)}")
    device = torch.device(timing.device)
    if timing.threads is not None:
        torch.set_num_threads(timing.threads)
    torch.manual_seed(0)
    module = decoding_module(case).to(device=device, dtype=DTYPES[case.dtype])  # weights: not the context
    sync = device_sync(device)
    with torch.no_grad():  # first a step on a tiny context: loading code is not the context's memory
        _step(replace(case, seq_len=1), path, module, device, latent_size=1)()
    with torch.no_grad(), PeakMemory(device, timing.isolated) as peak:
        step = _step(case, path, module, device)
        for _ in range(timing.warmup):
            step()
        (times,) = timed_rounds([step], timing.stop_rule(), sync)
    return Measurement(times, peak.bytes, peak.method)


def _problem(case: BenchCase, budget_gb: float | None) -> str | None:
    if not case.causal:
        return "streaming and KV-cache decoding are causal; use --causal"
    if getattr(case, "mechanism", "toroidal") != "toroidal":
        return "--mode stream measures the toroidal mechanism only"
    if budget_gb is not None and context_bytes(case)[1] > budget_gb * 1024**3:
        gib = context_bytes(case)[1] / 1024**3
        return f"the KV cache of N={case.seq_len} would take ~{gib:.1f} GiB, over --memory-budget-gb"
    try:
        decoding_module(case)
    except ValueError as error:
        return str(error)
    return None


def bench_stream_case(case: BenchCase, run: Callable, timing: Timing, budget_gb: float | None = None) -> dict:
    """One `stream` row: streaming step times, the KV-cache step time, their ratio and memory.

    Returns the row with the bench's fields plus STREAM_FIELDS; problems become
    `skipped`, `oom` or `error` rows, as in `toroidal.bench.sweep.bench_case`.
    """
    problem = case.problem() or _problem(case, budget_gb)
    if problem is not None:
        return _with_stream_fields(empty_row(case, SKIPPED, problem))
    try:
        chosen = kv_cache_backend(case)
    except BackendUnavailable as error:
        return _with_stream_fields(empty_row(case, SKIPPED, str(error)))
    try:
        stream = run(measure_decode_step, case=case, timing=timing, path="stream")
        cached = run(measure_decode_step, case=case, timing=timing, path="kv_cache")
    except BackendUnavailable as error:
        return _with_stream_fields(empty_row(case, SKIPPED, str(error), chosen))
    except Exception as error:
        return _with_stream_fields(failed_row(case, error, chosen))
    row = _with_stream_fields(empty_row(case, OK, None, chosen))
    median, cached_median = statistics.median(stream.times), statistics.median(cached.times)
    state_bytes, cache_bytes = context_bytes(case)
    row.update(
        time_fields(stream.times),
        tokens_per_s=case.batch / median,
        memory_method=stream.memory_method,
        kv_cache_ms=cached_median * 1e3,
        stream_vs_kv_cache=median / cached_median,
        state_bytes=state_bytes,
        kv_cache_bytes=cache_bytes,
        **stability_fields(stream.times, [cached.times], timing.noisy),  # the KV-cache step: the baseline
    )
    if stream.peak_memory_bytes is not None:
        row["peak_memory_mb"] = stream.peak_memory_bytes / _MB
    if cached.peak_memory_bytes is not None:
        row["kv_cache_peak_memory_mb"] = cached.peak_memory_bytes / _MB
    return row


def _with_stream_fields(row: dict) -> dict:
    row.update(dict.fromkeys(STREAM_FIELDS))
    row.update(latent_size=LATENT_SIZE, update=UPDATE)
    return row

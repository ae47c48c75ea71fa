"""`toroidal bench --tune`: time every backend that can serve each shape bucket of a sweep and
return the winners as a tuning table (`toroidal.kernels.tuning_table`) for `auto` to consult."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from toroidal.bench.cases import materialized_bytes
from toroidal.bench.measure import clear_backend_caches
from toroidal.functional import plan_call
from toroidal.kernels.base import Backend, BackendUnavailable, KernelRequest, backend_names, get_backend
from toroidal.kernels.tuning_table import Bucket, TunedEntry, TuningTable
from toroidal.runtime.devices import DTYPES
from toroidal.runtime.timing import device_sync, time_call

TILE_CANDIDATES = (64, 128, 256, 512)  # blockwise tile sizes tried, in platter-tokens
DEFAULT_MEMORY_GB = 4.0  # skip candidates whose (L x L) scores would exceed this (they run in-process)


def _candidates(names: list[str], request: KernelRequest, tiles) -> list[tuple[str, Backend, int | None]]:
    """(label, backend, tile) for each named backend; blockwise once per tile size."""
    out = []
    length = max(request.n_queries, request.n_keys) * request.geometry.depth
    for name in names:
        backend = get_backend(name)
        if getattr(backend, "with_tile", None) is None:
            out.append((name, backend, None))
            continue
        usable = [tile for tile in tiles if tile <= length] or [min(tiles)]
        out += [(f"{name}/tile={tile}", backend.with_tile(tile), tile) for tile in usable]
    return out


def tune(sweep, *, tiles=TILE_CANDIDATES, on_case: Callable[[str], None] | None = None) -> TuningTable:
    """Measure the backends that can serve each shape bucket of `sweep` (a `toroidal.bench.BenchSweep`).

    The candidates are the sweep's backends, or every registered one when they include `auto`.
    Runs in this process: timing only, with the sweep's repeats and threads and at least one
    warm-up call (first calls compile, or build the caches later calls reuse).
    Candidates whose materialized (L x L) scores would exceed the sweep's memory budget (default
    DEFAULT_MEMORY_GB) are skipped, as are those that fail. `on_case(label)` before each bucket.
    """
    device = torch.device(sweep.device)
    if sweep.threads is not None:
        torch.set_num_threads(sweep.threads)
    budget_bytes = (sweep.memory_budget_gb or DEFAULT_MEMORY_GB) * 1024**3
    sync = device_sync(device)
    names = backend_names() if "auto" in sweep.backend else list(dict.fromkeys(sweep.backend))
    table = TuningTable()
    for case in sweep.cases():
        if case.problem() is not None:
            continue
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        q, k, v = (
            torch.randn(shape, device=device, dtype=DTYPES[case.dtype], requires_grad=case.training)
            for _ in range(3)
        )
        kwargs = {name: value for name, value in case.kernel_kwargs().items() if name != "backend"}
        with torch.set_grad_enabled(case.training):
            request = plan_call(q, k, v, **kwargs).request
        bucket = Bucket.for_request(request)
        if bucket in table.entries:
            continue
        if on_case is not None:
            on_case(f"{bucket.dtype} L={case.platter_tokens} {'causal' if case.causal else 'bidirectional'}")
        measured, skipped = {}, {}
        for label, backend, _tile in _candidates(names, request, tiles):
            reason = backend.unavailable_reason(request)
            if reason is None and materialized_bytes(backend.name, case) > budget_bytes:
                reason = f"would materialize more than {budget_bytes / 1024**3:g} GiB of (L x L) scores"
            if reason is not None:
                skipped[label] = reason
                continue
            step = _step(backend, q, k, v, kwargs, case.training)
            try:
                times = time_call(step, max(1, sweep.warmup), sweep.repeats, sync)
            except (BackendUnavailable, RuntimeError, ValueError, MemoryError) as error:
                skipped[label] = f"{type(error).__name__}: {error}".splitlines()[0]
                continue
            finally:
                clear_backend_caches()
            measured[label] = statistics.median(times) * 1e3
        if measured:
            label = min(measured, key=measured.get)
            name, _, tile = label.partition("/tile=")
            table.entries[bucket] = TunedEntry(
                bucket, name, int(tile) if tile else None, measured[label], measured, skipped
            )
    return table


def _step(backend: Backend, q, k, v, kwargs: dict, training: bool) -> Callable[[], object]:
    """One timed call of `backend` on the planned platter-token problem (and its backward)."""

    def run():
        call = plan_call(q, k, v, **kwargs)
        out, _ = backend.forward(call.q, call.k, call.v, call.geometry, call.padding, call.scale, False)
        return out

    if not training:

        def inference():
            with torch.no_grad():
                return run()

        return inference

    def train():
        for t in (q, k, v):
            t.grad = None
        run().sum().backward()

    return train

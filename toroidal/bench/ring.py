"""The sequence-parallel rows of `toroidal bench`: `ring_attention` timed across W local processes,
each holding one sequence shard (docs/internals.md "Measuring" says how ranks are timed)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from toroidal.bench.cases import BenchCase, baseline_calls
from toroidal.bench.measure import (
    Measurement,
    Timing,
    inference_step,
    paired_steps,
    random_inputs,
    sdpa_step_factory,
    training_step,
)
from toroidal.bench.worker import WorkerDied
from toroidal.kernels import BackendUnavailable
from toroidal.ring import ring_attention
from toroidal.runtime.launch import RankFailed, run_local_group
from toroidal.runtime.timing import PeakMemory, device_sync, timed_run


def ring_layout(case: BenchCase) -> str:
    """Zigzag balances the causal triangle across ranks; without causal masking every rank has equal work."""
    return "zigzag" if case.causal else "contiguous"


def ring_chosen(case: BenchCase) -> str:
    """The layout a ring row runs (its `chosen` field); raises BackendUnavailable when it cannot run."""
    world, layout = case.ring_world_size, ring_layout(case)
    parts = 2 * world if layout == "zigzag" else world
    if case.seq_len % parts:
        raise BackendUnavailable(
            f"ring over {world} ranks ({layout} layout) needs N divisible by {parts}, got N={case.seq_len}"
        )
    device = torch.device(case.device)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise BackendUnavailable(
            f"ring over {world} ranks on CUDA needs {world} GPUs (one per rank); "
            f"{torch.cuda.device_count()} visible"
        )
    return layout


def _measure_rank(rank: int, world: int, case: BenchCase, timing: Timing) -> Measurement:
    device = torch.device("cuda", rank) if case.device.startswith("cuda") else torch.device("cpu")
    local_sync = device_sync(device)

    def sync():  # every rank starts and ends a timed run together
        local_sync()
        dist.barrier()

    torus = {name: value for name, value in case.kernel_kwargs().items() if name != "backend"}

    def attend(q, k, v):
        return ring_attention(q, k, v, **torus, layout=ring_layout(case))

    torch.manual_seed(rank)
    sync()  # the group's own first-use buffers are not the row's memory
    # As in measure_steps: peak memory covers setup and warm-up, never the baselines.
    with PeakMemory(device, isolated=True) as peak:
        shape = (case.batch, case.heads, case.seq_len // world, case.head_dim)
        q, k, v = random_inputs(shape, case.dtype, case.training, device)
        step = (training_step if case.training else inference_step)(attend, q, k, v)
        for _ in range(timing.warmup):
            step()
        times = [] if timing.warmup else [timed_run(step, sync)]
    # Rank 0 times the paired baselines with the whole thread budget while the others wait.
    ring_threads, all_threads = torch.get_num_threads(), timing.threads or torch.get_num_threads()
    baselines = {}
    if rank == 0 and timing.paired and timing.baselines:
        torch.set_num_threads(all_threads)
        factories = {name: sdpa_step_factory(call) for name, call in baseline_calls(case).items()}
        baselines = paired_steps(factories, device, timing.warmup)
        torch.set_num_threads(ring_threads)
    baseline_times = {name: [] if callable(run) else run for name, run in baselines.items()}
    rule, start, round_ = timing.stop_rule(), time.perf_counter(), 0
    while True:
        # Rank 0, which holds the baselines, decides for every rank when the rounds stop.
        series = [times, *(runs for runs in baseline_times.values() if not isinstance(runs, str))]
        stop = torch.tensor([int(rule.done(series, time.perf_counter() - start))], device=device)
        dist.broadcast(stop, src=0)
        if stop.item():
            break
        if round_ >= len(times):
            times.append(timed_run(step, sync))
        torch.set_num_threads(all_threads)
        for name, baseline in baselines.items():
            if callable(baseline):
                baseline_times[name].append(timed_run(baseline, local_sync))
        torch.set_num_threads(ring_threads)
        round_ += 1
    return Measurement(times, peak.bytes, peak.method, baseline_times=baseline_times)


def measure_ring(case: BenchCase, timing: Timing) -> Measurement:
    """Time one ring row on `case.ring_world_size` spawned processes: the slowest rank's times."""
    world = case.ring_world_size
    device_type = torch.device(case.device).type
    threads = max(1, (timing.threads or torch.get_num_threads()) // world)
    try:
        ranks = run_local_group(
            _measure_rank, world, (case, timing), device_type=device_type, threads=threads
        )
    except RankFailed as error:  # a rank the OOM killer took reads as an oom row
        raise WorkerDied(str(error), error.signal_number) from None
    slowest = max(ranks, key=lambda measured: statistics.median(measured.times))
    peaks = [measured.peak_memory_bytes for measured in ranks]
    what = "peak RSS growth of each rank process" if device_type == "cpu" else "cuda max_memory_allocated"
    return Measurement(
        slowest.times,
        None if None in peaks else max(peaks),
        None if None in peaks else f"max over {world} ranks of {what}",
        baseline_times=ranks[0].baseline_times,
    )

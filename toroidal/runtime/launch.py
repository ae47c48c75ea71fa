"""Run a function on W fresh local processes joined in one `torch.distributed` group.

What `toroidal bench --ring-world-size` and the ring tests use instead of torchrun:
the processes are spawned (a fresh interpreter each, never a fork: a forked child of a
process that has run torch's OpenMP kernels can deadlock), rendezvous through a file
in a temporary folder (no port to pick) and hand their results back as files there.
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised or died; `signal_number` is set when a signal killed it (SIGKILL: likely OOM)."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number


def _rank_main(rank, world_size, fn, args, folder, device_type, threads, timeout_s):
    torch.set_num_threads(threads)
    backend = "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(
        backend,
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    path = Path(folder) / f"rank{rank}.pkl"
    with open(path.with_suffix(".tmp"), "wb") as out:
        pickle.dump(result, out)
    os.replace(path.with_suffix(".tmp"), path)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def run_local_group(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    *,
    device_type: str = "cpu",
    threads: int = 1,
    timeout_s: float = 300.0,
) -> list:
    """`fn(rank, world_size, *args)` on `world_size` spawned processes; their results in rank order.

    CPU ranks join a gloo group; CUDA ranks (one GPU each, rank r on cuda:r) an NCCL group.
    `fn` and its arguments must be picklable (a module-level function). Each rank runs
    `threads` torch threads. A rank that raises or dies raises `RankFailed` here; the other
    ranks are stopped, and a rank waiting on a dead peer gives up after `timeout_s`.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"{world_size} CUDA ranks need {world_size} GPUs (one per rank); "
            f"{torch.cuda.device_count()} visible"
        )
    with tempfile.TemporaryDirectory(prefix="toroidal-ring-") as folder:
        try:
            mp.start_processes(
                _rank_main,
                args=(world_size, fn, args, folder, device_type, threads, timeout_s),
                nprocs=world_size,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as error:
            raise RankFailed(f"rank {error.error_index} failed: {_last_line(str(error))}") from None
        except mp.ProcessExitedException as error:
            number = -error.exit_code if error.exit_code < 0 else None
            how = f"killed by {error.signal_name}" if number else f"exited with code {error.exit_code}"
            hint = " (likely the kernel's out-of-memory killer)" if number == signal.SIGKILL else ""
            raise RankFailed(f"rank {error.error_index} {how}{hint}", number) from None
        results = []
        for rank in range(world_size):
            with open(Path(folder) / f"rank{rank}.pkl", "rb") as data:
                results.append(pickle.load(data))
        return results

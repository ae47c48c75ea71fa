"""Fail fast on size: refuse a run whose estimated peak memory exceeds what its device has free.

The estimate comes from the library (`toroidal.runtime.memory`); this module words the verdict: the
estimate, what is available, and the nearest configuration that fits (the batch halved
first, then the sequence length). `TOROIDAL_MEMORY_LIMIT_GB` replaces the available memory,
for a machine whose free memory is misreported or an estimate the user knows is too high.
"""

from __future__ import annotations

from dataclasses import dataclass

from toroidal.runtime import memory
from toroidal_cli.errors import UserError

OVERRIDE_HINT = f"or set {memory.LIMIT_VARIABLE} (GiB) to override the available memory"


@dataclass(frozen=True)
class Verdict:
    fits: bool
    summary: str  # "estimated peak 1.2 GiB (...) of 20 GiB available on cpu"
    fix: str | None = None  # the nearest configuration that fits, when it does not


def available(device) -> int | None:
    try:
        return memory.available_bytes(device)
    except ValueError as error:  # a malformed TOROIDAL_MEMORY_LIMIT_GB
        raise UserError(str(error), f"set {memory.LIMIT_VARIABLE} to a number of GiB, or unset it") from None


def verdict(
    footprint: memory.Footprint, batch_flag: str = "--batch-size", seq_flag: str = "--seq-len"
) -> Verdict:
    """Whether `footprint` fits its device now, said in one line, with the nearest fit when not."""
    free = available(footprint.device)
    estimate = footprint.estimate
    if free is None:
        return Verdict(
            True, f"estimated peak {estimate.describe()}; free memory on {footprint.device} unknown"
        )
    if estimate.total <= free:
        free_text = f"{memory.format_bytes(free)} available on {footprint.device}"
        return Verdict(True, f"estimated peak {estimate.describe()} of {free_text}")
    summary = memory.exceeds(estimate, free, footprint.device)
    nearest = memory.nearest_fit(footprint.at, footprint.batch, footprint.seq_len, free)
    if nearest is None:
        fix = "no smaller batch or sequence length fits: use a smaller model or another device"
    else:
        batch, seq_len, smaller = nearest
        flags = f"{batch_flag} {batch}" + (f" {seq_flag} {seq_len}" if seq_len != footprint.seq_len else "")
        fix = f"{flags} fits (~{memory.format_bytes(smaller.total)})"
    return Verdict(False, summary, f"{fix}; {OVERRIDE_HINT}")


def refuse_if_too_big(footprint: memory.Footprint, **flags: str) -> None:
    """Raise a UserError naming the estimate and the nearest fit when the run cannot fit."""
    result = verdict(footprint, **flags)
    if not result.fits:
        raise UserError(result.summary, result.fix)


def sweep_memory_line(sweep) -> str:
    """A bench sweep's largest estimated row, and how many rows would be skipped for memory."""
    from toroidal.bench import case_backend, case_estimate
    from toroidal.kernels import BackendUnavailable

    estimates, cases = [], sweep.cases()
    for case in cases:
        try:
            chosen = case_backend(case) if case.problem() is None else None
        except (BackendUnavailable, ValueError):
            chosen = None
        estimate = case_estimate(chosen, case) if chosen is not None else None
        if estimate is not None:
            estimates.append((estimate.total, chosen, case))
    if not estimates:
        return "no row has an estimate (unavailable backends or other mechanisms)"
    total, chosen, case = max(estimates, key=lambda item: item[0])
    free = available(sweep.device)
    line = (
        f"{len(estimates)} of {len(cases)} rows estimated; the largest {memory.format_bytes(total)} "
        f"({chosen} N={case.seq_len} D={case.depth} B={case.batch} {case.mode})"
    )
    if free is None:
        return line
    over = sum(size > free for size, _, _ in estimates)
    return line + f"; {over} would be skipped as over the {memory.format_bytes(free)} available"


def module_footprint(case) -> memory.Footprint | None:
    """A profile's ToroidalAttention module on a bench case (None for other mechanisms)."""
    import dataclasses

    import torch

    from toroidal.bench import case_backend, case_shape

    if case.mechanism != "toroidal":
        return None

    def at(batch: int, seq_len: int) -> memory.Estimate:
        smaller = dataclasses.replace(case, batch=batch, seq_len=seq_len)
        return memory.attention_module(case_backend(smaller), case_shape(smaller), smaller.d_model)

    return memory.Footprint(
        at(case.batch, case.seq_len), torch.device(case.device), case.batch, case.seq_len, at
    )

"""The suite `toroidal validate` runs: which checks, in which order, for a mechanism."""

from __future__ import annotations

import torch

from toroidal.validate.decoding import check_decoding
from toroidal.validate.mechanisms import mechanism_suite
from toroidal.validate.report import KERNEL_TOLERANCE, Check, CheckResult, run_check
from toroidal.validate.toroidal import (
    FULL_CASES,
    QUICK_CASES,
    check_backends,
    check_causal_no_leak,
    check_geometry,
    check_gradcheck,
    check_module_gradients,
    check_orthogonality,
    check_padded_rows,
    check_research_snippet,
    check_shift_invariance,
    selected_backends,
)


def validation_suite(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quick: bool = False,
    backends: list[str] | None = None,
    mechanism: str = "toroidal",
) -> list[tuple[str, Check]]:
    """The checks of `toroidal validate`, as (group name, zero-argument function) pairs, in run order.

    Another `mechanism` gets the checks of `toroidal.validate.mechanisms` instead."""
    device = torch.device(device)
    if dtype not in KERNEL_TOLERANCE:
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16, bfloat16 or float64")
    if mechanism != "toroidal":
        return mechanism_suite(mechanism, device, dtype)
    selected_backends(backends)  # fail early on an unknown backend name
    cases = QUICK_CASES if quick else FULL_CASES
    exact = []
    if dtype == torch.float64:  # the reference is exact there, and finite differences are meaningful
        exact = [
            ("float64 shift invariance", lambda: check_shift_invariance(device, "reference", dtype)),
            ("gradcheck", lambda: check_gradcheck(device, backends)),
        ]
    return [
        ("distances", check_geometry),
        ("rope orthogonality", check_orthogonality),
        ("shift invariance", lambda: check_shift_invariance(device)),
        ("causal no-leak", lambda: check_causal_no_leak(device)),
        ("module gradients", lambda: check_module_gradients(device)),
        ("research snippet", lambda: check_research_snippet(device)),
        ("backends vs reference", lambda: check_backends(device, dtype, cases, backends)),
        ("padded rows", lambda: check_padded_rows(device, dtype, backends)),
        ("decoding", lambda: check_decoding(device)),
        *exact,
    ]


def run_validation(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quick: bool = False,
    backends: list[str] | None = None,
    mechanism: str = "toroidal",
) -> list[CheckResult]:
    results = []
    for group, check in validation_suite(device, dtype, quick, backends, mechanism):
        results.extend(run_check(group, check))
    return results



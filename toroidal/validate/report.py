"""What a validation check returns: `CheckResult`, verdicts against tolerances, and the summary."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

PASS, FAIL, SKIP = "pass", "fail", "skip"

# Max abs error allowed between a backend and the reference (float32; float64 for float64 inputs),
# for unit-scale inputs.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-12}
PROPERTY_TOLERANCE = 1e-5  # float32 module-level properties
EXACT_TOLERANCE = 1e-12  # float64 properties that hold exactly (cyclic-shift invariance)
# torch.autograd.gradcheck in float64: analytical against finite-difference Jacobians (eps 1e-6).
GRADCHECK_ATOL, GRADCHECK_RTOL = 1e-7, 1e-5
NO_LEAK_TOLERANCE = 1e-6
GRAD_NORM_BOUND = 1e3  # generous: unit-scale inputs give norms of order 1-10
ORTHOGONAL_MAX_SCORE = 0.1


@dataclass
class CheckResult:
    """One line of a validation report. `error` and `tolerance` are None where nothing is measured."""

    name: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(name: str, error: float, tolerance: float, detail: str = "") -> CheckResult:
    """Pass iff `error` is finite and at most `tolerance` (a NaN error always fails)."""
    error = float(error)
    ok = math.isfinite(error) and error <= tolerance
    return CheckResult(name, PASS if ok else FAIL, error, tolerance, detail)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in float64 on the CPU; NaN if either side has a NaN or infinity."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan
    return float((a - b).abs().max()) if a.numel() else 0.0


Check = Callable[[], list[CheckResult]]


def reason_of(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def run_check(group: str, check: Check, seed: int = 0) -> list[CheckResult]:
    """Run one check with a fixed seed (the caller's RNG is kept); a crash is a failure, not an abort."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return check()
        except Exception as error:
            return [CheckResult(group, FAIL, None, None, reason_of(error))]


def summarize(results: list[CheckResult]) -> dict:
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    return {**counts, "total": len(results), "ok": counts[FAIL] == 0}

"""`toroidal validate`: the mathematical properties and backend agreement checks, as a report.

    from toroidal.validate import run_validation, summarize

Modules: report (results and verdicts), toroidal (checks of toroidal attention and its
backends), mechanisms (checks of the other mechanisms), decoding (KV-cache and streaming
decoding), suite (which checks run, in which order).
"""

from toroidal.validate.report import FAIL, PASS, SKIP, CheckResult, run_check, summarize
from toroidal.validate.suite import run_validation, validation_suite

__all__ = [
    "FAIL",
    "PASS",
    "SKIP",
    "CheckResult",
    "run_check",
    "run_validation",
    "summarize",
    "validation_suite",
]

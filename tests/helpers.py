"""Assertions and inputs shared by the tests."""

import torch

from toroidal.functional import plan_call
from toroidal.kernels import get_backend
from toroidal_cli import progress


def small_cpu_default() -> str:
    """What `auto` picks for a small CPU forward call with no tuning table: `native` where it builds."""
    q = torch.zeros(1, 1, 8, 8)
    native_reason = get_backend("native").unavailable_reason(plan_call(q, q, q, depth=2).request)
    return "native" if native_reason is None else "sdpa"


def assert_one_line_error(result, *fragments: str) -> None:
    """A CliRunner result failed with exactly one stderr line containing every fragment, no traceback
    (progress lines before it, `bench: row 1/2 ...`, are not error lines)."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not progress.LINE.match(line)]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def padded_batch(n=7, seed=1):
    """Row 0 left-padded, row 1 right-padded, row 2 unpadded."""
    torch.manual_seed(seed)
    ids = torch.randint(3, 100, (3, n))
    mask = torch.ones(3, n, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, n - 2 :] = 0
    return ids.masked_fill(mask == 0, 0), mask

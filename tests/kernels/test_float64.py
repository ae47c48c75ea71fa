"""Float64: every backend that takes it computes in float64; `reference` is exact there (the ground truth)."""

import pytest
import torch
from typer.testing import CliRunner

from toroidal import toroidal_attention
from toroidal.functional import plan_call
from toroidal.kernels import BackendUnavailable, base, get_backend
from toroidal.validate import toroidal as validation
from toroidal.validate.report import FAIL, PASS, SKIP
from toroidal.validate.suite import validation_suite
from toroidal_cli.app import app

CPU_BACKENDS = ("sdpa", "blockwise", "native", "decomposed")


def _reason(name: str) -> str | None:
    q = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    return get_backend(name).unavailable_reason(plan_call(q, q, q, depth=2).request)


def _backends(*names):
    """`names` as parameters, each skipped where it cannot take float64 here (no C++ compiler)."""
    return [
        pytest.param(n, marks=pytest.mark.skipif(_reason(n) is not None, reason=f"{_reason(n)}"))
        for n in names
    ]


@pytest.mark.parametrize("backend", _backends("reference", "sdpa", "blockwise", "native"))
def test_cyclic_shift_invariance_is_exact_in_float64(backend):
    # Before float64 math: reference 4e-8, blockwise 5e-8 (the float32 softmax rounded differently per shift).
    results = validation.check_shift_invariance(backend=backend, dtype=torch.float64)
    assert [r.status for r in results] == [PASS] * 3, results
    assert max(r.error for r in results) < 1e-14


def test_backends_match_the_float64_reference_to_rounding():
    cases, backends = validation.QUICK_CASES, list(CPU_BACKENDS)
    results = validation.check_backends(dtype=torch.float64, cases=cases, backends=backends)
    by_name = {r.name: r for r in results}
    for name in CPU_BACKENDS:
        for what in ("values", "gradients"):
            row = by_name[f"backend {name}: {what}"]
            if _reason(name) is not None:
                assert row.status == SKIP
                continue
            assert row.status == PASS and row.error < 1e-12, row


def test_gradcheck_and_gradgradcheck_pass_for_every_float64_backend():
    rows = {r.name: r for r in validation.check_gradcheck(backends=list(CPU_BACKENDS))}
    assert rows["gradcheck + gradgradcheck: reference"].status == PASS  # reference claims double backward
    for name in CPU_BACKENDS:
        row = rows[f"gradcheck: {name}"]
        assert row.status == (SKIP if _reason(name) is not None else PASS), row
    # decomposed serves only some cases (no window below the half ring, no decoding offset).
    if _reason("decomposed") is None:
        assert "2/4 float64 cases" in rows["gradcheck: decomposed"].detail


def test_gradcheck_catches_a_wrong_backward(monkeypatch):
    class Detached(type(get_backend("reference"))):
        name = "detached-bias"
        double_backward = False

        def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
            out, _ = super().forward(q, k.detach(), v, geometry, key_padding, scale, False)
            return out, None  # no gradient reaches k

    monkeypatch.setitem(base._REGISTRY, "detached-bias", Detached())
    (row,) = [r for r in validation.check_gradcheck(backends=["detached-bias"]) if "detached" in r.name]
    assert row.status == FAIL and "Jacobian" in row.detail


def test_native_is_float64_exact_across_many_blocks():
    if _reason("native") is not None:
        pytest.skip(_reason("native"))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    kwargs = dict(depth=4, lambda_distance=0.7, causal=True, period=311, window=37)
    got = toroidal_attention(q, k, v, backend="native", **kwargs)
    assert got.dtype == torch.float64
    assert (got - toroidal_attention(q, k, v, backend="reference", **kwargs)).abs().max() < 1e-13


def test_lower_precisions_are_refused_with_the_reason():
    q = torch.randn(1, 1, 8, 4).half()
    for name in ("native", "decomposed"):
        with pytest.raises(BackendUnavailable, match="float32 or float64"):
            toroidal_attention(q, q, q, depth=2, backend=name)


def test_validate_takes_fp64_and_adds_the_exact_checks():
    groups = [group for group, _ in validation_suite(dtype=torch.float64, quick=True)]
    assert "float64 shift invariance" in groups and "gradcheck" in groups
    assert "gradcheck" not in [group for group, _ in validation_suite(dtype=torch.float32, quick=True)]
    result = CliRunner().invoke(app, ["validate", "--dtype", "float64", "--quick", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "fp64" in result.output

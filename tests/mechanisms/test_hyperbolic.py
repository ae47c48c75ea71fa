"""The `hyperbolic` mechanism: stability at every input scale, geometry against geoopt, the kernel
contract (causality, padding, decoding), metrics, learnable parameters, and `validate --mechanism`."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.mechanisms import Mechanism, build_attention, build_kernel, get_mechanism, mechanism_names
from toroidal.mechanisms.hyperbolic import (
    RIM_MARGIN,
    HyperbolicKernel,
    from_ball,
    geoopt_modules,
    gyromidpoint,
    pairwise_distance,
    to_ball,
)
from toroidal.runtime.install import install_command
from toroidal.validate import FAIL, PASS
from toroidal.validate.mechanisms import (
    check_hyperbolic_geometry,
    check_hyperbolic_stability,
    check_kernel_contract,
    check_tiled_full_budget,
)
from toroidal_cli.app import app

pytestmark = pytest.mark.usefixtures("one_thread")

_, stereographic = geoopt_modules()
B, H, N, E = 2, 2, 6, 8
NORMS = (1e-8, 1e-4, 1.0, 1e2, 1e4)


def of_norm(norm, dtype=torch.float32, shape=(B, H, N, E), seed=0):
    """Vectors of exactly `norm` (before rounding to dtype) in random directions."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * norm).to(dtype)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ball_points(c, n=N, dtype=torch.float64, seed=0):
    """Points from near the origin to the rim: tangent norms 1e-8..1e2."""
    u = rand(H, n, E, seed=seed, dtype=dtype) * torch.logspace(-8, 2, n, dtype=dtype)[:, None]
    return to_ball(u, torch.tensor(c, dtype=dtype))[0]


# --- stability ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["midpoint", "tangent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_outputs_and_gradients_finite_at_every_scale(norm, dtype, aggregation):
    kernel = HyperbolicKernel(H, E, aggregation=aggregation, learn_curvature=True, learn_beta=True)
    q, k, v = (of_norm(norm, dtype, seed=s).requires_grad_(True) for s in range(3))
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[1, :2] = False
    out = kernel(q, k, v, causal=True, key_padding_mask=padding)
    assert out.dtype == dtype and out.shape == (B, H, N, E)
    assert torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    for grad in (q.grad, k.grad, v.grad, kernel.ball.isp_c.grad, kernel.beta.grad):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("norm", NORMS)
def test_keys_equal_to_queries_have_finite_gradients(norm):
    """d(x, x) = 0 on the diagonal: the distance's gradient there must be 0, not NaN."""
    kernel = HyperbolicKernel(H, E, learn_curvature=True)
    q = of_norm(norm).requires_grad_(True)
    out = kernel(q, q, q, causal=False)
    out.pow(2).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kernel.ball.isp_c.grad)


@pytest.mark.parametrize("norm", NORMS)
def test_float32_matches_float64_at_every_scale(norm):
    """Per-point maps run in float64, so tiny inputs are not flushed to zero by float32 artanh."""
    kernel = HyperbolicKernel(H, E)
    q, k, v = (of_norm(norm, torch.float64, seed=s) for s in range(3))
    exact = kernel(q, k, v)
    got = kernel(q.float(), k.float(), v.float()).double()
    assert ((got - exact).norm() / exact.norm()).item() < 1e-3


# --- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expmap0_of_logmap0_is_the_identity_inside_the_ball(c, dtype):
    fractions = torch.cat([torch.logspace(-8, -1, 8), torch.linspace(0.2, 1 - RIM_MARGIN, 9)]).double()
    x = of_norm(1.0, torch.float64, shape=(len(fractions), 3, E)) * fractions[:, None, None] / c**0.5
    x, curvature = x.to(dtype), torch.tensor(c, dtype=dtype)
    back = stereographic.expmap0(from_ball(x, curvature), k=-curvature)
    assert (back - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
def test_distance_symmetric_zero_diagonal_and_geoopts(c):
    x = ball_points(c, n=9).float()
    curvature = torch.tensor(c)
    d = pairwise_distance(x, x, curvature)
    assert torch.equal(d, d.transpose(-1, -2))
    assert torch.equal(d.diagonal(dim1=-2, dim2=-1), torch.zeros(H, 9))
    x64 = x.double()
    expected = stereographic.dist(x64[..., :, None, :], x64[..., None, :, :], k=-curvature.double())
    assert ((d.double() - expected).abs() / expected.clamp_min(1.0)).max().item() < 1e-4
    exact = pairwise_distance(x64, x64, curvature.double())
    torch.testing.assert_close(exact, expected, rtol=1e-9, atol=1e-9)


def test_distance_of_different_sets_matches_geoopt():
    c = torch.tensor(0.7, dtype=torch.float64)
    x, y = ball_points(0.7, n=5, seed=1), ball_points(0.7, n=7, seed=2)
    expected = stereographic.dist(x[..., :, None, :], y[..., None, :, :], k=-c)
    torch.testing.assert_close(pairwise_distance(x, y, c), expected, rtol=1e-9, atol=1e-9)


def test_gyromidpoint_matches_geoopt_and_rows_of_zeros_give_the_origin():
    c = torch.tensor(2.0, dtype=torch.float64)
    points = ball_points(2.0, n=7)
    weights = torch.softmax(rand(H, 4, 7, dtype=torch.float64), dim=-1)
    expected = stereographic.weighted_midpoint(points[:, None], weights, k=-c, reducedim=[2])
    torch.testing.assert_close(gyromidpoint(weights, points, c), expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(
        gyromidpoint(torch.zeros(H, 4, 7, dtype=torch.float64), points, c), torch.zeros(H, 4, E)
    )


def reference_attention(q, k, v, c, beta, aggregation, causal):
    """The definition from geoopt's own operations, in float64, materializing every pair."""
    k_c = -torch.tensor(c, dtype=torch.float64)
    s = q.shape[-1] ** -0.5

    def ball(t):
        return stereographic.project(stereographic.expmap0(t * s, k=k_c), k=k_c, eps=RIM_MARGIN)

    qb, kb, vb = ball(q), ball(k), ball(v)
    scores = -beta * stereographic.dist(qb[..., :, None, :], kb[..., None, :, :], k=k_c)
    if causal:
        scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -torch.inf)
    weights = scores.softmax(dim=-1)
    if aggregation == "tangent":
        return weights @ stereographic.logmap0(vb, k=k_c) / s
    mid = stereographic.weighted_midpoint(vb[..., None, :, :], weights, k=k_c, reducedim=[3])
    return stereographic.logmap0(mid, k=k_c) / s


@pytest.mark.parametrize("aggregation", ["midpoint", "tangent"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_matches_the_definition_built_from_geoopt(aggregation, causal):
    q, k, v = (rand(B, H, N, E, seed=s, dtype=torch.float64) * 3 for s in range(3))
    kernel = HyperbolicKernel(H, E, curvature=0.5, beta=2.0, aggregation=aggregation)
    c = kernel.curvature().item()  # softplus of a float32 parameter: 0.5 within 3e-8
    expected = reference_attention(q, k, v, c, 2.0, aggregation, causal)
    torch.testing.assert_close(kernel(q, k, v, causal=causal), expected, rtol=1e-7, atol=1e-9)


def test_tangent_aggregation_without_clipping_is_the_weighted_mean_of_values():
    q, k, v = (rand(B, H, N, E, seed=s) for s in range(3))
    kernel = HyperbolicKernel(H, E, aggregation="tangent")
    out = kernel(q, k, v, causal=False)
    assert kernel.get_metrics()["values_projected"] == 0
    c = torch.tensor(1.0, dtype=torch.float64)
    s = E**-0.5
    qb, kb = (to_ball(t.double() * s, c)[0] for t in (q, k))
    weights = torch.softmax(-pairwise_distance(qb, kb, c), dim=-1)
    torch.testing.assert_close(out.double(), weights @ v.double(), rtol=1e-5, atol=1e-5)


# --- the kernel contract -------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["midpoint", "tangent"])
def test_causal_attention_does_not_see_the_future(aggregation):
    kernel = HyperbolicKernel(H, E, aggregation=aggregation)
    q, k, v = (rand(B, H, N, E, seed=s) for s in range(3))
    changed = [t.clone() for t in (q, k, v)]
    for t, seed in zip(changed, (5, 6, 7), strict=True):
        t[:, :, 4:] = rand(B, H, N - 4, E, seed=seed)
    before, after = kernel(q, k, v), kernel(*changed)
    assert torch.equal(before[:, :, :4], after[:, :, :4])
    assert not torch.equal(before[:, :, 4:], after[:, :, 4:])


def test_decoding_with_q_offset_matches_the_full_pass():
    kernel = HyperbolicKernel(H, E)
    q, k, v = (rand(B, H, N, E, seed=s) for s in range(3))
    full = kernel(q, k, v, causal=True)
    last = kernel(q[:, :, -2:], k, v, causal=True, q_offset=N - 2)
    torch.testing.assert_close(last, full[:, :, -2:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["midpoint", "tangent"])
def test_padding_rows_with_nothing_to_attend_are_zero(aggregation):
    kernel = HyperbolicKernel(H, E, aggregation=aggregation, learn_curvature=True)
    q, k, v = (rand(B, H, N, E, seed=s).requires_grad_(True) for s in range(3))
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[0, :3] = False  # causal rows 0-2 of batch 0 see only padding
    padding[1] = False  # batch 1 has no real key
    out = kernel(q, k, v, causal=True, key_padding_mask=padding)
    assert torch.equal(out[0, :, :3], torch.zeros(H, 3, E)) and torch.equal(out[1], torch.zeros(H, N, E))
    assert out[0, :, 3:].abs().min() > 0
    out.pow(2).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_padded_keys_change_nothing():
    kernel = HyperbolicKernel(H, E)
    q, k, v = (rand(B, H, N, E, seed=s) for s in range(3))
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[:, -2:] = False
    other_k, other_v = k.clone(), v.clone()
    other_k[:, :, -2:], other_v[:, :, -2:] = 1e4, -1e4
    first = kernel(q, k, v, causal=False, key_padding_mask=padding)
    torch.testing.assert_close(first, kernel(q, other_k, other_v, causal=False, key_padding_mask=padding))


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_count_values_projected_back_inside_the_ball():
    kernel = HyperbolicKernel(H, E)
    q, k = of_norm(0.5, seed=0), of_norm(0.5, seed=1)
    v = of_norm(1e3, seed=2)
    v[0, 0, 0] = 0.1  # one value stays inside
    kernel(q, k, v)
    metrics = kernel.get_metrics()
    values = B * H * N
    assert metrics["values_projected"] == values - 1
    assert metrics["points_clipped"] == values - 1  # queries and keys stay inside
    assert metrics["points"] == 3 * values
    assert metrics["max_ball_norm"] == pytest.approx(1.0, abs=1e-6) and metrics["curvature"] == 1.0

    kernel(of_norm(1e3), of_norm(1e3, seed=1), v)  # accumulates across calls
    assert kernel.get_metrics()["points_clipped"] == 3 * values - 1 + values - 1
    kernel.reset_metrics()
    assert kernel.get_metrics() == {
        "max_ball_norm": 0.0, "points": 0, "points_clipped": 0, "values_projected": 0, "curvature": 1.0,
    }  # fmt: skip


def test_max_ball_norm_is_in_units_of_the_radius():
    c = 4.0
    kernel = HyperbolicKernel(H, E, curvature=c)
    u = 0.3  # tangent norm after the scale: the point lies at tanh(sqrt(c) u) of the radius
    x = of_norm(u / E**-0.5)
    kernel(x, x, x)
    assert kernel.get_metrics()["max_ball_norm"] == pytest.approx(torch.tanh(torch.tensor(c**0.5 * u)).item())
    assert kernel.get_metrics()["points_clipped"] == 0


# --- parameters and options -----------------------------------------------------------------------


def test_gradients_reach_a_learnable_curvature_and_not_a_fixed_one():
    q, k, v = (rand(B, H, N, E, seed=s) * 2 for s in range(3))
    learned = HyperbolicKernel(H, E, curvature=0.5, learn_curvature=True, learn_beta=True)
    learned(q, k, v).pow(2).sum().backward()
    assert learned.ball.isp_c.grad.abs() > 0 and learned.beta.grad.abs().sum() > 0
    assert learned.curvature().item() == pytest.approx(0.5)

    fixed = HyperbolicKernel(H, E, curvature=0.5).requires_grad_(True)  # as `toroidal bench` does
    fixed(q.requires_grad_(True), k, v).pow(2).sum().backward()
    assert fixed.ball.isp_c.grad is None and list(fixed.parameters()) == [fixed.ball.isp_c]
    assert {name for name, _ in fixed.named_buffers()} == {"beta", "gamma"}


def test_gamma_shifts_every_score_of_a_row_and_changes_no_output():
    q, k, v = (rand(B, H, N, E, seed=s) for s in range(3))
    base = HyperbolicKernel(H, E)(q, k, v)
    torch.testing.assert_close(HyperbolicKernel(H, E, gamma=3.0)(q, k, v), base)


def test_beta_sharpens_attention_towards_the_nearest_key():
    q, k, v = (rand(1, 1, N, E, seed=s) for s in range(3))
    kernel = HyperbolicKernel(1, E, beta=1e4, aggregation="tangent")
    out = kernel(q, k, v, causal=False)
    c, s = torch.tensor(1.0, dtype=torch.float64), E**-0.5
    qb, kb = (to_ball(t.double() * s, c)[0] for t in (q, k))
    nearest = pairwise_distance(qb, kb, c).argmin(dim=-1)
    torch.testing.assert_close(out[0, 0], v[0, 0, nearest[0, 0]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"radius": 1.0}, "accepted: curvature"),
        ({"curvature": 0.0}, "curvature must be a positive number"),
        ({"curvature": float("nan")}, "curvature must be a positive number"),
        ({"beta": float("inf")}, "beta must be a finite number"),
        ({"aggregation": "mean"}, "aggregation must be one of midpoint, tangent"),
        ({"learn_curvature": "yes"}, "learn_curvature must be true or false"),
    ],
)
def test_bad_options_raise_value_errors_naming_the_fix(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_kernel("hyperbolic", H, E, **options)


def test_registered_as_a_mechanism_of_its_own():
    assert "hyperbolic" in mechanism_names()
    assert get_mechanism("hyperbolic").approximates is None
    layer = build_attention("hyperbolic", d_model=16, n_heads=2, learn_curvature=True)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    out = layer(rand(2, 5, 16), attention_mask=mask)
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
    assert layer.get_metrics()["points"] == 3 * 2 * 2 * 5


def test_missing_geoopt_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "geoopt", None)  # makes `import geoopt` raise ImportError
    hint = re.escape(f"needs geoopt, from the hyperbolic extra: {install_command('hyperbolic')}")
    with pytest.raises(ImportError, match=hint):
        HyperbolicKernel(H, E)


# --- validate --------------------------------------------------------------------------------------


def test_the_validation_checks_pass():
    results = check_hyperbolic_stability() + check_hyperbolic_geometry()
    assert [r.name for r in results if r.status != PASS] == []
    assert len(results) == 10


runner = CliRunner()


class LeakyKernel(HyperbolicKernel):
    """Ignores the causal flag and the padding: the contract checks must catch both."""

    def forward(self, q, k, v, **kwargs):
        return super().forward(q, k, v, causal=False)


def test_the_kernel_contract_catches_a_leaking_mechanism(monkeypatch):
    from toroidal.mechanisms import registry as mechanisms

    monkeypatch.setitem(mechanisms._REGISTRY, "leaky", Mechanism("leaky", "leaks", LeakyKernel))
    results = {r.name: r for r in check_kernel_contract("leaky")}
    assert results["leaky: causal no-leak"].status == FAIL
    assert results["leaky: empty rows"].status == FAIL
    assert {r.status for r in check_kernel_contract("hyperbolic")} == {PASS}


def test_tiled_with_every_tile_exact_is_toroidal_attention():
    [result] = check_tiled_full_budget()
    assert result.status == PASS and result.error < 1e-5


def test_validate_mechanism_hyperbolic_runs_every_check():
    result = runner.invoke(app, ["validate", "--mechanism", "hyperbolic"])
    assert result.exit_code == 0, result.output
    for name in (
        "causal no-leak", "empty rows", "outputs finite (bfloat16)", "gradients finite (float32)",
        "expmap0(logmap0(x))", "distance symmetry", "distance zero diagonal", "distance vs geoopt",
    ):  # fmt: skip
        assert name in result.output
    assert "12 pass, 0 fail" in result.output


def test_validate_mechanism_standard_runs_its_sanity_checks(tmp_path):
    out = tmp_path / "v.json"
    result = runner.invoke(app, ["validate", "-m", "standard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "standard: vs float64 softmax" in result.output and "3 pass, 0 fail" in result.output
    assert '"mechanism": "standard"' in out.read_text()


def test_validate_rejects_an_unknown_mechanism_and_a_backend_with_another_mechanism():
    assert_one_line_error(
        runner.invoke(app, ["validate", "-m", "elliptic"]), "unknown mechanism", "hyperbolic"
    )
    result = runner.invoke(app, ["validate", "-m", "hyperbolic", "-b", "sdpa"])
    assert_one_line_error(result, "--backend", "drop --backend")


def test_validate_without_geoopt_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "geoopt", None)
    result = runner.invoke(app, ["validate", "-m", "hyperbolic"])
    assert_one_line_error(result, "needs geoopt", "pip install")

"""The `tiled` mechanism: exact at full budget, pooled summaries and metrics on constructed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from toroidal import toroidal_attention
from toroidal.bench import BenchSweep, run_sweep
from toroidal.geometry import ring_distance
from toroidal.mechanisms import build_kernel, get_mechanism

pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(b=2, h=2, n=21, e=8, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, e, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


def tiled(h=2, e=8, **options):
    return build_kernel("tiled", h, e, **{"fusion": "concat", "lambda_distance": 0.3, **options})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("period", [None, 5])  # 5 < N: scores wrap around the ring
def test_full_budget_is_exact_attention(causal, window, depth, period):
    q, k, v = qkv()
    padding = torch.ones(2, 21, dtype=torch.bool)
    padding[1, 15:] = False
    kernel = tiled(depth=depth, window=window, period=period, max_len=21, tile_size=2 * depth, budget=None)
    expected = toroidal_attention(
        q, k, v, depth=depth, lambda_distance=0.3, period=period or 21, causal=causal, window=window,
        key_padding_mask=padding, backend="reference",
    )  # fmt: skip
    assert torch.allclose(kernel(q, k, v, causal=causal, key_padding_mask=padding), expected, atol=1e-5)
    metrics = kernel.get_metrics()
    assert metrics["exact_fraction"] == 1.0 and metrics["flops_saved"] == 0.0


def test_a_budget_covering_every_tile_is_exact_with_gradients_and_decoding():
    q, k, v = qkv(n=24, requires_grad=True)
    # L = 48 platter-tokens in 6 key tiles; a query tile sees at most 5 whole tiles before its diagonal.
    kernel = tiled(depth=2, max_len=32, tile_size=8, budget=5, local_tiles=0)
    out = kernel(q, k, v, causal=True)
    expected = toroidal_attention(q, k, v, depth=2, lambda_distance=0.3, period=32, causal=True)
    assert torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # the last 3 queries against the whole cache
        last = kernel(q[:, :, -3:], k, v, causal=True, q_offset=21)
    assert torch.allclose(last, expected[:, :, -3:], atol=1e-5)


def constructed(lam=0.0):
    """One head, depth 1, N=16 in four tiles of 4, no mask: every tile pair is a candidate.

    Every query is e0; keys of tile 2 are 3 e0, all others -3 e0, so each query tile ranks
    key tile 2 first. Values are random.
    """
    q = torch.zeros(1, 1, 16, 4)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 16, 4)
    k[..., 0] = -3.0
    k[..., 8:12, 0] = 3.0
    v = torch.randn(1, 1, 16, 4, generator=torch.Generator().manual_seed(1))
    options = dict(h=1, e=4, depth=1, lambda_distance=lam, tile_size=4, budget=1, local_tiles=0)
    return q, k, v, options


def test_skipped_tiles_leave_only_the_best_tile_and_metrics_count_them():
    q, k, v, options = constructed()
    kernel = tiled(**options, summaries=False)
    out = kernel(q, k, v, causal=False)
    only_tile_2 = torch.zeros(1, 16, dtype=torch.bool)
    only_tile_2[:, 8:12] = True
    expected = toroidal_attention(q, k, v, depth=1, key_padding_mask=only_tile_2)
    assert torch.allclose(out, expected, atol=1e-6)

    w = 4  # platter width
    flops_exact = 4 * w * 16 * 16  # 16 visible tile pairs of 4 x 4
    flops = 2 * w * 4 * 4 + 4 * w * 4 * 16  # ranking q̄ . k̄ for 4 x 4 tile pairs, 4 exact tiles
    assert kernel.get_metrics() == {
        "calls": 1,
        "tile_pairs": 16,
        "exact_fraction": 0.25,
        "pooled_fraction": 0.0,
        "skipped_fraction": 0.75,
        "flops": flops,
        "flops_exact": flops_exact,
        "flops_saved": flops_exact - flops,
        "flops_saved_fraction": (flops_exact - flops) / flops_exact,
    }
    kernel.reset_metrics()
    assert kernel.get_metrics() == {}


def test_pooled_tiles_enter_the_softmax_as_mean_keys_with_a_log_count():
    q, k, v, options = constructed(lam=0.5)
    kernel = tiled(**options, summaries=True)
    out = kernel(q, k, v, causal=False)[0, 0]

    scale, period = 0.5, 16  # (e/D)^-0.5; bidirectional period = key length
    expected = torch.empty(16, 4)
    for i in range(16):
        exact_keys = range(8, 12)
        scores = [scale * float(q[0, 0, i] @ k[0, 0, j]) - 0.5 * ring_distance(i, j, period) / period
                  for j in exact_keys]  # fmt: skip
        values = [v[0, 0, j] for j in exact_keys]
        for tile in (0, 1, 3):
            keys = slice(4 * tile, 4 * tile + 4)
            centre = 4 * tile + 1.5
            ring = ring_distance(torch.tensor(float(i)), torch.tensor(centre), period) / period
            mean_key = k[0, 0, keys].mean(0)
            scores.append(scale * float(q[0, 0, i] @ mean_key) - 0.5 * float(ring) + math.log(4))
            values.append(v[0, 0, keys].mean(0))
        weights = torch.softmax(torch.tensor(scores), dim=0)
        expected[i] = (weights[:, None] * torch.stack(values)).sum(0)
    assert torch.allclose(out, expected, atol=1e-5)
    metrics = kernel.get_metrics()
    fractions = (metrics["exact_fraction"], metrics["pooled_fraction"], metrics["skipped_fraction"])
    assert fractions == (0.25, 0.75, 0)
    assert metrics["flops"] == 2 * 4 * 16 + 4 * 4 * 4 * 16 + 4 * 4 * 16 * 4  # ranking, exact, summaries


def test_fully_padded_rows_give_zeros_and_finite_gradients():
    q, k, v = qkv(n=24, requires_grad=True)
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[1] = False  # nothing to attend in the second sequence
    padding[0, 5:13] = False  # and whole key tiles padded in the first
    kernel = tiled(depth=2, max_len=24, tile_size=4, budget=1)
    out = kernel(q, k, v, causal=True, key_padding_mask=padding)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    metrics = kernel.get_metrics()
    fractions = (metrics["exact_fraction"], metrics["pooled_fraction"], metrics["skipped_fraction"])
    assert sum(fractions) == pytest.approx(1)
    assert metrics["pooled_fraction"] > 0


def test_options_are_checked():
    assert get_mechanism("tiled").approximates == "toroidal"
    with pytest.raises(ValueError, match="unknown option"):
        build_kernel("tiled", 2, 8, tile=4)
    with pytest.raises(ValueError, match="multiple of depth=4"):
        build_kernel("tiled", 2, 8, depth=4, tile_size=6)
    with pytest.raises(ValueError, match="budget"):
        build_kernel("tiled", 2, 8, budget=-1)
    assert tiled(depth=3, e=9).settings.tile == 126  # the default tile rounded to whole positions


def test_bench_rows_report_the_error_and_tile_fractions():
    sweep = BenchSweep(
        seq_len=[16], d_model=[32], heads=[2], depth=[2], mechanism=["tiled"],
        options={"budget": [None, 0], "tile_size": [4]}, warmup=0, repeats=1, isolate=False,
    )  # fmt: skip
    full, none = run_sweep(sweep).rows
    assert full["options"] == "budget=None,tile_size=4" and full["status"] == "ok"
    assert full["error"] < 1e-5 and full["mechanism_metrics"]["exact_fraction"] == 1.0
    assert none["error"] > 1e-3 and none["mechanism_metrics"]["pooled_fraction"] > 0

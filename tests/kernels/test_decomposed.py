"""The `decomposed` backend: exact pieces, same values and gradients as `reference`."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toroidal import toroidal_attention
from toroidal.geometry import position_allowed, ring_distance
from toroidal.kernels import BackendUnavailable
from toroidal.kernels.decomposed import plan


def _covered(piece, i, j):
    if not piece.causal:
        return True
    x = piece.q1 - 1 - i if piece.flip else i - piece.q0
    y = piece.k1 - 1 - j if piece.flip else j - piece.k0
    return y <= x


@pytest.mark.parametrize("n, period", [(1, 1), (2, 2), (7, 7), (8, 8), (5, 12), (9, 10), (16, 31), (6, 11)])
@pytest.mark.parametrize("causal", [True, False])
def test_plan_covers_each_allowed_pair_once_with_its_linear_form(n, period, causal):
    count = torch.zeros(n, n, dtype=torch.int)
    for piece in plan(n, period, causal):
        for i in range(piece.q0, piece.q1):
            for j in range(piece.k0, piece.k1):
                if _covered(piece, i, j):
                    count[i, j] += 1
                    linear = piece.alpha + (piece.beta * i + piece.sign * j) / period
                    assert linear == pytest.approx(-ring_distance(i, j, period) / period, abs=1e-12)
    expected = [[int(position_allowed(i, j, causal, None, period)) for j in range(n)] for i in range(n)]
    assert count.tolist() == expected


cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 14),
        "depth": st.sampled_from([1, 2, 3, 4]),
        "lam": st.sampled_from([0.0, 0.1, 2.0]),
        "causal": st.booleans(),
        "extra_period": st.integers(0, 12),
        "pad": st.integers(0, 14),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=80, deadline=None)
@given(cases)
def test_matches_reference_values_and_gradients(c):
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = (torch.randn(2, 2, c["n"], 2 * c["depth"], generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, c["n"], dtype=torch.bool)
    mask[0, : c["pad"]] = False
    results = []
    for backend in ("reference", "decomposed"):
        out = toroidal_attention(
            q, k, v, depth=c["depth"], lambda_distance=c["lam"], causal=c["causal"],
            period=c["n"] + c["extra_period"], key_padding_mask=mask, backend=backend,
        )  # fmt: skip
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
        results.append((out, *grads))
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5


def test_unsupported_calls_say_why():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(BackendUnavailable, match="period >= sequence length"):
        toroidal_attention(q, q, q, depth=2, period=4, backend="decomposed")
    with pytest.raises(BackendUnavailable, match="window"):
        toroidal_attention(q, q, q, depth=2, window=1, backend="decomposed")
    with pytest.raises(BackendUnavailable, match="KV-cache"):
        toroidal_attention(q[:, :, :1], q, q, depth=2, q_offset=7, backend="decomposed")
    with pytest.raises(BackendUnavailable, match="float32 or float64"):
        toroidal_attention(q.half(), q.half(), q.half(), depth=2, backend="decomposed")
    # A window covering the whole ring is no window at all.
    full = toroidal_attention(q, q, q, depth=2, window=4, lambda_distance=0.3, backend="decomposed")
    assert torch.allclose(
        full, toroidal_attention(q, q, q, depth=2, window=4, lambda_distance=0.3), atol=1e-5
    )

"""Hypothesis property tests: backend parity and invariants over random shapes and configs."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toroidal import ToroidalAttention, toroidal_attention

shapes = st.fixed_dictionaries(
    {
        "b": st.integers(1, 2),
        "h": st.integers(1, 3),
        "n": st.integers(1, 12),
        "depth": st.sampled_from([1, 2, 4]),
        "w": st.sampled_from([2, 4]),
        "lam": st.sampled_from([0.0, 0.1, 1.5]),
        "causal": st.booleans(),
        "window": st.one_of(st.none(), st.integers(0, 6)),
        "period": st.one_of(st.none(), st.integers(1, 20)),
        "pad": st.integers(0, 12),
        "seed": st.integers(0, 2**16),
    }
)


def _inputs(s):
    gen = torch.Generator().manual_seed(s["seed"])
    e = s["depth"] * s["w"]
    q, k, v = (torch.randn(s["b"], s["h"], s["n"], e, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(s["b"], s["n"], dtype=torch.bool)
    mask[-1, : min(s["pad"], s["n"])] = False
    return q, k, v, mask


def _run(s, backend, q, k, v, mask):
    out = toroidal_attention(
        q, k, v, depth=s["depth"], lambda_distance=s["lam"], period=s["period"], causal=s["causal"],
        window=s["window"], key_padding_mask=mask, backend=backend,
    )  # fmt: skip
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
    return out, grads


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_sdpa_matches_reference(s):
    q, k, v, mask = _inputs(s)
    ref, ref_grads = _run(s, "reference", q, k, v, mask)
    out, grads = _run(s, "sdpa", q, k, v, mask)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-5
    for g, rg in zip(grads, ref_grads, strict=True):
        assert (g - rg).abs().max() <= 1e-5


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_fully_masked_rows_are_zero_and_rows_are_convex(s):
    q, k, v, mask = _inputs(s)
    out, weights = toroidal_attention(
        q, k, v, depth=s["depth"], lambda_distance=s["lam"], period=s["period"], causal=s["causal"],
        window=s["window"], key_padding_mask=mask, backend="reference", return_weights=True,
    )  # fmt: skip
    sums = weights.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    empty = sums == 0
    assert torch.all(out.reshape(weights.shape[:3] + (-1,))[empty] == 0)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 10), st.sampled_from([1, 2]), st.integers(0, 2**16), st.integers(1, 9))
def test_module_shift_invariance_periodic(n, depth, seed, shift):
    torch.manual_seed(seed)
    attn = ToroidalAttention(d_model=16, n_heads=2, depth=depth, rope="periodic", lambda_distance=0.5)
    x = torch.randn(1, n, 16)
    out, _ = attn(x)
    rolled, _ = attn(torch.roll(x, shift, dims=1))
    assert (rolled - torch.roll(out, shift, dims=1)).abs().max() < 1e-5

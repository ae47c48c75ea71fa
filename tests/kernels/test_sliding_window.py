"""A host's sliding window in the torus: |i - j| < W on top of causality and the circular window.

Checked against a brute-force definition written here (not `TorusGeometry`), per backend, in
values and gradients; native and decomposed refuse it and `auto` then picks one that serves it.
"""

import pytest
import torch

from toroidal import toroidal_attention
from toroidal.functional import plan_call, selected_backend
from toroidal.geometry import TorusGeometry, sliding_window_that_bites
from toroidal.kernels import get_backend, select
from toroidal.kernels.flash_adapter import TorchFlashAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
B, H, N, E, DEPTH = 2, 2, 12, 8, 2


def brute_force(q, k, v, *, depth, lambda_distance, period, causal, window, sliding_window, q_offset=0,
                padding=None):  # fmt: skip
    """Toroidal attention from its definition, position by position and platter by platter (float64)."""
    b, h, n_q, e = q.shape
    n_k, w = k.shape[2], e // depth
    qp, kp, vp = (t.double().reshape(b, h, -1, w) for t in (q, k, v))
    scores = qp @ kp.transpose(-1, -2) * w**-0.5
    allowed = torch.zeros(n_q * depth, n_k * depth, dtype=torch.bool)
    bias = torch.zeros(n_q * depth, n_k * depth, dtype=torch.float64)
    for a in range(n_q * depth):
        i, kk = q_offset + a // depth, a % depth
        for c in range(n_k * depth):
            j, ll = c // depth, c % depth
            m = abs(i - j) % period
            ring = min(m, period - m)
            ok = (not causal or j <= i) and (window is None or ring <= window)
            allowed[a, c] = ok and (sliding_window is None or abs(i - j) < sliding_window)
            bias[a, c] = -lambda_distance * (ring / period + abs(kk - ll) / depth)
    allowed = allowed[None, None].expand(b, h, -1, -1)
    if padding is not None:
        allowed = allowed & padding.repeat_interleave(depth, dim=1)[:, None, None, :]
    scores = (scores + bias).masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, -1) * allowed.any(-1, keepdim=True), nan=0.0)
    return (weights @ vp).reshape(b, h, n_q, e)


def _inputs(n_q=N, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, E, generator=g)
    k, v = (torch.randn(B, H, N, E, generator=g) for _ in "kv")
    return [t.requires_grad_(grad) for t in (q, k, v)]


CASES = {
    # P = N: the circular window alone would keep the seam; the sliding window removes it.
    "causal": dict(causal=True, window=None, period=N, lambda_distance=0.5, sliding_window=4),
    "causal-circular": dict(causal=True, window=3, period=8, lambda_distance=0.3, sliding_window=5),
    "bidirectional": dict(causal=False, window=None, period=N, lambda_distance=0.4, sliding_window=3),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "blockwise", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_backends_match_the_definition(case, backend, padded):
    torus = CASES[case]
    q, k, v = _inputs(grad=True)
    padding = None
    if padded:
        padding = torch.ones(B, N, dtype=torch.bool)
        padding[0, :3] = False
        padding[1, -2:] = False
    out = toroidal_attention(q, k, v, depth=DEPTH, backend=backend, key_padding_mask=padding, **torus)
    expected = brute_force(q, k, v, depth=DEPTH, padding=padding, **torus)
    assert (out.double() - expected).abs().max() <= 1e-5
    seen = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), seen)
    want = torch.autograd.grad(expected, (q, k, v), seen.double())
    assert max((a - b).abs().max().item() for a, b in zip(grads, want, strict=True)) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_flash2_composition_matches_the_definition(case):
    torus = CASES[case]
    flash2 = get_backend("flash2")
    saved, flash2.adapter = flash2.adapter, TorchFlashAdapter()
    select.forget_decisions()
    try:
        for lam in (torus["lambda_distance"], 0.0):  # banded and interval plans
            q, k, v = _inputs()
            call = {**torus, "lambda_distance": lam}
            out = toroidal_attention(q, k, v, depth=DEPTH, backend="flash2", **call)
            assert (out.double() - brute_force(q, k, v, depth=DEPTH, **call)).abs().max() <= 1e-5
    finally:
        flash2.adapter = saved
        select.forget_decisions()


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blockwise"])
def test_decoding_with_a_query_offset_is_the_full_pass(backend):
    torus = CASES["causal-circular"]
    q, k, v = _inputs()
    full = toroidal_attention(q, k, v, depth=DEPTH, backend=backend, **torus)
    for first in (5, N - 1):
        rows = toroidal_attention(
            q[:, :, first:], k, v, depth=DEPTH, backend=backend, q_offset=first, **torus
        )
        assert (rows - full[:, :, first:]).abs().max() <= 1e-6
        # A sliding-window cache keeps only the last W keys: positions count from the first one kept.
        drop = first - torus["sliding_window"] + 1
        kept = toroidal_attention(
            q[:, :, first:first + 1], k[:, :, drop:first + 1], v[:, :, drop:first + 1], depth=DEPTH,
            backend=backend, q_offset=first - drop, **torus,
        )  # fmt: skip
        assert (kept - full[:, :, first : first + 1]).abs().max() <= 1e-6


def test_a_window_that_does_not_bite_is_no_window():
    assert sliding_window_that_bites(4, 4, 4, 0, causal=True) is None  # i - j <= 3 < 4
    assert sliding_window_that_bites(4, 5, 5, 0, causal=True) == 4
    assert sliding_window_that_bites(4, 1, 4, 3, causal=True) is None  # one decoded token, W keys
    assert sliding_window_that_bites(4, 1, 5, 0, causal=False) == 4  # the first query, the last key
    q, k, v = _inputs()
    plain = plan_call(q, k, v, depth=DEPTH, causal=True).geometry
    assert plan_call(q, k, v, depth=DEPTH, causal=True, sliding_window=N).geometry == plain
    with pytest.raises(ValueError, match="sliding_window"):
        plan_call(q, k, v, depth=DEPTH, sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window"):
        TorusGeometry(DEPTH, N, 0.0, True, sliding_window=0)


def test_native_and_decomposed_refuse_and_auto_serves_it():
    q, k, v = _inputs()
    request = plan_call(q, k, v, depth=DEPTH, causal=True, sliding_window=4).request
    for name in ("native", "decomposed"):
        assert "sliding window" in get_backend(name).unavailable_reason(request)
    chosen = selected_backend(q, k, v, depth=DEPTH, causal=True, sliding_window=4)
    assert get_backend(chosen).unavailable_reason(request) is None


@pytest.mark.parametrize("causal", [True, False])
def test_linear_segments_cover_exactly_the_allowed_pairs(causal):
    for window, period, offset, n_q in ((None, N, 0, N), (3, 8, 0, N), (None, 7, 6, 6), (2, 5, 9, 3)):
        geometry = TorusGeometry(1, period, 0.3, causal, window, offset, sliding_window=4)
        segments = geometry.linear_segments(n_q, N, 64)
        i = offset + torch.arange(n_q)[:, None]
        m = i - torch.arange(N)[None, :]
        covered = torch.zeros_like(m, dtype=torch.bool)
        for s in segments:
            covered |= (m >= s.lo) & (m <= s.hi)
        assert torch.equal(covered, geometry.position_mask(n_q, N))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "sdpa", "blockwise", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_backends_match_the_definition(case, backend):
    torus = CASES[case]  # flex on CUDA takes its banded path (lambda != 0): the clipped ring bands
    q, k, v = (t.cuda().requires_grad_() for t in _inputs())
    out = toroidal_attention(q, k, v, depth=DEPTH, backend=backend, **torus)
    expected = brute_force(*(t.detach().cpu().requires_grad_() for t in (q, k, v)), depth=DEPTH, **torus)
    assert (out.double().cpu() - expected.detach()).abs().max() <= 1e-4
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got in grads:
        assert torch.isfinite(got).all()

import pytest
import torch

import toroidal
from toroidal.geometry import TorusGeometry
from toroidal.kernels import BackendUnavailable, get_backend
from toroidal.kernels.blockwise import DEFAULT_TILE, BlockwiseBackend, _tile_plan

B, H, WIDTH = 2, 2, 3  # platter width e/D


@pytest.fixture
def set_tile(monkeypatch):
    """Change the registered blockwise backend's tile for one test (restored afterwards)."""
    return lambda tile: monkeypatch.setattr(get_backend("blockwise"), "tile", tile)


def _inputs(n_q, n_k, depth, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = WIDTH * depth
    q = torch.randn(B, H, n_q, e, generator=g)
    k, v = torch.randn(2, B, H, n_k, e, generator=g)
    grad = torch.randn(B, H, n_q, e, generator=g)
    return [t.to(dtype) for t in (q, k, v, grad)]


def _run(backend, q, k, v, grad, **kw):
    """Output and input gradients of one backend."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = toroidal.toroidal_attention(q, k, v, backend=backend, **kw)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def _assert_matches_reference(q, k, v, grad, atol=1e-5, rtol=0.0, **kw):
    got = _run("blockwise", q, k, v, grad, **kw)
    want = _run("reference", q, k, v, grad, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _padding(n, kind):
    if kind is None:
        return None
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, -2:] = False  # right padding
    mask[1, :3] = False  # left padding: under causal masking the first queries see nothing
    return mask


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("padding", [None, "mixed"])
def test_matches_reference(set_tile, depth, lam, causal, window, padding):
    # Tiles that do not divide L = N*D, a single platter-token, and one tile for everything.
    for n, tile in ((7, 3), (9, 1), (16, 5), (6, DEFAULT_TILE)):
        set_tile(tile)
        q, k, v, grad = _inputs(n, n, depth, seed=n)
        _assert_matches_reference(
            q,
            k,
            v,
            grad,
            depth=depth,
            lambda_distance=lam,
            causal=causal,
            window=window,
            key_padding_mask=_padding(n, padding),
        )


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_kv_cache_decoding_matches_reference(set_tile, depth, lam, causal, window):
    # Fewer queries than keys, the queries being the last positions (q_offset), fixed period.
    for n_q, n_k, tile in ((4, 11, 3), (1, 9, 2), (5, 13, 7)):
        set_tile(tile)
        q, k, v, grad = _inputs(n_q, n_k, depth, seed=n_k)
        _assert_matches_reference(
            q,
            k,
            v,
            grad,
            depth=depth,
            lambda_distance=lam,
            causal=causal,
            window=window,
            period=16,
            q_offset=n_k - n_q,
        )


def test_fully_padded_rows_give_zeros_and_zero_grads(set_tile):
    set_tile(4)
    q, k, v, grad = _inputs(6, 6, depth=2)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[1] = False  # nothing to attend in batch element 1
    out, dq, dk, dv = _run("blockwise", q, k, v, grad, depth=2, lambda_distance=0.5, key_padding_mask=mask)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in (dq, dk, dv):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
    assert out[0].abs().sum() > 0


def test_gradient_for_queries_only(set_tile):
    set_tile(5)
    q, k, v, grad = _inputs(7, 7, depth=2)
    outs = []
    for backend in ("blockwise", "reference"):
        qg = q.clone().requires_grad_()
        out = toroidal.toroidal_attention(
            qg, k, v, depth=2, lambda_distance=0.5, causal=True, backend=backend
        )
        out.backward(grad)
        outs.append(qg.grad)
    torch.testing.assert_close(*outs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_runs_and_is_close(set_tile, causal):
    set_tile(8)
    q, k, v, grad = _inputs(12, 12, depth=2, dtype=torch.bfloat16)
    got = _run("blockwise", q, k, v, grad, depth=2, lambda_distance=0.5, causal=causal, window=3)
    assert all(t.dtype == torch.bfloat16 for t in got)
    _assert_matches_reference(
        q, k, v, grad, atol=3e-2, rtol=3e-2, depth=2, lambda_distance=0.5, causal=causal, window=3
    )


def test_weights_are_refused_with_a_reason():
    q, k, v, _ = _inputs(4, 4, depth=1)
    with pytest.raises(BackendUnavailable, match="reference"):
        toroidal.toroidal_attention(q, k, v, depth=1, backend="blockwise", return_weights=True)


def test_tile_size_is_configurable():
    assert get_backend("blockwise").tile == DEFAULT_TILE
    assert BlockwiseBackend(tile=64).tile == 64
    q, k, v, _ = _inputs(4, 4, depth=1)
    with pytest.raises(ValueError, match="tile"):
        BlockwiseBackend(tile=0).forward(q, k, v, TorusGeometry(1, 4, 0.0, False), None, 1.0, False)


@pytest.mark.parametrize(
    "geometry",
    [
        TorusGeometry(depth=2, period=10, lambda_distance=0.0, causal=True),
        TorusGeometry(depth=3, period=10, lambda_distance=0.0, causal=True, window=2),
        TorusGeometry(depth=2, period=10, lambda_distance=0.0, causal=False, window=1),
        TorusGeometry(depth=2, period=16, lambda_distance=0.0, causal=True, window=3, q_offset=5),
    ],
)
@pytest.mark.parametrize("tile", [1, 3, 4, 7])
def test_tile_plan_skips_exactly_the_empty_tiles(geometry, tile):
    n_q = 10 - geometry.q_offset
    lq, lk = n_q * geometry.depth, 10 * geometry.depth
    plan = _tile_plan(geometry, lq, lk, tile, None, "cpu")
    for i, row in enumerate(plan):
        visited = dict(row)
        for j, k0 in enumerate(range(0, lk, tile)):
            _, allowed = geometry.block(i * tile, min(i * tile + tile, lq), k0, min(k0 + tile, lk))
            assert (j in visited) == bool(allowed.any())
            if j in visited:
                assert visited[j] == (not allowed.all())

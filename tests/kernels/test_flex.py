"""flex: parity with `reference`, no recompiles per lambda or offset, and its reasons.

The first FlexAttention compile on CPU takes ~15-20 s per variant, so the CPU tests share
one shape and only two variants (masked + padded + bias, and bias only).
"""

import pytest
import torch

from toroidal import toroidal_attention
from toroidal.functional import to_platters
from toroidal.geometry import TorusGeometry
from toroidal.kernels import BackendUnavailable, KernelRequest, get_backend

B, H, N, E, DEPTH = 2, 2, 12, 16, 2


def _inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, H, N, E, generator=g).to(device, dtype) for _ in "qkv"]
    qkv = [t.requires_grad_(requires_grad) for t in qkv]
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[0, 0] = False  # with causal masking, position 0 of batch 0 has nothing to attend
    padding[1, -3:] = False
    return qkv, padding.to(device)


def _cpu_reason():
    request = KernelRequest(
        device_type="cpu",
        dtype=torch.float32,
        requires_grad=False,
        need_weights=False,
        geometry=TorusGeometry(DEPTH, N, 0.0, True),
        n_queries=N,
        n_keys=N,
        has_padding=False,
    )
    return get_backend("flex").unavailable_reason(request)


needs_cpu_flex = pytest.mark.skipif(_cpu_reason() is not None, reason=str(_cpu_reason()))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = {
    "causal-window-padding": dict(causal=True, window=3, period=16, lambda_distance=0.4, padded=True),
    "bidirectional": dict(causal=False, period=None, lambda_distance=0.7, padded=False),
}


def _kwargs(case, padding):
    case = dict(case)
    return dict(depth=DEPTH, key_padding_mask=padding if case.pop("padded") else None, **case)


@needs_cpu_flex
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_forward_matches_reference(case):
    (q, k, v), padding = _inputs()
    kwargs = _kwargs(CASES[case], padding)
    out = toroidal_attention(q, k, v, backend="flex", **kwargs)
    expected = toroidal_attention(q, k, v, backend="reference", **kwargs)
    assert not out.isnan().any()
    assert (out - expected).abs().max() < 1e-5
    if kwargs["key_padding_mask"] is not None:
        assert out[0, :, 0].abs().max() == 0  # a row with nothing to attend is zeros, not NaN


@needs_cpu_flex
def test_new_lambda_window_and_offset_reuse_the_compiled_kernel():
    (q, k, v), padding = _inputs()
    kwargs = _kwargs(CASES["causal-window-padding"], padding)
    toroidal_attention(q, k, v, backend="flex", **kwargs)  # compiles (or reuses) this variant
    kwargs.update(lambda_distance=0.9, window=5, period=20, q_offset=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = toroidal_attention(q, k, v, backend="flex", **kwargs)
    assert (out - toroidal_attention(q, k, v, backend="reference", **kwargs)).abs().max() < 1e-5


def test_cpu_training_is_refused_with_a_reason():
    (q, k, v), _ = _inputs(requires_grad=True)
    with pytest.raises(BackendUnavailable, match="flex on CPU is forward-only .* use blockwise or sdpa"):
        toroidal_attention(q, k, v, depth=DEPTH, causal=True, backend="flex")


def test_cpu_kernel_refuses_a_value_gradient_the_request_does_not_see():
    # KernelRequest looks at q and k only; the kernel itself must not drop v's gradient.
    (q, k, v), _ = _inputs()
    q, k, v = (to_platters(t, DEPTH) for t in (q, k, v.requires_grad_()))
    with pytest.raises(BackendUnavailable, match="forward-only"):
        get_backend("flex").forward(q, k, v, TorusGeometry(DEPTH, N, 0.1, True), None, 0.5, False)


def test_weights_are_refused():
    (q, k, v), _ = _inputs()
    with pytest.raises(BackendUnavailable, match="cannot return attention weights"):
        toroidal_attention(q, k, v, depth=DEPTH, backend="flex", return_weights=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_forward_and_gradients_match_reference(case, dtype):
    # E / DEPTH = 8 < 16 also exercises the head-dim padding the Triton kernel needs.
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    results = []
    for backend in ("flex", "reference"):
        (q, k, v), padding = _inputs("cuda", dtype, requires_grad=True)
        out = toroidal_attention(q, k, v, backend=backend, **_kwargs(CASES[case], padding))
        out.float().square().sum().backward()
        results.append((out.float(), torch.cat([t.grad.float().flatten() for t in (q, k, v)])))
    (out, grads), (expected, expected_grads) = results
    assert not out.isnan().any() and not grads.isnan().any()
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert (grads - expected_grads).abs().max() < 4 * tol * max(1.0, expected_grads.abs().max().item())


# --- the banded path (CUDA) with a dense stand-in for the kernel -----------------------------------------
# The compiled kernel returns no log-sum-exp on the CPU, so here FlexAttention's contract (score_mod,
# mask_mod, grouped heads, natural log-sum-exp, zero rows) is played by dense autograd ops: this checks
# the band arithmetic, the merge and its gradients; tests/test_cuda.py runs the real kernel.


class _Aux:
    def __init__(self, lse):
        self.lse = lse


def _dense_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux=None, return_lse=False):
    assert enable_gqa
    batch, heads, n_rows, _ = q.shape
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    b, h = torch.arange(batch).view(-1, 1, 1, 1), torch.arange(heads).view(1, -1, 1, 1)
    q_idx, kv_idx = torch.arange(n_rows).view(1, 1, -1, 1), torch.arange(k.shape[2]).view(1, 1, 1, -1)
    scores = score_mod(q @ k.transpose(-1, -2) * scale, b, h, q_idx, kv_idx)
    scores = scores.masked_fill(~block_mask.mask_mod(b, h, q_idx, kv_idx), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.masked_fill(lse.isneginf(), 0).unsqueeze(-1)) @ v
    return (out, lse) if return_lse else (out, _Aux(lse))


BANDED = {
    "causal": dict(causal=True, lambda_distance=0.4),  # near and far band
    "bidirectional": dict(causal=False, lambda_distance=0.7),  # four bands
    "window-seam": dict(causal=True, window=3, period=7, lambda_distance=0.3),
    "decoding": dict(causal=True, lambda_distance=0.2, q_offset=5),
    "host-sliding-window": dict(causal=True, period=7, lambda_distance=0.4, sliding_window=6),
}


@pytest.mark.parametrize("case", list(BANDED))
def test_banded_path_matches_reference_values_and_gradients(case, monkeypatch):
    import toroidal.kernels.flex as flex_module

    monkeypatch.setattr(flex_module, "_compiled_flex", lambda static=False: _dense_flex)
    monkeypatch.setattr(flex_module, "_compiled_merge", lambda: flex_module._merge)
    kwargs = dict(BANDED[case])
    n_queries = N - kwargs.get("q_offset", 0)
    geometry = TorusGeometry(
        DEPTH,
        kwargs.get("period", N),
        kwargs["lambda_distance"],
        kwargs["causal"],
        kwargs.get("window"),
        kwargs.get("q_offset", 0),
        kwargs.get("sliding_window"),
    )
    segments = geometry.linear_segments(n_queries, N, limit=4)
    assert segments is not None and len(segments) > 1
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, n_queries * DEPTH, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(2, 2, N * DEPTH, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv"
    )
    padding = torch.ones(2, N, dtype=torch.bool)
    padding[0, :3] = False  # with causal masking, the first rows of batch 0 see nothing
    key_padding = padding.repeat_interleave(DEPTH, dim=1)
    results = []
    for run in ("banded", "reference"):
        if run == "banded":
            out = flex_module.FlexBackend()._banded(q, k, v, geometry, key_padding, 0.3, segments)
        else:
            kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
            out, _ = get_backend("reference").forward(q, kr, vr, geometry, key_padding, 0.3, False)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, grads))
    (out, grads), (expected, expected_grads) = results
    # The band biases are float32 tables, so agreement is to float32 precision.
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_only_the_first_shapes_compile_statically(monkeypatch):
    import toroidal.kernels.flex as flex_module

    monkeypatch.setattr(flex_module, "_static_seen", set())
    monkeypatch.setattr(flex_module, "_STATIC_MAX_SHAPES", 2)
    tensors = [torch.zeros(1, 1, n, 16, requires_grad=True) for n in (8, 16, 24)]
    assert [flex_module._static_shapes(t, t, t) for t in tensors] == [True, True, False]
    assert flex_module._static_shapes(tensors[0], tensors[0], tensors[0])  # a shape seen before stays static
    with torch.no_grad():
        assert not flex_module._static_shapes(tensors[0], tensors[0], tensors[0])  # short inference: dynamic


@pytest.mark.parametrize(
    "n_queries, n_keys, depth, offset, period, causal, window",
    [
        (300, 300, 4, 0, 300, True, None),  # lengths that are not multiples of the 128 block
        (512, 512, 4, 0, 512, False, None),
        (256, 256, 2, 0, 256, True, 40),
        (200, 260, 4, 60, 300, False, 70),
        (64, 600, 3, 536, 700, True, None),  # decoding a chunk at the end of a long cache
    ],
)
def test_band_block_masks_equal_create_block_mask(n_queries, n_keys, depth, offset, period, causal, window):
    from torch.nn.attention.flex_attention import create_block_mask

    import toroidal.kernels.flex as flex_module

    def blocks(mask, full):
        counts, indices = (
            (mask.full_kv_num_blocks, mask.full_kv_indices) if full else (mask.kv_num_blocks, mask.kv_indices)
        )
        return [sorted(row[:count].tolist()) for row, count in zip(indices[0, 0], counts[0, 0], strict=True)]

    geometry = TorusGeometry(depth, period, 0.1, causal, window, offset)
    for segment in geometry.linear_segments(n_queries, n_keys, limit=4):
        band = flex_module._Band.build(geometry, segment, n_queries, n_keys, "cpu")
        expected = create_block_mask(band.mask_mod(), None, None, n_queries, n_keys * depth, device="cpu")
        assert torch.equal(band.block_mask.to_dense(), expected.to_dense())
        for full in (False, True):
            assert blocks(band.block_mask, full) == blocks(expected, full)

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

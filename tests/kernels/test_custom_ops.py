"""The CPU kernels as registered operators: schema, fake (meta) kernels and autograd, by `opcheck`."""

import pytest
import torch
from torch.library import opcheck

from toroidal import toroidal_attention
from toroidal.functional import plan_call
from toroidal.kernels import get_backend
from toroidal.kernels.flash_adapter import TorchFlashAdapter

ops = torch.ops.toroidal
q0 = torch.zeros(1, 1, 4, 4)
NATIVE_REASON = get_backend("native").unavailable_reason(plan_call(q0, q0, q0, depth=2).request)
needs_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native unavailable: {NATIVE_REASON}")


def _inputs(dtype, width=4, n=8, padded=True, transposed=False):
    """q, k, v (2, 2, n, width) and a key padding mask; `transposed`: strided as a (B, N, H, w) view."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, n, 2, width) if transposed else (2, 2, n, width)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    if transposed:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    keep = None
    if padded:
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[1, :2] = False  # causal rows with nothing to see
    return q, k, v, keep


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


@needs_native
@DTYPES
@pytest.mark.parametrize(
    "geometry",
    [(2, 3, 0.5, True, 1, 0), (2, 4, 0.5, False, None, 0), (2, 6, 0.3, True, 2, 1)],
    ids=["causal-window-wrap", "bidirectional", "decoding-offset"],
)  # depth, period, lambda, causal, window, q_offset
def test_native_ops_pass_opcheck(dtype, geometry):
    # A width the kernel pads to 32 lanes; the bidirectional case with non-contiguous inputs.
    q, k, v, keep = _inputs(dtype, width=20, transposed=geometry[4] is None)
    if geometry[-1]:  # decoding: fewer queries than keys
        q = q[:, :, -4:].detach().requires_grad_(True)
    args = (q, k, v, keep, *geometry, 0.7)
    opcheck(ops.native_forward, args)
    out, lse = ops.native_forward(*args)
    grad = torch.randn_like(out)
    detached = (q.detach(), k.detach(), v.detach(), keep, out.detach(), lse, grad, *geometry, 0.7)
    opcheck(ops.native_backward, detached)


@DTYPES
@pytest.mark.parametrize("causal, padded", [(True, True), (False, False)])
def test_decomposed_ops_pass_opcheck(dtype, causal, padded):
    q, k, v, keep = _inputs(dtype, padded=padded, transposed=not causal)
    args = (q, k, v, keep, 2, 5, 0.5, causal, 0.7)  # depth 2, 4 positions, period 5
    opcheck(ops.decomposed_forward, args)
    out, lse = ops.decomposed_forward(*args)
    detached = (q.detach(), k.detach(), v.detach(), keep, out.detach(), lse, torch.randn_like(out), *args[4:])
    opcheck(ops.decomposed_backward, detached)


@pytest.mark.parametrize(
    "geometry",
    [(2, 6, 0.1, True, 2, None, 0), (2, 4, 0.5, False, None, None, 0), (2, 12, 0.3, True, None, None, 6)],
    ids=["causal-window-wrap", "bidirectional", "decoding-offset"],
)  # depth, period, lambda, causal, window, sliding window, q_offset
def test_flash2_ops_pass_opcheck(geometry):
    # 8 positions of 2 platters through the plain-PyTorch adapter; bidirectional with strided inputs.
    q, k, v, _ = _inputs(torch.float32, n=16, padded=False, transposed=not geometry[3])
    if geometry[-1]:  # decoding: the last 2 positions (4 platter-tokens) of 8
        q = q[:, :, -4:].detach().requires_grad_(True)
    args = (q, k, v, None, *geometry, 0.7, "torch")
    opcheck(ops.flash2_forward, args)
    out, lse = ops.flash2_forward(*args)
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    detached = (q.detach(), k.detach(), v.detach(), None, out.detach(), lse, torch.randn_like(out), *args[4:])
    opcheck(ops.flash2_backward, detached)


def test_the_geometry_travels_as_plain_arguments():
    schema = str(ops.native_forward.default._schema)
    plain = ["Tensor? keep", "SymInt depth", "SymInt period", "float lambda_distance", "bool causal"]
    for arg in [*plain, "SymInt? window", "SymInt q_offset", "float scale"]:
        assert arg in schema, schema
    assert "bool causal" in str(ops.decomposed_forward.default._schema)
    flash2 = str(ops.flash2_forward.default._schema)
    assert "SymInt? sliding_window" in flash2 and "str adapter" in flash2, flash2


def _node_names(grad_fn, depth=4):
    """Names of the autograd nodes within `depth` steps of `grad_fn`."""
    if grad_fn is None or depth == 0:
        return []
    return [type(grad_fn).__name__] + [
        n for f, _ in grad_fn.next_functions for n in _node_names(f, depth - 1)
    ]


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "decomposed"])
def test_backends_run_through_their_registered_ops(backend):
    q, k, v, keep = _inputs(torch.float32)
    kwargs = dict(depth=2, causal=True, lambda_distance=0.4, key_padding_mask=keep, backend=backend)
    out = toroidal_attention(q, k, v, **kwargs)
    # The autograd node is the registered op's, not a Python autograd.Function.
    assert any(f"toroidal_{backend}_forward" in name for name in _node_names(out.grad_fn)), out.grad_fn
    extra = (None, 0) if backend == "native" else ()  # window, q_offset
    with torch._subclasses.fake_tensor.FakeTensorMode():  # shapes only: the C++ kernel is never called
        big = torch.empty(1, 2, 1 << 20, 16)
        fake, lse = getattr(ops, f"{backend}_forward")(
            big, big, big, None, 4, 1 << 18, 0.1, True, *extra, 0.25
        )
    assert fake.shape == big.shape and lse.shape == big.shape[:-1]


def test_flash2_runs_through_its_registered_op():
    flash2 = get_backend("flash2")
    saved, flash2.adapter = flash2.adapter, TorchFlashAdapter()
    try:
        q, k, v, _ = _inputs(torch.float32, padded=False)
        out = toroidal_attention(q, k, v, depth=2, causal=True, lambda_distance=0.4, backend="flash2")
    finally:
        flash2.adapter = saved
    assert any("toroidal_flash2_forward" in name for name in _node_names(out.grad_fn)), out.grad_fn
    with torch._subclasses.fake_tensor.FakeTensorMode():  # shapes only: no flash call is made
        big = torch.empty(1, 2, 1 << 20, 16, dtype=torch.bfloat16)
        fake, lse = ops.flash2_forward(
            big, big, big, None, 4, 1 << 18, 0.1, True, None, None, 0, 0.25, "flash_attn"
        )
    assert fake.shape == big.shape and fake.dtype == torch.bfloat16
    assert lse.shape == big.shape[:-1] and lse.dtype == torch.float32

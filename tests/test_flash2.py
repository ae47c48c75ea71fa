"""flash2: its reasons, its index mapping (against flash-attn's documented mask), and GPU parity."""

import importlib.util

import pytest
import torch

from toroidal import toroidal_attention
from toroidal.functional import to_platters
from toroidal.geometry import TorusGeometry
from toroidal.kernels import BackendUnavailable, KernelRequest, flash2, get_backend

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
GPU_REASON = (
    "needs CUDA"
    if not torch.cuda.is_available()
    else ("needs flash-attn (pip install 'toroidal[gpu]')" if not HAS_FLASH else "")
)
needs_gpu_flash = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON)


def _request(dtype=torch.float16, n_queries=8, n_keys=8, requires_grad=False, padding=False, **geo):
    geometry = TorusGeometry(**{"depth": 2, "period": n_keys, "lambda_distance": 0.0, "causal": True, **geo})
    return KernelRequest(
        device_type="cuda",
        dtype=dtype,
        requires_grad=requires_grad,
        need_weights=False,
        geometry=geometry,
        n_queries=n_queries,
        n_keys=n_keys,
        has_padding=padding,
    )


def _qkv(b=2, h=2, nq=8, nk=8, e=8, dtype=torch.float32, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shapes = [(b, h, nq, e), (b, h, nk, e), (b, h, nk, e)]
    return [
        torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for s in shapes
    ]


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed here")
def test_explicit_flash2_without_flash_attn_says_how_to_install():
    q, k, v = _qkv(dtype=torch.float16)
    with pytest.raises(
        BackendUnavailable, match=r"flash-attn is not installed \(pip install 'toroidal\[gpu\]'\)"
    ):
        toroidal_attention(q, k, v, depth=2, causal=True, backend="flash2")


def test_flash2_on_cpu_needs_cuda(monkeypatch):
    monkeypatch.setattr(flash2, "_flash_attn_func", _documented_flash_attn_func)
    q, k, v = _qkv(dtype=torch.float16)
    with pytest.raises(BackendUnavailable, match="backend 'flash2' unavailable: flash2 needs CUDA"):
        toroidal_attention(q, k, v, depth=2, causal=True, backend="flash2")


@pytest.mark.parametrize(
    ("request_kw", "reason"),
    [
        (dict(dtype=torch.float32), "flash2 needs fp16/bf16 (got float32)"),
        (dict(lambda_distance=0.1), "flash2 needs lambda_distance == 0 (flash-attn has no score bias)"),
        (dict(padding=True), "flash2 takes no key padding mask"),
        (
            dict(window=2, period=8, n_queries=8),
            "circular window that wraps around the ring (window=2, period=8)",
        ),
        (dict(window=1, q_offset=6, n_queries=2, n_keys=4, period=64), "whole window lies past the last key"),
        (dict(requires_grad=True), "depth > 1 and a causal/window mask is inference-only"),
        (dict(requires_grad=True, window=2, causal=False, period=64), "inference-only"),
    ],
)
def test_unsupported_calls_name_the_condition(request_kw, reason):
    assert reason in flash2.unsupported_call(_request(**request_kw))


@pytest.mark.parametrize(
    "request_kw",
    [
        dict(depth=1, requires_grad=True),  # plain causal: flash's own mask
        dict(causal=False, requires_grad=True),  # no mask: every platter-token sees every key
        dict(window=2, period=64),  # a window that never reaches around the ring
        dict(window=4, period=8, requires_grad=False),  # window >= P // 2 allows everything
        dict(depth=1, window=4, period=8, requires_grad=True),
    ],
)
def test_supported_calls(request_kw):
    assert flash2.unsupported_call(_request(**request_kw)) is None


def _documented_flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), return_attn_probs=False
):
    """flash_attn_func as flash-attn 2 documents it, in plain torch (any device, any dtype).

    q (B, Sq, Hq, d), k and v (B, Sk, Hk, d); query head h uses key head h // (Hq // Hk);
    the mask is bottom-right aligned: row r sees [r + Sk - Sq - left, r + Sk - Sq + right],
    a negative size is unbounded, causal means right = 0; empty rows give 0 and lse = +inf.
    """
    assert dropout_p == 0.0 and q.dim() == k.dim() == v.dim() == 4 and q.shape[2] % k.shape[2] == 0
    sq, sk = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    left, right = window_size
    right = 0 if causal else right
    left = sk if left < 0 and right >= 0 else left
    right = sk if right < 0 and left >= 0 else right
    row = torch.arange(sq)[:, None] + sk - sq
    col = torch.arange(sk)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        allowed &= col >= row - left
    if right >= 0:
        allowed &= col <= row + right
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=-1e30)).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    return (out, lse, None) if return_attn_probs else out


MAPPING_CASES = [
    # (depth, causal, window, period, q_offset, n_queries, n_keys)
    (1, True, None, 8, 0, 8, 8),  # flash's own causal mask
    (3, True, None, 8, 0, 8, 8),  # block-causal over platters
    (3, True, 2, 32, 0, 8, 8),
    (2, False, 2, 32, 0, 8, 8),
    (2, False, None, 8, 0, 8, 8),  # no mask: direct call over platter-tokens
    (2, True, None, 32, 5, 1, 6),  # decoding one position with a KV cache
    (2, True, None, 32, 2, 4, 10),  # keys past the last query: sliced off
    (1, True, 3, 32, 4, 3, 5),  # queries past the last key: right window > 0
    (2, False, 1, 32, 0, 4, 9),
    (2, False, 1, 32, 3, 4, 6),
    (2, True, 4, 8, 0, 12, 12),  # window >= P // 2: only the causal rule is left
]


@pytest.mark.parametrize(("depth", "causal", "window", "period", "q_offset", "nq", "nk"), MAPPING_CASES)
def test_index_mapping_matches_reference(monkeypatch, depth, causal, window, period, q_offset, nq, nk):
    # Checks the position-level band, key slicing and LSE merge on CPU, with flash replaced by
    # its documented semantics; the real kernel is checked on GPU below.
    monkeypatch.setattr(flash2, "_flash_attn_func", _documented_flash_attn_func)
    request = _request(
        n_queries=nq, n_keys=nk, depth=depth, causal=causal, window=window, period=period, q_offset=q_offset
    )
    assert flash2.unsupported_call(request) is None
    geometry = request.geometry
    q, k, v = (to_platters(t, depth) for t in _qkv(nq=nq, nk=nk, e=6 * depth))
    scale = 0.3
    with torch.no_grad():
        out, _ = get_backend("flash2").forward(q, k, v, geometry, None, scale, False)
        expected, _ = get_backend("reference").forward(q, k, v, geometry, None, scale, False)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-5


def test_depth_one_gradients_flow_through_flash(monkeypatch):
    monkeypatch.setattr(flash2, "_flash_attn_func", _documented_flash_attn_func)
    geometry = TorusGeometry(1, 32, 0.0, True, 3, 4)
    grads = []
    for name in ("flash2", "reference"):
        q, k, v = _qkv(nq=3, nk=7, requires_grad=True)
        out, _ = get_backend(name).forward(q, k, v, geometry, None, 0.3, False)
        out.square().sum().backward()
        grads.append(torch.cat([t.grad.flatten() for t in (q, k, v)]))
    assert (grads[0] - grads[1]).abs().max() < 1e-5


def test_merged_path_refuses_gradients(monkeypatch):
    monkeypatch.setattr(flash2, "_flash_attn_func", _documented_flash_attn_func)
    q, k, v = (to_platters(t, 2) for t in _qkv(e=8, requires_grad=True))
    with pytest.raises(BackendUnavailable, match="inference-only"):
        get_backend("flash2").forward(q, k, v, TorusGeometry(2, 8, 0.0, True), None, 0.5, False)


GPU_CASES = [
    dict(depth=1, causal=True),
    dict(depth=1, causal=True, window=16, period=256),
    dict(depth=4, causal=False),
    dict(depth=4, causal=True),
    dict(depth=2, causal=False, window=8, period=256),
    dict(depth=2, causal=True, q_offset=40, n_queries=1),  # decoding step
]


@needs_gpu_flash
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_parity_with_reference(case, dtype):
    case = dict(case)
    n_queries, q_offset = case.pop("n_queries", 48), case.get("q_offset", 0)
    q, k, v = _qkv(nq=n_queries, nk=q_offset + n_queries, e=64, dtype=dtype, device="cuda")
    with torch.no_grad():
        out = toroidal_attention(q, k, v, backend="flash2", **case)
        expected = toroidal_attention(q, k, v, backend="reference", **case)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@needs_gpu_flash
@pytest.mark.parametrize("case", [dict(depth=1, causal=True), dict(depth=4, causal=False)])
def test_gpu_gradients_match_reference(case):
    grads = []
    for name in ("flash2", "reference"):
        q, k, v = _qkv(nq=48, nk=48, e=64, dtype=torch.float16, device="cuda", requires_grad=True)
        toroidal_attention(q, k, v, backend=name, **case).float().square().sum().backward()
        grads.append(torch.cat([t.grad.float().flatten() for t in (q, k, v)]))
    assert (grads[0] - grads[1]).abs().max() < 1e-2 * grads[1].abs().max()

"""flash2: the band composition against `reference` (values and gradients), its reasons, its adapters.

On the CPU the composition runs through `TorchFlashAdapter` (flash-attn's documented semantics in
plain torch) in float32, and through `FlashAttnAdapter` over a simulation of the CUDA kernel as its
source behaves (window normalization, causal ALiBi by column, +inf lse on empty rows, head dims that
are multiples of 8). On a CUDA machine with flash-attn the GPU tests run flash-attn itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toroidal import toroidal_attention
from toroidal.functional import plan_call
from toroidal.geometry import TorusGeometry
from toroidal.kernels import BackendUnavailable, get_backend, select
from toroidal.kernels import flash_adapter as fa
from toroidal.kernels.flash2 import plan_calls, torus_flash_attention, unsupported_call
from toroidal.kernels.flash_adapter import FlashAttnAdapter, TorchFlashAdapter
from toroidal.runtime.install import install_command

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
GPU_REASON = (
    "needs a CUDA GPU"
    if not torch.cuda.is_available()
    else (f"needs flash-attn ({install_command('gpu')})" if not HAS_FLASH else "")
)
needs_gpu_flash = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON)
FLASH2 = get_backend("flash2")


@contextlib.contextmanager
def flash_adapter(adapter):
    """Run backend 'flash2' through `adapter` (hypothesis tests cannot take function-scoped fixtures)."""
    saved = FLASH2.adapter
    FLASH2.adapter = adapter
    select.forget_decisions()
    try:
        yield
    finally:
        FLASH2.adapter = saved
        select.forget_decisions()


def _torus_call(
    c: dict, gen: torch.Generator, dtype=torch.float32, device="cpu", backend="flash2", round_to=None
):
    """(out, dq, dk, dv) of the toroidal_attention call `c`, inputs rounded to `round_to` first."""
    n, n_q = c["n"], min(c["queries"], c["n"]) or c["n"]
    e, heads, kv_heads = c["width"] * c["depth"], 4, c["kv_heads"]
    shapes = [(2, heads, n_q, e), (2, kv_heads, n, e), (2, kv_heads, n, e)]
    rounded = (torch.randn(s, generator=gen).to(round_to or dtype) for s in shapes)
    q, k, v = (t.to(device, dtype).requires_grad_() for t in rounded)
    out = toroidal_attention(
        q, k, v, depth=c["depth"], lambda_distance=c["lam"], causal=c["causal"], window=c["window"],
        period=max(1, n + c["period_change"]), q_offset=n - n_q, backend=backend,
    )  # fmt: skip
    cotangent = torch.linspace(-1, 1, out.shape[-1], device=device)
    grads = torch.autograd.grad((out.float() * cotangent).sum(), (q, k, v))
    return (out, *grads)


cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 24),
        "depth": st.sampled_from([1, 2, 3, 4]),
        "width": st.sampled_from([2, 8]),
        "lam": st.sampled_from([0.0, 0.1, 3.0]),
        "causal": st.booleans(),
        "period_change": st.integers(-23, 9),  # P < N wraps the sequence, P = N, P > N
        "window": st.sampled_from([None, 0, 1, 3, 10**6]),  # 10**6: the whole ring
        "queries": st.integers(0, 5),  # 0: a full pass; else the last few positions (KV-cache decoding)
        "kv_heads": st.sampled_from([1, 2, 4]),  # grouped queries: 4 query heads
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_composition_matches_reference_values_and_gradients(c):
    results = {}
    with flash_adapter(TorchFlashAdapter()):
        for backend in ("reference", "flash2"):
            results[backend] = _torus_call(c, torch.Generator().manual_seed(c["seed"]), backend=backend)
    for got, want in zip(results["flash2"], results["reference"], strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5


@settings(max_examples=300, deadline=None)
@given(
    n_queries=st.integers(1, 40),
    n_keys=st.integers(1, 40),
    period=st.integers(1, 90),
    lam=st.sampled_from([0.0, 0.5]),
    causal=st.booleans(),
    window=st.sampled_from([None, 0, 1, 2, 5, 17]),
    past=st.integers(0, 40),
)
def test_every_query_before_the_last_key_has_a_plan(n_queries, n_keys, period, lam, causal, window, past):
    n_queries = min(n_queries, n_keys)
    q_offset = min(past, n_keys - n_queries)
    geometry = TorusGeometry(1, period, lam, causal, window, q_offset)
    calls = plan_calls(geometry, n_queries, n_keys, max_bands=None)
    assert not isinstance(calls, str), calls
    for call in calls:
        n_rows, n_cols = call.rows[1] - call.rows[0], call.keys[1] - call.keys[0]
        assert n_rows >= 1 and n_cols >= 1 and call.keys[0] >= 0 and call.keys[1] <= n_keys
        left, right = call.window
        assert left >= -1 and -1 <= right < n_cols  # never a size flash-attn would read as unbounded


GEOMETRIES = [
    # (depth, period, lambda, causal, window, q_offset, n_queries, n_keys): what each one exercises
    (2, 12, 0.7, True, None, 0, 12, 12),  # causal near and far bands, kink at m = lo
    (3, 7, 3.0, False, None, 0, 9, 9),  # P < N bidirectional: flipped bands, negative slopes
    (2, 40, 0.3, True, 5, 0, 16, 16),  # a window that never wraps
    (2, 10, 0.3, True, 2, 0, 16, 16),  # a window that wraps around the seam
    (4, 32, 0.5, True, None, 19, 1, 20),  # one decoding step
    (2, 16, 0.0, True, 3, 0, 20, 20),  # lambda = 0: joined intervals, no ALiBi
    (2, 16, 0.0, False, None, 0, 10, 10),  # one plain call over platter-tokens
    (1, 9, 1.0, False, 2, 2, 4, 10),  # keys past the last query
]


@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_composition_in_float64_is_exact(geometry_case):
    depth, period, lam, causal, window, q_offset, n_q, n_k = geometry_case
    geometry = TorusGeometry(depth, period, lam, causal, window, q_offset)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 3, n * depth, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        for n in (n_q, n_k, n_k)
    )
    results = []
    for out in (
        torus_flash_attention(q, k, v, geometry, 0.6, TorchFlashAdapter()),
        get_backend("reference").forward(q, k, v, geometry, None, 0.6, False)[0],
    ):
        results.append((out, *torch.autograd.grad(out.sin().sum(), (q, k, v))))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() <= 1e-12


# --- FlashAttnAdapter over a simulation of flash-attn's CUDA kernel -------------------------------


class _KernelSim:
    """flash-attn 2's `_flash_attn_forward/_backward` as its C++/CUDA source behaves, in plain torch.

    Beyond the documented semantics: sizes >= Sk become unbounded, causal mode is (left < 0,
    right == 0) after that, and in causal mode ALiBi adds +slope * column (the same softmax,
    another lse); head dims must be multiples of 8; the backward writes into dq, dk, dv.
    `split_window`: 2.7+'s window_size_left/right, else 2.6's window_size tuple and 8-tuple result.
    """

    def __init__(self, split_window: bool):
        self.split_window = split_window
        self.causal_alibi_calls = 0

    def _window(self, causal, kwargs, n_keys):
        left, right = (kwargs["window_size_left"], kwargs["window_size_right"]) if self.split_window else (
            kwargs["window_size"]
        )  # fmt: skip
        left = -1 if left >= n_keys else left
        right = -1 if right >= n_keys else right
        right = 0 if causal else right
        return left, right

    def _scores(self, q, k, causal, alibi_slopes, scale, kwargs):
        assert q.dtype == k.dtype and q.shape[-1] % 8 == 0, "head dims must be multiples of 8"
        n_q, n_k = q.shape[1], k.shape[1]
        left, right = self._window(causal, kwargs, n_k)
        k_rep = k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k_rep) * scale
        t = fa.diagonal_offsets(n_q, n_k)
        allowed = torch.ones(n_q, n_k, dtype=torch.bool)
        if left >= 0:
            allowed &= t <= left
        if right >= 0:
            allowed &= t >= -right
        if alibi_slopes is not None:
            assert alibi_slopes.dtype == torch.float32 and alibi_slopes.shape == (q.shape[2],)
            slopes = alibi_slopes.double()[None, :, None, None]
            if left < 0 and right == 0:  # the kernel's causal branch: + slope * column
                self.causal_alibi_calls += 1
                scores = scores + slopes * torch.arange(n_k, dtype=torch.float64)
            else:
                scores = scores - slopes * t.abs().double()
        return scores.masked_fill(~allowed, float("-inf"))

    def forward(
        self, q, k, v, dropout_p, softmax_scale, *, causal, softcap, alibi_slopes, return_softmax, **kw
    ):
        assert dropout_p == 0.0 and softcap == 0.0 and not return_softmax
        scores = self._scores(q, k, causal, alibi_slopes, softmax_scale, kw)
        lse = torch.logsumexp(scores, -1)
        lse = torch.where(torch.isneginf(lse), float("inf"), lse)
        probs = torch.exp(scores - lse[..., None])
        v_rep = v.double().repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v_rep).to(q.dtype)
        if self.split_window:
            return out, lse.float(), None, None
        return out, q, k, v, out, lse.float(), None, None

    def backward(
        self, dout, q, k, v, out, lse, dq, dk, dv, dropout_p, softmax_scale, *, causal, softcap, alibi_slopes,
        deterministic, rng_state, **kw,
    ):  # fmt: skip
        assert lse.dtype == torch.float32 and lse.is_contiguous() and dout.shape[-1] % 8 == 0
        scores = self._scores(q, k, causal, alibi_slopes, softmax_scale, kw)
        probs = torch.exp(scores - lse.double()[..., None])
        groups = q.shape[2] // k.shape[2]
        k_rep, v_rep = (t.double().repeat_interleave(groups, dim=2) for t in (k, v))
        delta = (dout.double() * out.double()).sum(-1).transpose(1, 2)
        dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout.double(), v_rep) - delta[..., None])
        dq.copy_(torch.einsum("bhqk,bkhd->bqhd", dscores, k_rep) * softmax_scale)
        b, n, hk, d = k.shape
        dk.copy_(
            (torch.einsum("bhqk,bqhd->bkhd", dscores, q.double()) * softmax_scale)
            .view(b, n, hk, groups, d)
            .sum(3)
        )
        dv.copy_(torch.einsum("bhqk,bqhd->bkhd", probs, dout.double()).view(b, n, hk, groups, d).sum(3))


@pytest.mark.parametrize("split_window", [True, False], ids=["flash-attn>=2.7", "flash-attn-2.6"])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_flash_attn_adapter_over_the_kernel_simulation(monkeypatch, split_window, geometry_case):
    sim = _KernelSim(split_window)
    monkeypatch.setattr(
        FlashAttnAdapter,
        "api",
        staticmethod(lambda: fa._FlashApi(sim.forward, sim.backward, split_window, "sim")),
    )
    depth, period, lam, causal, window, q_offset, n_q, n_k = geometry_case
    geometry = TorusGeometry(depth, period, lam, causal, window, q_offset)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n * depth, 5, generator=gen, requires_grad=True) for n in (n_q, n_k, n_k))
    results = []
    for adapter in (FlashAttnAdapter(), TorchFlashAdapter()):
        out = torus_flash_attention(q, k, v, geometry, 0.6, adapter)
        results.append((out, *torch.autograd.grad(out.sin().sum(), (q, k, v))))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() <= 1e-5
    if geometry_case == GEOMETRIES[0]:
        assert sim.causal_alibi_calls > 0  # the lse shift of the kernel's causal ALiBi was exercised


def test_empty_rows_are_zeros_with_finite_gradients():
    # Queries past the last key whose window reaches no key: nothing to attend.
    geometry = TorusGeometry(1, 64, 0.5, False, 1, 6)
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for n in (3, 4, 4))
    out = torus_flash_attention(q, k, v, geometry, 0.5, TorchFlashAdapter())
    expected, _ = get_backend("reference").forward(q, k, v, geometry, None, 0.5, False)
    assert out[:, :, 1:].abs().max() == 0 and (out - expected).abs().max() <= 1e-6
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_inference_needs_no_graph():
    q = torch.randn(1, 2, 8, 4)
    with flash_adapter(TorchFlashAdapter()), torch.no_grad():
        out = toroidal_attention(q, q, q, depth=2, causal=True, lambda_distance=0.2, backend="flash2")
    assert out.grad_fn is None and torch.isfinite(out).all()


# --- reasons ---------------------------------------------------------------------------------------


def _request(dtype=torch.float16, device_type="cuda", n_queries=8, n_keys=8, **geo):
    geometry = TorusGeometry(**{"depth": 2, "period": n_keys, "lambda_distance": 0.1, "causal": True, **geo})
    request = plan_call(*(torch.zeros(1, 1, 8, 4),) * 3, depth=2).request
    return dataclasses.replace(
        request, device_type=device_type, dtype=dtype, geometry=geometry, n_queries=n_queries, n_keys=n_keys
    )


def test_on_the_cpu_the_first_reason_is_the_gpu():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(
        BackendUnavailable, match=r"backend 'flash2' unavailable: flash2 needs a CUDA GPU \(got cpu\)"
    ):
        toroidal_attention(q, q, q, depth=2, causal=True, backend="flash2")
    assert FLASH2.unavailable_reason(_request(device_type="cpu", dtype=torch.float32)).startswith(
        "flash2 needs a CUDA GPU"
    )


@pytest.mark.parametrize(
    ("api", "capability", "dtype", "reason"),
    [
        ("flash-attn is not installed (pip install ...)", (9, 0), torch.float16, "not installed"),
        (None, (7, 5), torch.float16, "Ampere or newer GPU (sm80+), found sm75"),
        (None, (9, 0), torch.float32, "flash2 needs fp16/bf16 (got float32)"),
        (None, (8, 0), torch.bfloat16, None),
    ],
)
def test_flash_attn_reasons_on_a_cuda_request(monkeypatch, api, capability, dtype, reason):
    loaded = api or fa._FlashApi(None, None, True, "2.8.3")
    monkeypatch.setattr(FlashAttnAdapter, "api", staticmethod(lambda: loaded))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    got = FlashAttnAdapter().unavailable_reason(_request(dtype=dtype))
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(need_weights=True), "cannot return attention weights"),
        (dict(has_padding=True), "takes no key padding mask"),
        (dict(geometry=TorusGeometry(2, 1, 0.1, False), n_queries=40, n_keys=40), "more than 64 bands"),
        (
            dict(geometry=TorusGeometry(1, 64, 0.5, False, None, 10), n_queries=4, n_keys=2),
            "queries past the last key",
        ),
    ],
)
def test_calls_the_composition_cannot_serve_say_why(change, reason):
    assert reason in unsupported_call(dataclasses.replace(_request(), **change))


def test_platter_widths_over_256_are_refused_before_any_flash_call():
    q = torch.zeros(1, 1, 4, 264)
    with pytest.raises(BackendUnavailable, match="flash-attn takes head dims up to 256"):
        FLASH2.forward(q, q, q, TorusGeometry(1, 4, 0.0, True), None, 0.1, False)


@pytest.mark.parametrize(
    "geo",
    [
        dict(lambda_distance=3.0, window=2, period=5),  # wrapping window with a bias
        dict(causal=False, period=3),  # period much shorter than the sequence, both directions
        dict(q_offset=7, period=64),  # decoding
    ],
)
def test_any_lambda_period_and_window_is_served(geo):
    assert unsupported_call(_request(n_queries=8 - geo.get("q_offset", 0), **geo)) is None


def test_without_lambda_or_window_a_short_period_is_still_one_call():
    # Thousands of ring bands, but with lambda = 0 and no window they join into one causal call.
    calls = plan_calls(TorusGeometry(4, 8, 0.0, True), 4096, 4096)
    assert [(c.rows, c.keys, c.window, c.slope) for c in calls] == [((0, 4096), (0, 4096), (-1, 0), 0.0)]


def test_auto_takes_flash2_first_on_cuda_for_training_with_a_bias():
    request = dataclasses.replace(
        _request(dtype=torch.bfloat16, n_queries=4096, n_keys=4096), requires_grad=True
    )
    with flash_adapter(TorchFlashAdapter()):  # no GPU needed to ask
        assert select._auto_order(request)[0] == "flash2"
        assert select.resolve_backend("auto", request).name == "flash2"


# --- flash-attn itself (CUDA) ----------------------------------------------------------------------

GPU_CASES = [
    # (n, depth, width, lambda, causal, period - n, window, decoded queries, kv heads)
    (48, 1, 64, 0.0, True, 0, None, 0, 4),  # plain causal attention: one flash call
    (48, 4, 16, 0.1, True, 0, None, 0, 2),  # near and far bands, grouped queries
    (48, 4, 16, 3.0, False, -17, None, 0, 4),  # P < N both ways: flipped bands, negative slopes
    (48, 2, 32, 0.5, True, -16, 5, 0, 4),  # a window wrapping the seam
    (48, 2, 12, 0.5, False, 0, 3, 0, 1),  # width 12, padded to 16 for flash-attn; one key head
    (48, 4, 16, 0.2, True, 16, None, 1, 4),  # one decoding step, P > N
    (300, 4, 32, 0.7, True, -100, 37, 0, 4),  # several wraps and many blocks
]
GPU_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative (norm) error


@needs_gpu_flash
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_flash_attn_matches_reference(case, dtype):
    keys = ("n", "depth", "width", "lam", "causal", "period_change", "window", "queries", "kv_heads")
    c = dict(zip(keys, GPU_CASES[case], strict=True))
    got = _torus_call(c, torch.Generator().manual_seed(case), dtype, "cuda", "flash2")
    want = _torus_call(c, torch.Generator().manual_seed(case), torch.float32, "cuda", "reference", dtype)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(a).all(), name
        relative = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
        assert relative < GPU_TOLERANCE[dtype], (name, relative)


@needs_gpu_flash
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "options",
    [
        dict(window_size=(-1, 0), slope=0.05),  # the kernel's causal ALiBi (lse shifted by the adapter)
        dict(window_size=(7, 0), slope=-0.05),  # a far band: negative slope
        dict(window_size=(3, 5), slope=0.0),
        dict(window_size=(-1, -1), slope=0.02),
    ],
)
@pytest.mark.parametrize(("n_q", "n_k"), [(40, 40), (13, 57), (57, 13)])
def test_gpu_flash_attn_keeps_the_adapter_contract(dtype, options, n_q, n_k):
    gen = torch.Generator().manual_seed(n_q * n_k)
    q = torch.randn(2, n_q, 8, 20, generator=gen).to("cuda", dtype)  # width 20: padded to 24
    k, v = (torch.randn(2, n_k, 2, 20, generator=gen).to("cuda", dtype) for _ in "kv")
    dout = torch.randn(2, n_q, 8, 20, generator=gen).to("cuda", dtype)
    slopes = None if options["slope"] == 0 else torch.full((8,), options["slope"], device="cuda")
    kw = dict(causal=False, window_size=options["window_size"], alibi_slopes=slopes, softmax_scale=0.3)
    results = []
    for adapter in (FlashAttnAdapter(), TorchFlashAdapter()):
        out, lse = adapter.forward(q, k, v, **kw)
        grads = adapter.backward(dout, q, k, v, out, lse, **kw)
        results.append((out, lse, *grads))
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), name
        error = (got.float() - want.float())[finite].abs().max().item() if finite.any() else 0.0
        assert error < (2e-2 if dtype == torch.float16 else 1e-1), (name, error)

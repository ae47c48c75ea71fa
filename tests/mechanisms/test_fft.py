"""The FFT approximation (`toroidal.fft`): exact against its materialized circulant, tied to the
torus definition, causal, differentiable, inside `ToroidalAttention` and `toroidal bench`."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_one_line_error
from torch import nn
from typer.testing import CliRunner

from toroidal import ToroidalAttention, ToroidalConfig, toroidal_attention
from toroidal.fft import (
    convolution_plan,
    fft_toroidal_mixing,
    materialized_circulant,
    offset_buckets,
)
from toroidal.integrations.transformers import apply_toroidal
from toroidal.mechanisms import build_kernel, get_mechanism
from toroidal.mechanisms.fft import FFTToroidalKernel
from toroidal_cli.app import app
from toroidal_cli.results import read_result

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, N, E = 2, 2, 12, 8


def qkv(dtype=torch.float32, n=N, heads=H, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, n, E, generator=generator, dtype=dtype) for _ in range(3)]


def random_logits(depth, dtype=torch.float32, buckets=4):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(H, depth, depth, 2 * buckets, generator=generator, dtype=dtype)


def through_circulant(q, k, v, **torus):
    """The output computed the slow way: the dense weights times the platter values."""
    depth = torus["depth"]
    weights = materialized_circulant(q, k, **torus)
    if k.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    platters = v.reshape(v.shape[0], v.shape[1], -1, E // depth)
    out = torch.einsum("bhpr,bhrw->bhpw", weights.to(v.dtype), platters)
    return out.reshape(q.shape)


# --- exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_fft_equals_the_materialized_circulant_with_period_n(causal, depth):
    q, k, v = qkv()
    torus = dict(depth=depth, lambda_distance=0.5, period=N, causal=causal)
    torus["offset_logits"] = random_logits(depth)
    fast = fft_toroidal_mixing(q, k, v, **torus)
    assert fast.shape == q.shape and fast.dtype == q.dtype
    torch.testing.assert_close(fast, through_circulant(q, k, v, **torus), atol=1e-5, rtol=0)


PADDING = torch.tensor([[True] * N, [True] * 7 + [False] * (N - 7)])
SETTINGS = {
    "period divides N": dict(period=N // 3),
    "period does not divide N": dict(period=5),
    "period above N": dict(period=3 * N),
    "window": dict(window=2),
    "causal window across the seam": dict(causal=True, period=7, window=2),
    "padding": dict(key_padding_mask=PADDING),
    "causal padding": dict(causal=True, key_padding_mask=PADDING),
    "a fully padded sequence": dict(window=1, key_padding_mask=torch.tensor([[False] * N, [True] * N])),
    "content": dict(content=True),
    "content with padding": dict(content=True, key_padding_mask=PADDING),
    "no learned logits": dict(offset_logits=None),
    "decoding rows": dict(causal=True, period=16, q_offset=N - 3),
    "grouped key heads": dict(kv_heads=1),
}


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_fft_equals_the_materialized_weights_in_every_supported_setting(setting):
    setting = dict(setting)
    q, k, v = qkv(torch.float64)
    kv_heads = setting.pop("kv_heads", H)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    q = q[:, :, setting.get("q_offset", 0) :]
    torus = dict(depth=2, lambda_distance=0.8, offset_logits=random_logits(2, torch.float64)) | setting
    fast = fft_toroidal_mixing(q, k, v, **torus)
    torch.testing.assert_close(fast, through_circulant(q, k, v, **torus), atol=1e-10, rtol=0)


def test_a_row_with_no_real_key_in_reach_is_zero_not_nan():
    q, k, v = qkv()
    padding = torch.tensor([[False] * N, [True] + [False] * (N - 1)])  # one real key: position 0
    out = fft_toroidal_mixing(q, k, v, depth=2, window=1, key_padding_mask=padding)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    # Within ring distance 1 of position 0 (P = N): rows 0, 1 and N - 1, across the seam.
    assert out[1, :, 2 : N - 1].abs().max() == 0 and out[1, :, [0, 1, N - 1]].abs().min() > 0
    # The gradients of empty rows are zeros too, not NaN (the normalizer is ~0 there).
    v = v.clone().requires_grad_(True)
    fft_toroidal_mixing(q, k, v, depth=2, window=1, key_padding_mask=padding).sum().backward()
    assert torch.isfinite(v.grad).all()


TIED = {
    "bidirectional": dict(),
    "bidirectional, P not dividing N, window": dict(period=5, window=2),
    "causal, P = max_len": dict(causal=True, period=32),
    "causal window across the seam": dict(causal=True, period=7, window=2),
    "causal padding": dict(causal=True, key_padding_mask=PADDING),
}


@pytest.mark.parametrize("setting", TIED.values(), ids=TIED.keys())
def test_untrained_mixing_is_exact_toroidal_attention_with_zero_queries(setting):
    """With no learned logits and no content the weights are the torus definition itself:
    exact toroidal attention whose queries are all zero (every score is the bias)."""
    q, k, v = qkv()
    torus = dict(depth=2, lambda_distance=2.0) | setting
    exact, weights = toroidal_attention(
        torch.zeros_like(q), k, v, backend="reference", return_weights=True, **torus
    )
    torch.testing.assert_close(materialized_circulant(q, k, **torus), weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(fft_toroidal_mixing(q, k, v, **torus), exact, atol=1e-5, rtol=0)


def test_bidirectional_mixing_with_period_n_commutes_with_cyclic_shifts():
    q, k, v = qkv(torch.float64)
    torus = dict(depth=2, lambda_distance=0.7, content=True, offset_logits=random_logits(2, torch.float64))
    out = fft_toroidal_mixing(q, k, v, **torus)
    shifted = fft_toroidal_mixing(*(t.roll(5, dims=2) for t in (q, k, v)), **torus)
    torch.testing.assert_close(shifted, out.roll(5, dims=2), atol=1e-12, rtol=0)
    assert convolution_plan(N, N, causal=False, padded=False) == ("circular", N)


def test_offset_buckets_split_directions_and_grow_with_distance():
    period, buckets = 64, 8
    offsets = torch.arange(-period, 2 * period)
    index = offset_buckets(offsets, period, buckets)
    assert index.min() >= 0 and index.max() < 2 * buckets
    torch.testing.assert_close(index, offset_buckets(offsets + period, period, buckets))  # periodic
    ahead = torch.arange(1, period // 2)
    assert (offset_buckets(-ahead, period, buckets) == offset_buckets(ahead, period, buckets) + buckets).all()
    behind = offset_buckets(torch.arange(0, period // 2 + 1), period, buckets)
    assert behind[: buckets // 2].tolist() == list(range(buckets // 2))  # short distances: a bucket each
    assert (behind.diff() >= 0).all() and behind[-1] == buckets - 1


# --- gradients, the module, causality --------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [dict(content=True, window=3), dict(causal=True, period=5, key_padding_mask=PADDING[:, :6])],
    ids=["bidirectional content", "causal padding"],
)
def test_gradcheck(setting):
    q, k, v = (t[:, :, :6].clone().requires_grad_() for t in qkv(torch.float64))
    logits = random_logits(2, torch.float64, buckets=2).requires_grad_()

    def mixing(q, k, v, logits):
        return fft_toroidal_mixing(q, k, v, depth=2, lambda_distance=0.6, offset_logits=logits, **setting)

    assert torch.autograd.gradcheck(mixing, (q, k, v, logits), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_toroidal_attention_with_fft_runs_forward_and_backward(causal):
    torch.manual_seed(0)
    module = ToroidalAttention(
        d_model=32, n_heads=2, depth=2, causal=causal, max_len=64, approximation="fft", rope="periodic"
    )
    x = torch.randn(2, 10, 32)
    out, weights = module(x, return_attention=True)
    assert out.shape == (2, 10, 32) and weights.shape == (2, 2, 20, 20)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 20))
    out.square().sum().backward()
    gradients = [module.fft.offset_logits.grad, module.qkv.weight.grad]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gradients)
    assert module(x)[1] is None


def test_causal_fft_module_does_not_leak_future_tokens():
    torch.manual_seed(0)
    module = ToroidalAttention(d_model=32, n_heads=2, depth=2, causal=True, max_len=16, approximation="fft")
    module = module.double()
    nn.init.normal_(module.fft.offset_logits)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 7:] = torch.randn(1, 5, 32, dtype=torch.float64)
    before, after = module(x)[0], module(changed)[0]
    torch.testing.assert_close(after[:, :7], before[:, :7], atol=1e-12, rtol=0)
    assert (after[:, 7:] - before[:, 7:]).abs().max() > 1e-3


def test_the_mechanism_kernel_reports_its_convolution_and_fuses_platters():
    mechanism = get_mechanism("fft")
    assert mechanism.approximates == "toroidal" and {"depth", "buckets", "content"} <= set(mechanism.accepts)
    kernel = build_kernel("fft", H, E, depth=2, lambda_distance=0.1, max_len=32, buckets=4, fusion="mean")
    assert isinstance(kernel, FFTToroidalKernel) and kernel.get_metrics() == {}
    q, k, v = qkv()
    out = kernel(q, k, v, causal=True)
    assert kernel.get_metrics() == {"convolution": "linear", "fft_length": 24}
    platters = out.reshape(B, H, N, 2, E // 2)
    torch.testing.assert_close(platters[..., 0, :], platters[..., 1, :])  # mean fusion
    kernel(q, k, v, causal=False)
    assert kernel.get_metrics() == {"convolution": "circular", "fft_length": N}
    kernel.reset_metrics()
    assert kernel.get_metrics() == {}


# --- what it refuses ---------------------------------------------------------------------------------------


FFT_CONFIG = ToroidalConfig(rope="none", approximation="fft")


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        (
            lambda q, k, v: fft_toroidal_mixing(q, k, v, depth=2, causal=True, content=True),
            ["leak", "causal"],
        ),
        (lambda q, k, v: fft_toroidal_mixing(q[:, :, :4], k, v, depth=2), ["q_offset + N_q = N_k"]),
        (lambda q, k, v: fft_toroidal_mixing(q, k, v, depth=3), ["depth=3", "divide"]),
        (
            lambda q, k, v: fft_toroidal_mixing(q, k, v, depth=2, offset_logits=torch.zeros(H, 2, 2, 3)),
            ["offset_logits", "2 * buckets"],
        ),
        (lambda q, k, v: build_kernel("fft", H, E, backend="sdpa"), ["unknown option", "backend"]),
        (lambda q, k, v: build_kernel("fft", H, E, buckets=-1), ["buckets=-1"]),
        (lambda q, k, v: build_kernel("fft", H, E, content="yes"), ["content='yes'"]),
        (lambda q, k, v: ToroidalConfig(approximation="fast"), ["approximation='fast'", "fft"]),
        (lambda q, k, v: apply_toroidal(nn.Module(), FFT_CONFIG), ["approximation='fft'", "apply_mechanism"]),
    ],
    ids=["causal content", "rows", "depth", "logits shape", "backend", "buckets", "content", "config", "hf"],
)
def test_unsupported_settings_raise_a_clear_error(call, fragments):
    with pytest.raises(ValueError) as error:
        call(*qkv())
    for fragment in fragments:
        assert fragment in str(error.value)


# --- toroidal bench ----------------------------------------------------------------------------------------

runner = CliRunner()
SHAPE = ["--seq-len", "16,32", "--d-model", "16", "--heads", "2", "--depth", "2"]
TINY = [*SHAPE, "--warmup", "0", "--repeats", "1"]


def test_bench_rows_of_fft_carry_the_error_against_exact_toroidal_attention(tmp_path):
    out = tmp_path / "fft.json"
    args = ["-m", "fft,toroidal", "-b", "auto", *TINY, "--no-isolate", "--no-causal", "--out", str(out)]
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    rows = read_result(out, command="bench")["rows"]
    fft_rows = [row for row in rows if row["mechanism"] == "fft"]
    assert [row["seq_len"] for row in fft_rows] == [16, 32]
    for row in fft_rows:
        assert row["status"] == "ok" and row["chosen"] == "fft"
        assert 0 < row["error"] < 2 and math.isfinite(row["error"])
        assert row["mechanism_metrics"] == {"convolution": "circular", "fft_length": row["seq_len"]}
    assert all(row["error"] is None for row in rows if row["mechanism"] == "toroidal")


def test_bench_with_an_option_fft_does_not_take_is_a_one_line_error():
    result = runner.invoke(app, ["bench", "-m", "fft", *TINY, "--option", "bucket=4"])
    assert_one_line_error(result, "bucket", "not accepted", "fft")

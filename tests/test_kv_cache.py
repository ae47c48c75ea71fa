"""Exact KV-cache decoding of `ToroidalAttention`: token by token and in chunks it equals the full pass."""

from __future__ import annotations

import pytest
import torch

from toroidal import ToroidalAttention, ToroidalConfig
from toroidal.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12


def _module(**overrides) -> ToroidalAttention:
    torch.manual_seed(0)
    fields = dict(d_model=32, n_heads=2, depth=2, lambda_distance=0.7, max_len=64, causal=True)
    fields.update(overrides)
    module = ToroidalAttention(ToroidalConfig(**fields)).eval()
    with torch.no_grad():  # a non-trivial platter mix, so fusion is part of what is compared
        for param in module.fusion.parameters():
            param.normal_(0.0, 0.3)
    return module


def _decode(module, x, chunks):
    cache, outputs, start = KVCache(), [], 0
    for size in chunks:
        out, _ = module(x[:, start : start + size], cache=cache)
        outputs.append(out)
        start += size
    assert cache.length == start
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize(
    "window, period", [(None, None), (3, None), (None, 5), (2, 5)], ids=["plain", "window", "wrap", "both"]
)
@pytest.mark.parametrize("chunks", [[1] * N, [3, 1, 5, 3]], ids=["tokens", "chunks"])
def test_decoding_equals_the_full_forward(depth, window, period, chunks):
    module = _module(depth=depth, window=window, period=period, fusion="low_rank", rope="standard")
    x = torch.randn(2, N, 32)
    with torch.no_grad():
        full, _ = module(x)
        decoded, _ = _decode(module, x, chunks)
    assert (decoded - full).abs().max() < 1e-5


@pytest.mark.parametrize(
    "rope, backend", [("periodic", "reference"), ("orthogonal", "sdpa"), ("none", "auto")]
)
def test_every_rope_and_backend_decodes_exactly(rope, backend):
    module = _module(depth=4, rope=rope, backend=backend, period=7, window=2, fusion="attention")
    x = torch.randn(1, N, 32)
    with torch.no_grad():
        full, _ = module(x)
        decoded, _ = _decode(module, x, [1] * N)
    assert (decoded - full).abs().max() < 1e-5


def test_decoding_is_not_trivially_equal():
    """The comparison can fail: decoding every token at position 0 (no cache) differs from the full pass."""
    module = _module(period=5, window=2)
    x = torch.randn(1, N, 32)
    with torch.no_grad():
        full, _ = module(x)
        fresh = torch.cat([module(x[:, t : t + 1], cache=KVCache())[0] for t in range(N)], dim=1)
    assert (fresh - full).abs().max() > 1e-3


def test_gradients_through_decoding_equal_those_of_the_full_pass():
    module = _module(depth=2, period=5, window=3)
    x = torch.randn(2, N, 32, requires_grad=True)
    cotangent = torch.randn(2, N, 32)
    full, _ = module(x)
    full_grads = torch.autograd.grad((full * cotangent).sum(), [x, *module.parameters()])
    decoded, _ = _decode(module, x, [2, 1, 4, 5])
    decoded_grads = torch.autograd.grad((decoded * cotangent).sum(), [x, *module.parameters()])
    for got, want in zip(decoded_grads, full_grads, strict=True):
        assert (got - want).abs().max() < 1e-5


def test_cache_memory_grows_by_one_position_per_token():
    module = _module(d_model=32, n_heads=2)
    x = torch.randn(3, N, 32)
    with torch.no_grad():
        _, cache = _decode(module, x, [4, 1])
        assert cache.keys.shape == cache.values.shape == (3, 2, 5, 16)
        assert cache.nbytes == 2 * 3 * 2 * 5 * 16 * 4
        _, longer = _decode(module, x, [N])
    assert longer.nbytes == cache.nbytes * N // 5


def test_bidirectional_modules_and_padding_masks_are_refused():
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="needs a causal module"):
        _module(causal=False)(x, cache=KVCache())
    with pytest.raises(ValueError, match="no attention_mask"):
        _module()(x, attention_mask=torch.ones(1, 4), cache=KVCache())
    cache = KVCache()
    _module()(x, cache=cache)
    with pytest.raises(ValueError, match="one cache per sequence batch"):
        _module()(torch.randn(2, 1, 32), cache=cache)

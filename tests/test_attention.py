import pytest
import torch
import torch.nn.functional as F

from toroidal import ToroidalAttention, ToroidalConfig, toroidal_attention
from toroidal.kernels import BackendUnavailable


def _module(**kw):
    torch.manual_seed(0)
    base = dict(d_model=32, n_heads=2, depth=2, lambda_distance=0.3, max_len=64)
    base.update(kw)
    return ToroidalAttention(**base).eval()


def test_research_snippet_runs_unchanged():
    attn = ToroidalAttention(
        d_model=512, n_heads=8, max_len=2048, depth=4, lambda_distance=0.1, fusion_mode="low_rank"
    )
    output, attn_weights = attn(torch.randn(2, 128, 512), return_attention=True)
    assert output.shape == (2, 128, 512)
    assert attn_weights.shape == (2, 8, 512, 512)
    assert torch.allclose(attn_weights.sum(-1), torch.ones(2, 8, 512), atol=1e-5)


def test_config_and_keywords_build_the_same_module():
    cfg = ToroidalConfig(d_model=32, n_heads=2, depth=2, window=3, fusion="mean")
    assert (
        ToroidalAttention(cfg).config
        == ToroidalAttention(d_model=32, n_heads=2, depth=2, window_size=3, fusion_mode="mean").config
    )
    with pytest.raises(TypeError):
        ToroidalAttention(cfg, depth=2)
    with pytest.raises(ValueError, match="ToroidalConfig.depth"):
        ToroidalAttention(d_model=32, n_heads=2, depth=3)


@pytest.mark.parametrize("rope", ["periodic", "none"])
@pytest.mark.parametrize("window", [None, 2])
def test_exact_cyclic_shift_invariance(rope, window):
    attn = _module(rope=rope, window=window, fusion="low_rank")
    torch.nn.init.normal_(attn.fusion.v)  # a non-trivial platter mix
    x = torch.randn(2, 12, 32)
    out, _ = attn(x)
    for shift in (1, 5, 11):
        shifted, _ = attn(torch.roll(x, shift, dims=1))
        assert (shifted - torch.roll(out, shift, dims=1)).abs().max() < 1e-5


def test_standard_rope_is_not_shift_invariant():
    # The same check must be able to fail: standard RoPE depends on i - j, not (i - j) mod P.
    attn = _module(rope="standard")
    x = torch.randn(1, 12, 32)
    out, _ = attn(x)
    shifted, _ = attn(torch.roll(x, 3, dims=1))
    assert (shifted - torch.roll(out, 3, dims=1)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("window", [None, 3])
def test_causal_no_leak(backend, window):
    attn = _module(causal=True, window=window, backend=backend, fusion="attention")
    torch.nn.init.normal_(attn.fusion.gate)
    x = torch.randn(1, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 32)
    a, _ = attn(x)
    b, _ = attn(y)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.equal(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("fusion", ["low_rank", "attention"])
def test_learned_fusion_starts_as_concat(fusion):
    torch.manual_seed(1)
    concat = _module(fusion="concat")
    learned = _module(fusion=fusion)
    learned.load_state_dict(concat.state_dict(), strict=False)
    x = torch.randn(2, 7, 32)
    assert torch.allclose(concat(x)[0], learned(x)[0], atol=1e-6)
    assert any(p.requires_grad for p in learned.fusion.parameters())


def test_padding_hides_padded_tokens():
    attn = _module(causal=False)
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    y = x.clone()
    y[1, 5:] = 100.0  # garbage at padded positions must not matter for real ones
    a, _ = attn(x, attention_mask=mask)
    b, _ = attn(y, attention_mask=mask)
    assert torch.allclose(a[1, :5], b[1, :5], atol=1e-5)


def test_depth_one_no_bias_equals_plain_attention():
    attn = _module(depth=1, lambda_distance=0.0, rope="none", causal=True, fusion="concat")
    x = torch.randn(2, 9, 32)
    out, _ = attn(x)
    q, k, v = attn.qkv(x).view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 32)
    assert (out - attn.out(plain)).abs().max() < 1e-5


def test_gradients_are_finite():
    attn = _module(causal=True, window=2, fusion="attention").train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    mask = torch.ones(2, 9)
    mask[0, :3] = 0  # left padding: early causal rows have nothing to attend
    out, _ = attn(x, attention_mask=mask)
    out.square().mean().backward()
    grads = [x.grad] + [p.grad for p in attn.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_weights_need_a_materializing_backend():
    attn = _module(backend="sdpa")
    with pytest.raises(BackendUnavailable, match="weights"):
        attn(torch.randn(1, 4, 32), return_attention=True)


def test_functional_input_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="divide"):
        toroidal_attention(q, q, q, depth=3)
    with pytest.raises(ValueError, match="multiple"):
        toroidal_attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), depth=2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        toroidal_attention(q, q, q, depth=2, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown backend"):
        toroidal_attention(q, q, q, depth=2, backend="nope")


def test_grouped_query_heads_equal_repeated_heads():
    q = torch.randn(1, 4, 6, 8)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    grouped = toroidal_attention(q, k, v, depth=2, lambda_distance=0.2, causal=True)
    repeated = toroidal_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), depth=2, lambda_distance=0.2, causal=True
    )
    assert torch.allclose(grouped, repeated)

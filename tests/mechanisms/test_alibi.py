"""The `alibi` mechanism against a materialized reference: slopes, values, gradients, decoding."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import padded_batch

from toroidal.mechanisms import alibi, build_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_slopes(n):
    """The reference implementation's `get_slopes` (ofirpress/attention_with_linear_biases), verbatim."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + paper_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def reference(q, k, v, *, causal, padding=None, q_offset=0, scale=None, sliding_window=None):
    """Materialized float64 scores with the bias -m_h (i - j) (causal) or -m_h |i - j|; empty rows give 0."""
    b, h, n_q, e = q.shape
    n_k = k.shape[2]
    slopes = torch.tensor(paper_slopes(h), dtype=torch.float64)
    i = q_offset + torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    distance = (i - j).double() if causal else (i - j).abs().double()
    scale = e**-0.5 if scale is None else scale
    scores = q.double() @ k.double().transpose(-1, -2) * scale - slopes[:, None, None] * distance
    allowed = (j <= i) if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    if sliding_window is not None:
        allowed = allowed & ((i - j).abs() < sliding_window)
    allowed = allowed[None, None].expand(b, h, n_q, n_k)
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    weights = torch.where(allowed.any(-1, keepdim=True), weights, 0.0)
    return weights @ v.double()


def qkv(b=2, h=4, n=11, e=8, seed=0, requires_grad=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, e, generator=gen, dtype=dtype).requires_grad_(requires_grad) for _ in "qkv"]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 24])
def test_slopes_are_the_papers(heads):
    assert alibi.alibi_slopes(heads) == pytest.approx(paper_slopes(heads), rel=1e-15)
    if heads & (heads - 1) == 0:  # 2^(-8h/H) for h = 1..H
        assert alibi.alibi_slopes(heads) == pytest.approx(
            [2 ** (-8 * h / heads) for h in range(1, heads + 1)]
        )


@pytest.mark.parametrize("heads", [4, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_match_the_reference(causal, heads):
    q, k, v = qkv(h=heads, requires_grad=True)
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[0, :3] = False  # causal rows 0..2 of sequence 0 have nothing to attend: zeros
    padding[1, 8:] = False
    kernel = build_kernel("alibi", heads, 8)
    out = kernel(q, k, v, causal=causal, key_padding_mask=padding, scale=0.3)
    expected = reference(q, k, v, causal=causal, padding=padding, scale=0.3)
    assert (out.double() - expected).abs().max() <= 1e-6
    if causal:
        assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    seen = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), seen)
    want = torch.autograd.grad(expected, (q, k, v), seen.double())
    for got, ref in zip(grads, want, strict=True):
        assert torch.isfinite(got).all() and (got.double() - ref).abs().max() <= 1e-5


def test_float64_is_computed_in_float64():
    q, k, v = qkv(dtype=torch.float64, requires_grad=True)
    kernel = build_kernel("alibi", 4, 8)
    out = kernel(q, k, v, causal=True)
    assert out.dtype == torch.float64
    assert (out - reference(q, k, v, causal=True)).abs().max() <= 1e-12
    small = build_kernel("alibi", 2, 8)
    inputs = tuple(t[:1, :2, :5].detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: small(q, k, v, causal=True), inputs)


def test_decoding_with_a_query_offset_is_the_full_pass():
    q, k, v = qkv()
    kernel = build_kernel("alibi", 4, 8)
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[0, :2] = False
    full = kernel(q, k, v, causal=True, key_padding_mask=padding)
    for first in (10, 7):
        rows = kernel(q[:, :, first:], k, v, causal=True, key_padding_mask=padding, q_offset=first)
        assert (rows - full[:, :, first:]).abs().max() <= 1e-6


def test_chunks_of_query_rows_change_nothing(monkeypatch):
    q, k, v = qkv()
    kernel = build_kernel("alibi", 4, 8)
    whole = kernel(q, k, v, causal=True)
    monkeypatch.setattr(alibi, "_CHUNK_ELEMENTS", 2 * 4 * 11 * 3)  # 3 query rows per chunk
    assert (kernel(q, k, v, causal=True) - whole).abs().max() <= 1e-6


def test_a_sliding_window_cuts_the_far_keys():
    q, k, v = qkv()
    kernel = build_kernel("alibi", 4, 8)
    out = kernel(q, k, v, causal=True, sliding_window=3)
    assert (out.double() - reference(q, k, v, causal=True, sliding_window=3)).abs().max() <= 1e-6


def test_options_are_refused():
    with pytest.raises(ValueError, match="accepted: none"):
        build_kernel("alibi", 4, 8, depth=2)


# --- inside a host model ----------------------------------------------------------------------------


def _llama(attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        hidden_size=32, num_key_value_heads=2, vocab_size=100, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None
    return model


def test_inside_a_host_it_is_the_host_with_an_alibi_mask():
    """The host's own eager attention, handed the ALiBi bias as an additive 4D mask, is the reference."""
    from toroidal.integrations.transformers import apply_mechanism

    model = _llama("eager")
    ids, mask = padded_batch()
    n = ids.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    slopes = torch.tensor(paper_slopes(4))
    allowed = (j <= i)[None, None] & mask.bool()[:, None, None, :]
    bias = (-slopes[:, None, None] * (i - j))[None].masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=bias).logits
        apply_mechanism(model, "alibi")
        out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (out - expected)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("padded", [True, False])
def test_generate_with_the_kv_cache_matches_full_recompute(padded):
    from toroidal.integrations.transformers import apply_mechanism

    model = apply_mechanism(_llama(), "alibi")
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    with torch.no_grad():
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        seq, worst = ids, 0.0
        for step_logits in gen.logits:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=mask, position_ids=positions).logits[:, -1]
            worst = max(worst, (logits - step_logits).abs().max().item())
            token = logits.argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(seq, gen.sequences)
    assert worst <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_validate_runs_its_own_check(dtype):
    from toroidal.validate.mechanisms import mechanism_suite
    from toroidal.validate.report import PASS

    results = [result for _, check in mechanism_suite("alibi", dtype=dtype) for result in check()]
    assert [r.name for r in results if r.status != PASS] == []
    assert {r.name for r in results} >= {
        "alibi: causal vs float64 bias",
        "alibi: bidirectional vs float64 bias",
    }

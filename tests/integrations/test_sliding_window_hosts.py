"""Hosts with sliding windows (Mistral, Gemma 3): the kernels obey the host's window where it bites.

The window is read off the host's mask (the nearest pair it cuts) and passed to the kernel as
`sliding_window`; full-attention layers stay global. With D=1, lambda=0 toroidal attention is
the host's own attention, and decoding through sliding-window caches (which drop the keys
before the window) computes what full recomputation computes.
"""

import pytest
import torch
from helpers import padded_batch

transformers = pytest.importorskip("transformers")

from toroidal import ToroidalConfig  # noqa: E402
from toroidal.integrations.transformers import (  # noqa: E402
    FUSION_ATTR,
    apply_mechanism,
    apply_toroidal,
    attention_modules,
    length_refusal,
    platter_order,
    plug_mechanism,
    remove_mechanism,
)
from toroidal.integrations.transformers.host import rotary_dim  # noqa: E402
from toroidal.mechanisms import build_kernel, mechanism_names  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 4
TOKENS = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=None)
HOSTS = {
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, sliding_window=WINDOW, **TOKENS,
    ),
    # Sliding and full layers mixed, heads * head_dim (64) != hidden_size (32), one key/value head.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_hidden_layers=3,
        intermediate_size=64, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **TOKENS,
    ),
}  # fmt: skip
SLIDING = {"mistral": {0: WINDOW, 1: WINDOW}, "gemma3": {0: WINDOW, 1: None, 2: WINDOW}}
PLAIN = ToroidalConfig(depth=1, lambda_distance=0.0, fusion="concat", rope="none")
TORUS = ToroidalConfig(depth=2, lambda_distance=0.5, window=3, period=8, rope="none")  # 6 + 6 tokens > P


def build(host, attn="sdpa", **overrides):
    config = HOSTS[host]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None
    return model


def run(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def kernel_windows(model) -> dict[int, list]:
    """The `sliding_window` each layer's kernel receives, per call (a hook, nothing replaced)."""
    seen: dict[int, list] = {}
    for layer, module in attention_modules(model).items():
        state = getattr(module, "mechanism", None)
        if state is not None:
            record = seen.setdefault(layer, [])
            state.kernel.register_forward_pre_hook(
                lambda _, args, kwargs, record=record: record.append(kwargs.get("sliding_window")),
                with_kwargs=True,
            )
    return seen


def perturb_fusion(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for module in attention_modules(model).values():
            for param in getattr(module, FUSION_ATTR).parameters():
                param.normal_(0.0, 0.5)


def generate(model, ids, mask, cache="dynamic"):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True, cache_implementation=cache,
        )  # fmt: skip


def prompt():
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


# --- parity with the host ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_plain_torus_equals_the_host_where_the_window_bites(host, attn):
    model = build(host, attn)
    ids, mask = padded_batch(n=10)  # 10 positions, a window of 4
    expected, expected_unpadded = run(model, ids, mask), run(model, ids)
    unwindowed = run(build(host, attn, sliding_window=None if host == "mistral" else 64), ids, mask)
    assert (unwindowed - expected)[mask.bool()].abs().max() > 1e-3  # the window matters here
    apply_toroidal(model, PLAIN)
    windows = kernel_windows(model)
    assert (run(model, ids, mask) - expected)[mask.bool()].abs().max() <= 1e-5
    assert (run(model, ids) - expected_unpadded).abs().max() <= 1e-5
    assert windows == {layer: [w, w] for layer, w in SLIDING[host].items()}  # full layers stay global


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_through_sliding_caches_matches_full_recompute(host, cache):
    ids, mask = prompt()
    model = build(host)
    expected = generate(model, ids, mask, cache)
    apply_toroidal(model, PLAIN)
    plain = generate(model, ids, mask, cache)
    assert torch.equal(plain.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(plain.logits, expected.logits, strict=True)) <= 1e-4

    remove_mechanism(model)
    apply_toroidal(model, TORUS)
    perturb_fusion(model)
    windows = kernel_windows(model)
    gen = generate(model, ids, mask, cache)
    seq, worst = ids, 0.0
    for step_logits in gen.logits:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
        logits = run(model, seq, mask, position_ids=positions)[:, -1]
        worst = max(worst, (logits - step_logits).abs().max().item())
        token = logits.argmax(-1, keepdim=True)
        seq, mask = torch.cat([seq, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(seq, gen.sequences)
    assert worst <= 1e-4
    assert WINDOW in windows[0]  # the prefill's window bit in the sliding layers


# --- every mechanism ------------------------------------------------------------------------------------

KERNEL_OPTIONS = {"tiled": {"tile_size": 4, "budget": 1, "local_tiles": 0}, "fft": {"buckets": 4}}


def qkv(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, n, 8, generator=gen) for _ in "qkv"]


@pytest.mark.parametrize("name", [n for n in mechanism_names() if n != "adaptive"])
def test_every_kernel_obeys_the_window(name):
    """Row i never reads a key at i - j >= W; keys inside the window still count."""
    pytest.importorskip("geoopt") if name == "hyperbolic" else None
    kernel = build_kernel(name, 2, 8, **KERNEL_OPTIONS.get(name, {}))
    q, k, v = qkv()
    far_k, far_v = k.clone(), v.clone()
    far_k[:, :, :6], far_v[:, :, :6] = (
        torch.randn(2, 2, 6, 8),
        torch.randn(2, 2, 6, 8),
    )  # i - j >= 4 for i >= 9
    with torch.no_grad():
        out = kernel(q, k, v, causal=True, sliding_window=WINDOW)
        far = kernel(q, far_k, far_v, causal=True, sliding_window=WINDOW)
        assert (far[:, :, 9:] - out[:, :, 9:]).abs().max() <= 1e-6  # fft: roundoff only
        assert (kernel(q, far_k, far_v, causal=True)[:, :, 9:] - out[:, :, 9:]).abs().max() > 1e-3
        if name != "tiled":  # shift-invariant: a sliding cache's keys, counted from the first one kept
            last = kernel(
                q[:, :, 11:], k[:, :, 8:], v[:, :, 8:], causal=True, q_offset=3, sliding_window=WINDOW
            )
            assert (last - out[:, :, 11:]).abs().max() <= 1e-5


def test_mechanisms_in_a_sliding_host():
    ids, mask = padded_batch(n=10)
    real = mask.bool()
    model = build("gemma3")
    expected = run(model, ids, mask)
    plug_mechanism(model, "standard")
    assert (run(model, ids, mask) - expected)[real].abs().max() <= 1e-5
    remove_mechanism(model)

    # tiled with every tile exact is toroidal attention, window and all.
    torus = dict(depth=2, lambda_distance=0.5, window=3, period=8)
    apply_mechanism(model, "toroidal", torus)
    toroidal = run(model, ids, mask)
    remove_mechanism(model)
    apply_mechanism(model, "tiled", {**torus, "budget": None, "tile_size": 4})
    assert (run(model, ids, mask) - toroidal)[real].abs().max() <= 1e-5
    remove_mechanism(model)

    apply_mechanism(model, "adaptive", layers=[1])  # the full-attention layer: no window
    assert torch.isfinite(run(model, ids, mask)[real]).all()
    remove_mechanism(model)
    apply_mechanism(model, "adaptive", layers=[0])
    run(model, ids[:, :WINDOW], mask[:, :WINDOW])  # the window does not bite yet
    with pytest.raises(ValueError, match="sliding window"):
        run(model, ids, mask)


# --- what is refused, and the rotary layout --------------------------------------------------------------


def test_a_mask_that_is_neither_rule_is_refused():
    model = build("mistral")
    ids, mask = padded_batch(n=10)
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[6, 2] = False  # a hole inside the window: no sliding window cuts that
    apply_toroidal(model, PLAIN)
    with pytest.raises(
        ValueError, match="not causal attention with padding, alone or cut by a sliding window"
    ):
        run(model, ids, allowed[None, None].expand(3, 1, n, n))


def test_gemma3_rotary_pairs_stay_whole_in_each_platter():
    model = build("gemma3")
    assert rotary_dim(model) == 16  # `sliding_attention_inv_freq` and `full_attention_inv_freq`
    apply_toroidal(model, TORUS)
    assert attention_modules(model)[0].mechanism.order == platter_order(16, 2, 16)


def test_a_host_that_caps_its_scores_is_refused():
    config = transformers.Gemma2Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_hidden_layers=2,
        intermediate_size=64, sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
        **TOKENS,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    apply_toroidal(model, PLAIN)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="caps its attention scores"):
        run(model, ids, mask)


def test_a_kernel_that_cannot_keep_the_window_is_refused_before_it_runs():
    model = build("mistral")
    apply_mechanism(model, "adaptive", layers=[0])
    assert length_refusal(model, WINDOW) is None  # the window does not bite yet
    reason = length_refusal(model, WINDOW + 1)
    assert "layer 0 runs adaptive" in reason and f"({WINDOW} keys)" in reason
    remove_mechanism(model)
    apply_mechanism(model, "alibi", layers=[0])
    assert length_refusal(model, 4 * WINDOW) is None


def test_train_refuses_adaptive_where_the_host_window_bites_in_one_line(tmp_path):
    from helpers import assert_one_line_error
    from typer.testing import CliRunner

    from toroidal_cli.app import app

    preset = tmp_path / "windowed.yaml"
    preset.write_text(
        "family: mistral\nhidden_size: 32\nnum_hidden_layers: 1\nnum_attention_heads: 2\n"
        "num_key_value_heads: 1\nintermediate_size: 64\nmax_position_embeddings: 64\nsliding_window: 8\n"
    )
    args = ["train", "--model", str(preset), "--mechanism", "adaptive", "--tokenizer", "bytes"]
    args += ["--seq-len", "16", "--batch-size", "2", "--steps", "1", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert_one_line_error(result, "layer 0 runs adaptive", "sliding window (8 keys)")
    assert not (tmp_path / "run" / "model").exists()

"""Toroidal attention inside transformers models: parity, decoding, layer choice, persistence."""

import sys

import pytest
import torch
from helpers import padded_batch

transformers = pytest.importorskip("transformers")

from toroidal import ToroidalConfig  # noqa: E402
from toroidal.integrations.transformers import (  # noqa: E402
    FUSION_ATTR,
    apply_toroidal,
    attention_modules,
    load_toroidal_weights,
    platter_order,
    remove_toroidal,
    toroidal_layers,
)

transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # Grouped-query attention (2 key/value heads for 4 query heads) where the family has it.
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **SMALL, **TOKENS),
    "mistral": lambda: transformers.MistralConfig(hidden_size=32, num_key_value_heads=2, **SMALL, **TOKENS),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, num_key_value_heads=2, **SMALL, **TOKENS),
    # Phi-2 layout: partial rotary (8 of 16 dims), biases.
    "phi": lambda: transformers.PhiConfig(hidden_size=64, **SMALL, **TOKENS),
    "phi3": lambda: transformers.Phi3Config(hidden_size=32, num_key_value_heads=2, **SMALL, **TOKENS),
    # Rotary on 4 of 16 dims.
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, **SMALL, **TOKENS),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS
    ),
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, max_position_embeddings=64, **SMALL, pad_token_id=0
    ),
}
PLAIN = ToroidalConfig(depth=1, lambda_distance=0.0, fusion="concat", rope="none")
TORUS = ToroidalConfig(depth=2, lambda_distance=0.5, window=3, period=8, fusion="low_rank", rope="none")


def build(family="llama", attn="sdpa", seed=0, **overrides):
    config = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation=attn).eval()


def run(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw)[0]


def perturb_fusion(model, std=0.5):
    """Give the fusion a non-trivial platter mix (it starts as plain concatenation)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for module in attention_modules(model).values():
            if hasattr(module, FUSION_ATTR):
                for param in getattr(module, FUSION_ATTR).parameters():
                    param.normal_(0.0, std)


@pytest.fixture
def toroidal_calls(monkeypatch):
    """Layer index of every toroidal kernel call (proves the torus ran, not the fallback)."""
    from toroidal.integrations.transformers import attach

    calls = []
    original = attach.run_layer

    def spy(module, *args, **kwargs):
        state = attach.layer_state(module)
        assert state.name == "toroidal"
        calls.append(state.layer)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(attach, "run_layer", spy)
    return calls


# --- parity with the host -----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_torus_equals_host_sdpa_on_padded_batches(family, toroidal_calls):
    model = build(family)
    ids, mask = padded_batch()
    host, host_unpadded = run(model, ids, mask), run(model, ids)
    apply_toroidal(model, PLAIN)
    assert model.config._attn_implementation == "toroidal+sdpa"
    assert toroidal_layers(model) == [0, 1]
    out = run(model, ids, mask)
    real = mask.bool()  # outputs at padded positions are never used
    assert (out - host)[real].abs().max() <= 1e-5
    assert (run(model, ids) - host_unpadded).abs().max() <= 1e-5
    assert toroidal_calls == [0, 1, 0, 1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_plain_torus_equals_host_eager(family, toroidal_calls):
    # Eager hands over additive float masks, SDPA boolean ones (or none).
    model = build(family, attn="eager")
    ids, mask = padded_batch()
    host = run(model, ids, mask)
    apply_toroidal(model, PLAIN)
    assert model.config._attn_implementation == "toroidal+eager"
    assert (run(model, ids, mask) - host)[mask.bool()].abs().max() <= 1e-5
    assert toroidal_calls == [0, 1]


def test_caller_given_4d_mask_is_read_back(toroidal_calls):
    model = build("llama")
    ids, mask = padded_batch()
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask4d = (causal[None] & mask.bool()[:, None, :])[:, None]
    host = run(model, ids, mask4d)
    apply_toroidal(model, PLAIN)
    assert (run(model, ids, mask4d) - host)[mask.bool()].abs().max() <= 1e-5
    assert toroidal_calls == [0, 1]


# --- platters and rotary pairs ------------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "depth", "rotary_dim"), [(8, 2, 8), (16, 2, 8), (16, 2, 4), (32, 4, 32)]
)
def test_platter_order_gives_whole_pairs(head_dim, depth, rotary_dim):
    order = platter_order(head_dim, depth, rotary_dim)
    assert sorted(order) == list(range(head_dim))
    half, width = rotary_dim // 2, head_dim // depth
    for k in range(depth):
        platter = set(order[k * width : (k + 1) * width])
        for dim in platter:
            if dim < half:
                assert dim + half in platter
            elif dim < rotary_dim:
                assert dim - half in platter


def test_platter_order_identity_without_rotary_or_depth():
    assert platter_order(8, 2, 0) is None
    assert platter_order(8, 1, 8) is None


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_platter_scores_depend_on_relative_position_only(family):
    model = build(family)
    attn = attention_modules(model)[0]
    apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    head_dim, depth = attn.head_dim, 2
    rotary_dim = 2 * model.model.rotary_emb.inv_freq.numel()
    order = torch.tensor(platter_order(head_dim, depth, rotary_dim))
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, head_dim)

    def rotate(x, cos, sin):  # as the attention module does: Phi rotates only the first dims
        rotated = apply_rope(x[..., :rotary_dim], x[..., :rotary_dim], cos, sin)[0]
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)

    def platter_scores(i, j, permute=True):
        cos, sin = model.model.rotary_emb(q, torch.tensor([[i, j]]))
        qi, kj = rotate(q, cos[:, :1], sin[:, :1]), rotate(k, cos[:, 1:], sin[:, 1:])
        if permute:
            qi, kj = qi[..., order], kj[..., order]
        return (qi * kj).reshape(depth, -1).sum(-1)

    assert torch.allclose(platter_scores(3, 1), platter_scores(11, 9), atol=1e-5)
    if family == "llama":  # contiguous slices split pairs: the same check fails
        assert not torch.allclose(platter_scores(3, 1, False), platter_scores(11, 9, False), atol=1e-3)


# --- decoding with a KV cache --------------------------------------------------------


@pytest.mark.parametrize(("cache", "padded"), [("dynamic", True), ("dynamic", False), ("static", True)])
def test_generate_with_cache_matches_full_recompute(cache, padded):
    model = build("llama", eos_token_id=None)
    model.generation_config.eos_token_id = None
    apply_toroidal(model, TORUS)  # prompt 5 + 8 new tokens > P = 8: the ring wraps
    perturb_fusion(model)
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(ids)
    if padded:  # without padding SDPA gets no mask at all: the other path to the kernel
        mask[0, :2] = 0
    with torch.no_grad():
        gen = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            cache_implementation=cache,
        )
    seq, worst = ids, 0.0
    for step_logits in gen.logits:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
        logits = run(model, seq, mask, position_ids=positions)[:, -1]
        worst = max(worst, (logits - step_logits).abs().max().item())
        token = logits.argmax(-1, keepdim=True)
        seq, mask = torch.cat([seq, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(seq, gen.sequences)
    assert worst <= 1e-4


# --- choosing layers, removing ------------------------------------------------------


def test_only_chosen_layers_run_toroidal(toroidal_calls):
    model = build("qwen2")
    ids, mask = padded_batch()
    with torch.no_grad():
        host = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        apply_toroidal(model, TORUS, layers=[1])
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert toroidal_calls == [1]
    assert toroidal_layers(model) == [1]
    assert torch.equal(out[1], host[1])  # layer 0 kept the host's attention exactly
    assert (out[2] - host[2])[mask.bool()].abs().max() > 1e-3  # layer 1 now sees the torus


def test_remove_restores_the_model_exactly():
    model = build("phi")
    ids, mask = padded_batch()
    host, n_params = run(model, ids, mask), len(list(model.parameters()))
    apply_toroidal(model, TORUS)
    assert len(list(model.parameters())) > n_params
    assert (run(model, ids, mask) - host).abs().max() > 1e-3
    remove_toroidal(model)
    assert model.config._attn_implementation == "sdpa"
    assert len(list(model.parameters())) == n_params
    assert not any(FUSION_ATTR in key for key in model.state_dict())
    assert all(not hasattr(m, "mechanism") for m in attention_modules(model).values())
    assert torch.equal(run(model, ids, mask), host)


# --- depth fusion -------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["low_rank", "attention"])
def test_learned_fusion_starts_as_concat(fusion):
    ids, mask = padded_batch()
    outputs = []
    for mode in ("concat", fusion):
        model = build("mistral")
        apply_toroidal(model, ToroidalConfig(depth=2, lambda_distance=0.5, fusion=mode, rope="none"))
        outputs.append(run(model, ids, mask))
    assert (outputs[0] - outputs[1])[mask.bool()].abs().max() <= 1e-6


def test_fusion_parameters_train():
    model = build("llama")
    apply_toroidal(model, TORUS)
    names = [name for name, _ in model.named_parameters() if FUSION_ATTR in name]
    assert len(names) == 4  # u and v in both layers
    assert "model.layers.0.self_attn.toroidal_fusion.u" in names  # the saved weight names of 0.1 runs
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    fusion = getattr(attention_modules(model)[0], FUSION_ATTR)
    assert fusion.v.grad is not None and fusion.v.grad.abs().sum() > 0


def test_save_and_reload_fusion_parameters(tmp_path):
    model = build("gpt_neox")
    apply_toroidal(model, TORUS, layers=[0])
    perturb_fusion(model)
    ids, mask = padded_batch()
    expected = run(model, ids, mask)
    model.save_pretrained(tmp_path)

    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    apply_toroidal(fresh, TORUS, layers=[0])
    assert (run(fresh, ids, mask) - expected).abs().max() > 1e-4  # fusion weights not loaded yet
    load_toroidal_weights(fresh, tmp_path)
    assert torch.equal(run(fresh, ids, mask), expected)

    other = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    apply_toroidal(other, TORUS, layers=[1])
    with pytest.raises(ValueError, match="fusion parameters do not match"):
        load_toroidal_weights(other, tmp_path)


# --- errors -------------------------------------------------------------------------


def test_depth_that_splits_rotary_pairs_is_refused():
    model = build("phi")  # head_dim 16: 4 rotary pairs, 8 pass-through dims
    with pytest.raises(ValueError, match="whole rotary pairs"):
        apply_toroidal(model, ToroidalConfig(depth=8, rope="none"))
    with pytest.raises(ValueError, match="whole rotary pairs"):
        apply_toroidal(build("llama"), ToroidalConfig(depth=16, rope="none"))
    assert model.config._attn_implementation == "sdpa"  # nothing changed


@pytest.mark.parametrize("layers", [[2], [-1], ["0"], [], [True]])
def test_bad_layer_indices_are_refused(layers):
    model = build("llama")
    with pytest.raises(ValueError, match="layer"):
        apply_toroidal(model, PLAIN, layers=layers)
    assert model.config._attn_implementation == "sdpa"


def test_config_and_state_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="rope='none'"):
        apply_toroidal(model, ToroidalConfig(depth=2))
    with pytest.raises(ValueError, match="not applied"):
        remove_toroidal(model)
    apply_toroidal(model, PLAIN)
    with pytest.raises(ValueError, match="already applied"):
        apply_toroidal(model, PLAIN)


def test_host_sliding_window_that_bites_is_obeyed():  # more in test_sliding_window_hosts.py
    model = build("mistral", sliding_window=3)
    ids, mask = padded_batch()
    host = run(model, ids, mask)
    apply_toroidal(model, PLAIN)
    assert (run(model, ids, mask) - host)[mask.bool()].abs().max() <= 1e-5

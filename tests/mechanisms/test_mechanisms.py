"""Mechanisms inside transformers models: apply_mechanism, remove_mechanism, the plugged kernel path.

The plumbing of the generic path is checked with kernels whose answer is known: `standard`
(plain SDPA) must reproduce the host's own attention, on padded batches and while decoding
with the KV cache. `gated` is a test-only mechanism (standard attention times a learned
per-head gain, counting its calls) for weights, metrics and layer choice; it is registered
per test and removed after it.
"""

import pytest
import torch
from helpers import padded_batch
from torch import nn

transformers = pytest.importorskip("transformers")

from toroidal import ToroidalAttention, ToroidalConfig  # noqa: E402
from toroidal.integrations.transformers import (  # noqa: E402
    KERNEL_ATTR,
    applied_mechanism,
    apply_mechanism,
    apply_toroidal,
    attention_modules,
    load_mechanism_weights,
    mechanism_layers,
    mechanism_metrics,
    platter_order,
    plug_mechanism,
    remove_mechanism,
    reset_mechanism_metrics,
    summarize_metrics,
)
from toroidal.mechanisms import (  # noqa: E402
    KernelModule,
    Mechanism,
    build_attention,
    mechanism_names,
    registry,  # noqa: E402
)
from toroidal.mechanisms.builtin import StandardKernel  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **SMALL, **TOKENS),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, **TOKENS),
}
TORUS = ToroidalConfig(depth=2, lambda_distance=0.5, window=3, period=8, rope="none")


def build(family="llama", attn="sdpa", seed=0, **overrides):
    config = FAMILIES[family]() if family in FAMILIES else transformers.MistralConfig(
        hidden_size=32, num_key_value_heads=2, **SMALL, **TOKENS
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None
    return model


def run(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


class GatedKernel(KernelModule):
    """Standard attention times a learned per-head gain (`gain` at start), counting calls and queries.

    `depth` > 1 gives it a `config.depth`, which makes the integration lay out platters.
    """

    def __init__(self, heads, head_dim, gain=1.0, depth=1):
        super().__init__()
        self.inner = StandardKernel(heads, head_dim)
        self.gain = nn.Parameter(torch.full((heads, 1, 1), float(gain)))
        self.config = ToroidalConfig(d_model=heads * head_dim, n_heads=heads, depth=depth, rope="none")
        self.reset_metrics()

    def forward(self, q, k, v, **kwargs):
        self.calls, self.queries = self.calls + 1, self.queries + q.shape[-2]
        return self.inner(q, k, v, **kwargs) * self.gain

    def get_metrics(self):
        return {"calls": self.calls, "queries": self.queries, "kind": "gated"}

    def reset_metrics(self):
        self.calls = self.queries = 0


@pytest.fixture
def gated(monkeypatch):
    mechanism = Mechanism("gated", "test: standard times a learned gain", GatedKernel, ("gain", "depth"))
    monkeypatch.setitem(registry._REGISTRY, "gated", mechanism)
    return "gated"


@pytest.fixture
def kernel_calls(monkeypatch):
    """(layer, query length) of every plugged kernel call: proves the kernel ran, not the fallback."""
    from toroidal.integrations.transformers import attach

    calls = []
    original = attach.run_layer

    def spy(module, query, *args, **kwargs):
        calls.append((attach.layer_state(module).layer, query.shape[2]))
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(attach, "run_layer", spy)
    return calls


# --- standard and toroidal ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standard_is_the_untouched_model(family):
    model = build(family)
    ids, mask = padded_batch()
    host, n_params = run(model, ids, mask), len(list(model.parameters()))
    assert apply_mechanism(model, "standard") is model
    assert model.config._attn_implementation == "sdpa" and applied_mechanism(model) == "standard"
    assert len(list(model.parameters())) == n_params and mechanism_layers(model) == []
    assert torch.equal(run(model, ids, mask), host)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_toroidal_is_apply_toroidal(family):
    ids, mask = padded_batch()
    reference = apply_toroidal(build(family), TORUS, layers=[1])
    fields = dict(depth=2, lambda_distance=0.5, window=3, period=8)
    for config in (TORUS, fields):
        model = apply_mechanism(build(family), "toroidal", config, layers=[1])
        assert model.config._attn_implementation == "toroidal+sdpa"
        assert applied_mechanism(model) == "toroidal" and mechanism_layers(model) == [1]
        assert torch.equal(run(model, ids, mask), run(reference, ids, mask))


def test_toroidal_defaults_suit_kernel_mode():
    model = apply_mechanism(build("gpt2"), "toroidal")
    state = attention_modules(model)[0].mechanism
    assert state.name == "toroidal" and state.kernel.config.max_len == model.config.n_positions
    remove_mechanism(model)
    assert model.config._attn_implementation == "sdpa"


# --- the plugged kernel path -------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plugged_standard_kernel_equals_the_host_on_padded_batches(family, attn, kernel_calls):
    model = build(family, attn=attn)
    ids, mask = padded_batch()
    host, host_unpadded = run(model, ids, mask), run(model, ids)
    plug_mechanism(model, "standard")
    assert model.config._attn_implementation == f"standard+{attn}"
    assert mechanism_layers(model) == [0, 1]
    real = mask.bool()  # outputs at padded positions are never used
    assert (run(model, ids, mask) - host)[real].abs().max() <= 1e-5
    assert (run(model, ids) - host_unpadded).abs().max() <= 1e-5  # SDPA hands over no mask at all
    assert kernel_calls == [(0, 7), (1, 7)] * 2


def test_platter_kernels_get_whole_rotary_pairs(gated):
    # q and k are permuted alike, which leaves standard attention (what `gated` computes) unchanged.
    model = build("llama")
    ids, mask = padded_batch()
    host = run(model, ids, mask)
    apply_mechanism(model, gated, {"depth": 2})
    state = attention_modules(model)[0].mechanism
    assert state.order == platter_order(8, 2, 8) and state.order != list(range(8))
    assert (run(model, ids, mask) - host)[mask.bool()].abs().max() <= 1e-5
    assert attention_modules(apply_mechanism(build("gpt2"), gated, {"depth": 2}))[0].mechanism.order is None


@pytest.mark.parametrize(("cache", "padded"), [("dynamic", True), ("dynamic", False), ("static", True)])
def test_plugged_kernel_decodes_with_the_kv_cache(cache, padded, kernel_calls):
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    settings = dict(
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        cache_implementation=cache,
    )
    model = build("llama")
    with torch.no_grad():
        host = model.generate(ids, **settings)
        plug_mechanism(model, "standard")
        plugged = model.generate(ids, **settings)
    assert torch.equal(plugged.sequences, host.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(plugged.logits, host.logits, strict=True))
    assert worst <= 1e-4
    assert (0, 1) in kernel_calls  # one query at a time against the cache


def test_only_the_chosen_layers_run_the_kernel(gated, kernel_calls):
    model = build("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        host = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        apply_mechanism(model, gated, {"gain": 2.0}, layers=[1])
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert kernel_calls == [(1, 7)] and mechanism_layers(model) == [1]
    assert torch.equal(out[1], host[1])  # layer 0 kept the host's attention exactly
    assert (out[2] - host[2])[mask.bool()].abs().max() > 1e-3


def test_remove_restores_the_model_exactly(gated):
    model = build("gpt2")
    ids, mask = padded_batch()
    host, n_params = run(model, ids, mask), len(list(model.parameters()))
    apply_mechanism(model, gated, {"gain": 2.0})
    assert applied_mechanism(model) == gated and len(list(model.parameters())) == n_params + 2
    assert (run(model, ids, mask) - host).abs().max() > 1e-3
    assert remove_mechanism(model) is model
    assert model.config._attn_implementation == "sdpa"
    assert len(list(model.parameters())) == n_params
    assert not any(KERNEL_ATTR in key for key in model.state_dict())
    assert all(not hasattr(m, "mechanism") for m in attention_modules(model).values())
    assert torch.equal(run(model, ids, mask), host)
    remove_mechanism(model)  # nothing applied: nothing to do
    assert torch.equal(run(model, ids, mask), host)


def test_applying_standard_removes_a_mechanism(gated):
    model = build("llama")
    ids, mask = padded_batch()
    host = run(model, ids, mask)
    for name, config in ((gated, {"gain": 3.0}), ("toroidal", TORUS)):
        apply_mechanism(model, name, config)
        apply_mechanism(model, "standard")
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(run(model, ids, mask), host)


def test_kernel_weights_train_and_reload(gated, tmp_path):
    model = build("llama")
    apply_mechanism(model, gated, layers=[0, 1])
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    gain = getattr(attention_modules(model)[0], KERNEL_ATTR).gain
    assert gain.grad is not None and gain.grad.abs().sum() > 0
    with torch.no_grad():
        for module in attention_modules(model).values():
            getattr(module, KERNEL_ATTR).gain.uniform_(0.5, 2.0)
    expected = run(model, ids, mask)
    model.save_pretrained(tmp_path)

    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    apply_mechanism(fresh, gated)
    assert (run(fresh, ids, mask) - expected).abs().max() > 1e-4  # kernel weights not loaded yet
    load_mechanism_weights(fresh, tmp_path)
    assert torch.equal(run(fresh, ids, mask), expected)

    other = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    apply_mechanism(other, gated, layers=[1])
    with pytest.raises(ValueError, match="mechanism kernel parameters do not match"):
        load_mechanism_weights(other, tmp_path)


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_per_layer_and_their_mean(gated):
    model = apply_mechanism(build("llama"), gated)
    ids, mask = padded_batch()
    run(model, ids, mask)
    run(model, ids[:, :4], mask[:, :4])
    per_layer = mechanism_metrics(model)
    assert per_layer == {layer: {"calls": 2, "queries": 11, "kind": "gated"} for layer in (0, 1)}
    assert summarize_metrics(per_layer) == {"calls": 2.0, "queries": 11.0}  # non-numbers left out
    reset_mechanism_metrics(model)
    assert mechanism_metrics(model)[1]["calls"] == 0
    assert mechanism_metrics(apply_mechanism(build("gpt2"), "toroidal")) == {}


def test_summarize_metrics_keeps_shared_numbers_only():
    per_layer = {0: {"a": 1, "b": 2.0, "flag": True, "c": 5}, 1: {"a": 3, "b": 4.0, "flag": False}}
    assert summarize_metrics(per_layer) == {"a": 2.0, "b": 3.0}
    assert summarize_metrics({}) == {}


@pytest.mark.parametrize("name", mechanism_names())
def test_every_attention_module_exposes_its_metrics(name):
    layer = build_attention(name, 32, 4, causal=True)
    out = layer(torch.randn(2, 8, 32), attention_mask=torch.ones(2, 8))
    assert out.shape == (2, 8, 32) and torch.isfinite(out).all()
    assert isinstance(layer.get_metrics(), dict)
    layer.reset_metrics()
    assert ToroidalAttention(ToroidalConfig(d_model=32, n_heads=4, depth=2)).get_metrics() == {}


@pytest.mark.parametrize("name", [n for n in mechanism_names() if n != "standard"])
def test_every_registered_mechanism_runs_inside_a_host_model(name):
    model = build("llama")
    ids, mask = padded_batch()
    host = run(model, ids, mask)
    apply_mechanism(model, name, layers=[1])
    assert applied_mechanism(model) == name and mechanism_layers(model) == [1]
    assert torch.isfinite(run(model, ids, mask)[mask.bool()]).all()
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, 10)
    remove_mechanism(model)
    assert torch.equal(run(model, ids, mask), host)


# --- errors ------------------------------------------------------------------------------------------


def test_errors_leave_the_model_as_it_was(gated):
    model = build("llama")
    with pytest.raises(ValueError, match="unknown mechanism"):
        apply_mechanism(model, "no-such-mechanism")
    with pytest.raises(ValueError, match="unknown option"):
        apply_mechanism(model, gated, {"tile": 3})
    with pytest.raises(ValueError, match="unknown option"):
        apply_mechanism(model, "toroidal", {"depht": 2})
    with pytest.raises(ValueError, match="takes no options"):
        apply_mechanism(model, "standard", {"gain": 1.0})
    with pytest.raises(ValueError, match="layer"):
        apply_mechanism(model, gated, layers=[5])
    with pytest.raises(TypeError, match="dict"):
        apply_mechanism(model, gated, ToroidalConfig())
    with pytest.raises(ValueError, match="apply_toroidal"):
        plug_mechanism(model, "toroidal")
    assert model.config._attn_implementation == "sdpa" and applied_mechanism(model) == "standard"
    assert all(not hasattr(m, KERNEL_ATTR) for m in attention_modules(model).values())
    apply_mechanism(model, gated)
    for name in (gated, "toroidal"):
        with pytest.raises(ValueError, match="already applied"):
            apply_mechanism(model, name)


def test_host_sliding_window_that_bites_is_obeyed():  # more in tests/integrations
    model = build("mistral", sliding_window=3)
    ids, mask = padded_batch()
    host = run(model, ids, mask)
    plug_mechanism(model, "standard")
    assert (run(model, ids, mask) - host)[mask.bool()].abs().max() <= 1e-5

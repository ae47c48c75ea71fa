"""torch.compile(fullgraph=True) on the CPU: a ToroidalAttention and a tiny Hugging Face Llama with
toroidal layers trace without a graph break and match eager mode, forward and backward.

Marked `compile`: each first compile takes ~5-30 s here (deselect with `-m "not compile"`).
"""

import pytest
import torch

from toroidal import ToroidalAttention, ToroidalConfig
from toroidal.functional import plan_call
from toroidal.kernels import get_backend

pytestmark = pytest.mark.compile

q0 = torch.zeros(1, 1, 4, 4)
NATIVE_REASON = get_backend("native").unavailable_reason(plan_call(q0, q0, q0, depth=2).request)
needs_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native unavailable: {NATIVE_REASON}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _forward_and_backward(model, call):
    """Outputs without gradients, then outputs and parameter gradients of a training step."""
    with torch.no_grad():
        inference = call(model)
    model.zero_grad(set_to_none=True)
    out = call(model)
    out.pow(2).mean().backward()
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone()  # a compiled module's names carry a prefix
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    return inference, out.detach(), grads


def _check_compiled_matches_eager(model, call, backend="inductor"):
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    got, want = _forward_and_backward(compiled, call), _forward_and_backward(model, call)
    for a, b in zip(got[:2], want[:2], strict=True):
        _close(a, b)
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:
        _close(got[2][name], want[2][name])


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("native", marks=needs_native)])
def test_compiled_toroidal_attention_matches_eager(backend):
    torch.manual_seed(0)
    module = ToroidalAttention(
        d_model=32,
        n_heads=4,
        depth=2,
        lambda_distance=0.1,
        max_len=64,
        causal=True,
        window=5,
        backend=backend,
    )
    x = torch.randn(2, 16, 32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, :3] = False  # left padding: causal rows with nothing to see (the zero-row fix, traced)
    _check_compiled_matches_eager(module, lambda m: m(x, attention_mask=mask)[0])


@needs_native
def test_compiled_tiny_llama_matches_eager_with_auto():
    # `auto` is decided while tracing, as in eager: native for this small inference call, sdpa
    # for its training step (both chosen inside one fullgraph compile per grad mode). aot_eager
    # traces exactly what inductor gets (dynamo and AOTAutograd, our ops by their fake kernels)
    # at a third of the cost; the module tests above run inductor on the same kernels.
    transformers = pytest.importorskip("transformers")
    from toroidal.integrations.transformers import apply_toroidal

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    apply_toroidal(
        model, ToroidalConfig(depth=2, lambda_distance=0.1, rope="none", backend="auto"), layers=None
    )
    ids = torch.randint(0, 64, (2, 16))
    _check_compiled_matches_eager(model, lambda m: m(input_ids=ids).logits, backend="aot_eager")

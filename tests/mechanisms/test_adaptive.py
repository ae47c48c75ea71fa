"""Adaptive depth (`toroidal.mechanisms.adaptive`): equals the toroidal kernel at full depth, really
skips platters at inference, trains its gate, measures what it saves, and runs in `toroidal bench`."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

import toroidal.mechanisms.adaptive as adaptive
from toroidal.mechanisms import build_attention, build_kernel, get_mechanism
from toroidal.mechanisms.adaptive import AdaptiveDepthKernel, adaptive_metrics, auxiliary_loss
from toroidal_cli.app import app
from toroidal_cli.results import read_result

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, N, E = 2, 4, 24, 16  # head dim 16: platter width 4 at depth 4


def inputs(n_q: int = N, n_k: int = N, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, E, generator=generator)
    k, v = (torch.randn(B, H, n_k, E, generator=generator) for _ in range(2))
    return q, k, v


def kernel(**options) -> AdaptiveDepthKernel:
    return build_kernel("adaptive", H, E, **{"depth": 4, "lambda_distance": 0.3, "max_len": 32, **options})


def mixed_gate(module: AdaptiveDepthKernel, seed: int = 1) -> AdaptiveDepthKernel:
    """Large random gate weights: different (sequence, head, block)s choose different depths."""
    with torch.no_grad():
        module.gate_weight.copy_(
            torch.randn(module.gate_weight.shape, generator=torch.Generator().manual_seed(seed))
        )
        module.gate_weight.mul_(40.0)
    return module


def recorded_calls(monkeypatch) -> list[tuple[int, tuple]]:
    """Patch the kernel's toroidal_attention to record (depth, q shape) of every call."""
    calls = []
    original = adaptive.toroidal_attention

    def recording(q, k, v, **kwargs):
        calls.append((kwargs["depth"], tuple(q.shape)))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(adaptive, "toroidal_attention", recording)
    return calls


# --- the same function as the toroidal kernel at full depth ---------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "options", [{"min_depth": 4}, {"min_depth": 2, "block": 5}, {"min_depth": 1, "window": 3}]
)
def test_full_depth_equals_the_toroidal_kernel(causal, options):
    """min_depth == depth, or a gate that picks the full depth: ToroidalKernel's output, in both paths."""
    torus = {"depth": 4, "lambda_distance": 0.3, "max_len": 32, "window": options.get("window")}
    reference = build_kernel("toroidal", H, E, **torus)
    with torch.no_grad():
        reference.fusion.v.normal_()  # a fusion that mixes platters, shared by both
    module = kernel(**options)
    module.fusion.load_state_dict(reference.fusion.state_dict())
    q, k, v = inputs()
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[0, :5] = False
    expected = reference(q, k, v, causal=causal, key_padding_mask=padding)
    with torch.no_grad():
        skipped = module(q, k, v, causal=causal, key_padding_mask=padding)
    trained = module(q, k, v, causal=causal, key_padding_mask=padding)
    torch.testing.assert_close(skipped, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=0)


def test_straight_through_forward_is_the_hard_choice():
    """Training computes every depth, but its forward value is what inference computes."""
    module = mixed_gate(kernel(block=4))
    q, k, v = inputs()
    with torch.no_grad():
        hard = module(q, k, v)
    assert 1 < module.get_metrics()["mean_depth"] < 4  # the choices really are mixed
    torch.testing.assert_close(module(q, k, v), hard, atol=1e-5, rtol=0)


# --- skipping -------------------------------------------------------------------------------------


def test_inference_computes_only_the_chosen_platters(monkeypatch):
    calls = recorded_calls(monkeypatch)
    module = kernel(init_depth=1).eval()
    q, k, v = inputs()
    module(q, k, v)
    # Every block chose depth 1: one call over the first platter (width 4) of every sequence and head.
    assert calls == [(1, (B, H, N, 4))]


def test_mixed_choices_run_one_call_per_chosen_depth_and_group(monkeypatch):
    calls = recorded_calls(monkeypatch)
    module = mixed_gate(kernel(block=8, min_depth=2)).eval()
    q, k, v = inputs()
    module(q, k, v)
    logits = module._gate_logits(k, None, True, module._blocks(N, 0, True))
    chosen = [module.depths[i] for i in logits.argmax(-1).flatten().tolist()]  # (B, H, 3 blocks)
    # Platter-tokens run = sum over (sequence, head, block) of 8 rows x the chosen depth.
    assert sum(depth * shape[0] * shape[2] for depth, shape in calls) == 8 * sum(chosen)
    assert all(shape[-1] == depth * 4 for depth, shape in calls)
    assert {depth for depth, _ in calls} == set(chosen)


def test_training_runs_every_allowed_depth(monkeypatch):
    calls = recorded_calls(monkeypatch)
    q, k, v = inputs()
    kernel(min_depth=2).train()(q, k, v)
    assert [depth for depth, _ in calls] == [2, 3, 4]


# --- causality and decoding -----------------------------------------------------------------------


def test_no_depth_choice_or_output_depends_on_future_tokens():
    module = mixed_gate(kernel(block=4)).eval()
    q, k, v = inputs()
    t = 9
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 5
    with torch.no_grad():
        before, after = module(q, k, v), module(q2, k2, v2)
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], atol=1e-6, rtol=0)


def test_decoding_one_token_at_a_time_matches_the_full_pass():
    module = mixed_gate(kernel(block=5)).eval()
    q, k, v = inputs()
    with torch.no_grad():
        full = module(q, k, v)
        steps = [module(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], q_offset=i) for i in range(N)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-5, rtol=0)


def test_fully_padded_rows_give_zeros_not_nan():
    module = mixed_gate(kernel(block=4))
    q, k, v = inputs()
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[1] = False
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = module(q, k, v, key_padding_mask=padding)
        assert not out.isnan().any()
        assert out[1].abs().max() == 0


# --- training the gate ----------------------------------------------------------------------------


@pytest.mark.parametrize("gating", ["straight_through", "soft"])
def test_gradients_reach_the_gate(gating):
    module = kernel(gating=gating, block=8)
    q, k, v = inputs()
    (module(q, k, v) * torch.randn(B, H, N, E)).sum().backward()
    assert module.gate_weight.grad.abs().sum() > 0
    assert module.gate_bias.grad.abs().sum() > 0


def test_compute_penalty_pushes_the_gate_toward_fewer_platters():
    module = kernel(compute_penalty=0.5, min_depth=2)
    q, k, v = inputs()
    module(q, k, v)
    module(q, k, v)
    penalty = module.auxiliary_loss()
    assert module.auxiliary_loss() is None  # taken: the next call starts from nothing
    penalty.backward()
    # Raising a deeper option's logit costs more: gradients increase with depth, deepest positive.
    grads = module.gate_bias.grad.mean(dim=0)
    assert grads[-1] > 0 > grads[0]
    assert torch.all(grads[1:] > grads[:-1])


def test_no_penalty_without_weight_or_gradients():
    q, k, v = inputs()
    module = kernel()
    module(q, k, v)
    assert module.auxiliary_loss() is None
    weighted = kernel(compute_penalty=1.0)
    with torch.no_grad():
        weighted(q, k, v)
    assert weighted.auxiliary_loss() is None


def test_model_helpers_sum_penalties_and_metrics_over_layers():
    layers = torch.nn.ModuleList(
        build_attention("adaptive", 32, 2, depth=4, compute_penalty=1.0, init_depth=d, max_len=N)
        for d in (1, 4)
    )
    x = torch.randn(B, N, 32)
    for layer in layers:
        layer(x)
    total = auxiliary_loss(layers)
    assert total is not None and total.requires_grad
    assert auxiliary_loss(layers) is None
    metrics = adaptive_metrics(layers)
    assert metrics["mean_depth"] == pytest.approx(2.5)
    assert metrics["compute_saved"] == pytest.approx(1 - (1 + 16) / 32)


# --- metrics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("min_depth", [1, 2])
def test_a_gate_forced_to_min_depth_saves_one_minus_the_depth_ratio_squared(causal, min_depth):
    module = kernel(min_depth=min_depth, init_depth=min_depth, block=5)
    q, k, v = inputs()
    with torch.no_grad():
        module(q, k, v, causal=causal)
        module(q, k, v, causal=causal)
    metrics = module.get_metrics()
    assert metrics["calls"] == 2
    assert metrics["mean_depth"] == min_depth
    assert metrics["depth_histogram"][str(min_depth)] == 1.0
    assert metrics["compute_saved"] == pytest.approx(1 - (min_depth / 4) ** 2)
    assert metrics["executed_vs_max"] == pytest.approx((min_depth / 4) ** 2)
    module.reset_metrics()
    assert module.get_metrics() == {}


def test_metrics_weight_heads_and_count_training_work():
    module = kernel(min_depth=1)
    with torch.no_grad():  # head 0 picks depth 1, the other heads depth 4
        module.gate_bias.zero_()
        module.gate_bias[0, 0] = 5.0
        module.gate_bias[1:, 3] = 5.0
    q, k, v = inputs()
    module(q, k, v)  # training: all four depths run
    metrics = module.get_metrics()
    assert metrics["mean_depth"] == pytest.approx((1 + 3 * 4) / 4)
    assert metrics["depth_histogram"] == {"1": 0.25, "2": 0.0, "3": 0.0, "4": 0.75}
    assert metrics["compute_saved"] == pytest.approx(1 - (1 + 3 * 16) / (4 * 16))
    assert metrics["executed_vs_max"] == pytest.approx((1 + 4 + 9 + 16) / 16)


# --- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"budget": 2}, "unknown option(s) budget"),
        ({"min_depth": 5}, "min_depth=5 must be <= depth=4"),
        ({"min_depth": 0}, "min_depth=0"),
        ({"gating": "gumbel"}, "gating='gumbel'"),
        ({"fill": "noise"}, "fill='noise'"),
        ({"init_depth": 1, "min_depth": 2}, "init_depth=1 must be between"),
        ({"compute_penalty": -1.0}, "compute_penalty=-1.0"),
        ({"block": 0}, "block=0"),
        ({"depth": 3}, "must divide the head dimension"),
    ],
)
def test_bad_options_name_the_problem(options, fragment):
    with pytest.raises(ValueError) as error:
        kernel(**options)
    assert fragment in str(error.value)


def test_zeros_fill_leaves_unused_platters_empty():
    module = kernel(init_depth=2, fill="zeros", fusion="concat")
    q, k, v = inputs()
    with torch.no_grad():
        out = module(q, k, v)
    assert out[..., 8:].abs().max() == 0 and out[..., :8].abs().max() > 0


def test_registered_as_an_approximation_of_toroidal():
    mechanism = get_mechanism("adaptive")
    assert mechanism.approximates == "toroidal"
    assert {"depth", "min_depth", "gating", "compute_penalty", "block"} <= set(mechanism.accepts)


# --- toroidal bench -------------------------------------------------------------------------------


def test_bench_reports_adaptive_rows_with_their_metrics(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "-m", "adaptive,toroidal", "-b", "sdpa", "--option", "init_depth=1,2"]
    args += ["-n", "16", "--d-model", "32", "--heads", "2", "--depth", "2", "--warmup", "0", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--no-isolate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_result(out, command="bench")["rows"]
    adaptive_rows = {row["options"]: row for row in rows if row["mechanism"] == "adaptive"}
    assert set(adaptive_rows) == {"init_depth=1", "init_depth=2"}
    assert adaptive_rows["init_depth=1"]["mechanism_metrics"]["compute_saved"] == pytest.approx(0.75)
    assert adaptive_rows["init_depth=2"]["mechanism_metrics"]["compute_saved"] == pytest.approx(0.0)
    assert adaptive_rows["init_depth=2"]["error"] == pytest.approx(0.0, abs=1e-5)  # full depth: no error
    assert [row["mechanism_metrics"] for row in rows if row["mechanism"] == "toroidal"] == [None]


def test_bench_keeps_a_bad_option_value_as_an_error_row_naming_it(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "-m",
        "adaptive",
        "-b",
        "sdpa",
        "--option",
        "gating=gumbel",
        "-n",
        "16",
        "--d-model",
        "32",
    ]
    args += ["--heads", "2", "--depth", "2", "--warmup", "0", "--repeats", "1", "--no-isolate"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 1, result.output  # a sweep that measured nothing fails, after writing its rows
    (row,) = read_result(out, command="bench")["rows"]
    assert row["status"] == "error" and "gating='gumbel'" in row["reason"]


# --- inside a Hugging Face model, and `toroidal train --adaptive-depth` ------------------------------


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        num_hidden_layers=2, vocab_size=50, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_kv_cache_decoding_in_a_model_matches_the_full_pass():
    """The gate reads cached keys: token-by-token logits equal the full forward pass, mixed depths and all."""
    from transformers import DynamicCache

    from toroidal.integrations.transformers import apply_mechanism

    model = apply_mechanism(tiny_llama(), "adaptive", {"depth": 4, "block": 3})
    for module in adaptive.adaptive_kernels(model):
        mixed_gate(module)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache, steps = DynamicCache(), []
        for i in range(ids.shape[1]):
            steps.append(model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    assert 1 < adaptive_metrics(model)["mean_depth"] < 4
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


TRAIN_FLAGS = ["--model", "micro", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
TRAIN_FLAGS += ["--warmup-steps", "1", "--eval-every", "0", "--depth", "2"]


def test_train_adaptive_depth_logs_depths_and_its_penalty_saves_compute(tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN_FLAGS, "--adaptive-depth", "--min-depth", "1", "--steps", "6", "--lr", "0.05"]
    result = CliRunner().invoke(
        app, ["train", *args, "--mechanism-option", "compute_penalty=10", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    record = read_result(out / "metrics.json", command="train")
    curve = record["loss_curve"]
    assert curve[0]["mean_depth"] == 2 and curve[0]["compute_saved"] == 0
    assert curve[-1]["mean_depth"] == 1 and curve[-1]["compute_saved"] == pytest.approx(0.75)
    assert record["mechanism"]["name"] == "adaptive"
    assert record["mechanism"]["options"]["min_depth"] == 1
    assert record["mechanism"]["metrics_mean"]["mean_depth"] == 1  # the final validation pass


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--min-depth", "1"], ["--min-depth 1", "--adaptive-depth"]),
        (["--adaptive-depth", "--mechanism", "standard"], ["'adaptive' mechanism, not 'standard'"]),
        (["--adaptive-depth", "--min-depth", "3"], ["min_depth=3 must be <= depth=2"]),
    ],
)
def test_train_adaptive_depth_mistakes_are_one_line_errors(tmp_path, args, fragments):
    result = CliRunner().invoke(
        app, ["train", *TRAIN_FLAGS, *args, "--steps", "1", "--out", str(tmp_path / "r")]
    )
    assert_one_line_error(result, *fragments)

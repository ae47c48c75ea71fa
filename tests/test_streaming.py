"""Streaming inference (`toroidal.streaming`): state shapes, O(1) memory, the exact special case, training."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal import ToroidalAttention, ToroidalConfig, toroidal_attention
from toroidal.bench.stream import LATENT_SIZE
from toroidal.integrations.transformers import apply_toroidal
from toroidal.integrations.transformers.streaming import STREAM_ATTR, stream_logits, streaming_layers
from toroidal.streaming import (
    LatentKV,
    LatentUpdate,
    StreamingToroidalAttention,
    latent_attention_step,
    slot_anchors,
    slot_of,
)
from toroidal.training.evaluate import EvalConfig, evaluate
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(latent_size=8, update="linear", **overrides) -> StreamingToroidalAttention:
    torch.manual_seed(0)
    fields = dict(d_model=32, n_heads=2, depth=2, lambda_distance=0.7, max_len=16, causal=True)
    fields.update(overrides)
    attention = ToroidalAttention(ToroidalConfig(**fields)).eval()
    with torch.no_grad():
        for param in attention.fusion.parameters():
            param.normal_(0.0, 0.3)
    return StreamingToroidalAttention(attention, latent_size=latent_size, update=update)


def test_state_and_output_shapes():
    stream = _stream(latent_size=5, update="gru", d_model=48, n_heads=3, depth=4)
    state = stream.init_state(batch=2)
    assert state.keys.shape == state.values.shape == (2, 3, 5, 16)
    assert state.counts.shape == (5,) and state.step == 0
    with torch.no_grad():
        y, state = stream.forward_streaming(torch.randn(2, 48), state)
        assert y.shape == (2, 48) and state.step == 1
        ys, state = stream(torch.randn(2, 7, 48), state)
    assert ys.shape == (2, 7, 48) and state.step == 8
    assert state.keys.shape == (2, 3, 5, 16) and float(state.counts.sum()) == 8


def test_slots_split_the_ring_into_equal_arcs():
    assert [slot_of(t, 4, 8) for t in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    assert slot_anchors(4, 8).tolist() == [0.5, 2.5, 4.5, 6.5]
    assert slot_anchors(8, 8).tolist() == list(range(8))  # one position per slot: the exact case
    assert slot_anchors(3, 7).tolist() == [1.0, 3.5, 5.5]  # arcs 0-2, 3-4, 5-6


@pytest.mark.parametrize("update", ["linear", "gru"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"window": 3}, {"depth": 4, "rope": "periodic"}, {"depth": 1, "fusion": "concat"}],
    ids=["plain", "window", "depth4-periodic", "depth1"],
)
def test_one_position_per_slot_is_exact(update, overrides):
    """m = P and t < P: every slot holds one token, so streaming equals the full causal pass."""
    stream = _stream(latent_size=16, update=update, **overrides)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        full, _ = stream.attention(x)
        streamed, _ = stream(x)
    assert (streamed - full).abs().max() < 1e-5


@pytest.mark.parametrize("update", ["linear", "gru"])
def test_fewer_slots_approximate(update):
    """The comparison can fail: with two positions per slot the output differs from the full pass."""
    stream = _stream(latent_size=8, update=update)
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        full, _ = stream.attention(x)
        streamed, _ = stream(x)
    assert (streamed[:, 1:] - full[:, 1:]).abs().max() > 1e-3
    assert (streamed[:, :1] - full[:, :1]).abs().max() < 1e-5  # the first token only sees itself


def test_grouped_queries_match_the_kernel_in_the_exact_case():
    """The per-head step (used inside transformers models) with H = 2 * H_kv and a host scale."""
    torch.manual_seed(1)
    b, h, kv, n, e, depth, period = 2, 4, 2, 6, 8, 2, 6
    q, k, v = torch.randn(b, h, n, e), torch.randn(b, kv, n, e), torch.randn(b, kv, n, e)
    want = toroidal_attention(
        q, k, v, depth=depth, lambda_distance=0.4, period=period, causal=True, window=2, scale=0.3
    )
    update = LatentUpdate("linear", kv, depth, e // depth)
    state, rows = LatentKV.empty(b, kv, period, e), []
    for t in range(n):
        out, state = latent_attention_step(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, update,
            depth=depth, lambda_distance=0.4, period=period, window=2, scale=0.3,
        )  # fmt: skip
        rows.append(out)
    assert (torch.cat(rows, dim=2) - want).abs().max() < 1e-5


def test_state_memory_is_constant_in_the_tokens_seen():
    stream = _stream(latent_size=4, update="gru", max_len=8)  # P = 8: many laps of the ring
    state = stream.init_state(batch=1)
    sizes = {}
    with torch.no_grad():
        for t in range(1, 1001):
            _, state = stream.forward_streaming(torch.randn(1, 32), state)
            if t in (10, 1000):
                sizes[t] = (state.numel, state.nbytes, tuple(state.keys.shape))
    assert sizes[10] == sizes[1000]
    assert state.step == 1000 and float(state.counts.sum()) == 1000


@pytest.mark.parametrize("update", ["linear", "gru"])
def test_gradients_reach_the_update_parameters(update):
    stream = _stream(latent_size=4, update=update)
    y, state = stream(torch.randn(2, 12, 32))
    y.pow(2).sum().backward()
    grads = [p.grad for p in stream.latent_update.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert stream.attention.qkv.weight.grad.abs().sum() > 0


# The running mean (linear at init) is already close to the best linear rate here; a random GRU is not.
@pytest.mark.parametrize("update, factor", [("linear", 0.997), ("gru", 0.5)])
def test_training_the_update_brings_streaming_closer_to_exact_attention(update, factor):
    """Distillation on a tiny task: only the update parameters train, and the loss goes down."""
    stream = _stream(latent_size=4, update=update, lambda_distance=0.2)
    for param in stream.attention.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 32, generator=generator)
    with torch.no_grad():
        target, _ = stream.attention(x)
    optimizer = torch.optim.Adam(stream.latent_update.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = (stream(x)[0] - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < factor * losses[0], losses


def test_bad_arguments_are_refused():
    attention = ToroidalAttention(ToroidalConfig(d_model=32, n_heads=2, depth=2, causal=False))
    with pytest.raises(ValueError, match="streaming is causal"):
        StreamingToroidalAttention(attention)
    attention.config.causal = True
    with pytest.raises(ValueError, match="latent_size"):
        StreamingToroidalAttention(attention, latent_size=0)
    with pytest.raises(ValueError, match="update 'lstm'"):
        StreamingToroidalAttention(attention, update="lstm")
    stream = StreamingToroidalAttention(attention, latent_size=4)
    with pytest.raises(ValueError, match=r"x_t of shape \(B, 32\)"):
        stream.forward_streaming(torch.randn(2, 1, 32), stream.init_state(2))
    with pytest.raises(ValueError, match="state keys"):
        stream.forward_streaming(torch.randn(3, 32), stream.init_state(2))


# --- toroidal bench --mode stream ---------------------------------------------------------------------

TINY_BENCH = ["bench", "--mode", "stream", "--d-model", "32", "--heads", "2", "--depth", "2"]
TINY_BENCH += ["--warmup", "0", "--repeats", "2", "--max-time", "0", "--backend", "sdpa"]


def test_bench_stream_rows_compare_one_step_with_the_kv_cache(tmp_path):
    out = tmp_path / "stream.json"
    result = runner.invoke(app, [*TINY_BENCH, "-n", "16,32", "--no-isolate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "KV-cache ms" in result.stdout and "state KiB" in result.stdout
    rows = read_result(out, command="bench")["rows"]
    assert [(r["mode"], r["seq_len"], r["status"], r["chosen"]) for r in rows] == [
        ("stream", 16, "ok", "sdpa"),
        ("stream", 32, "ok", "sdpa"),
    ]
    for row in rows:
        assert row["median_ms"] > 0 and row["kv_cache_ms"] > 0
        assert row["stream_vs_kv_cache"] == pytest.approx(row["median_ms"] / row["kv_cache_ms"])
        assert (row["latent_size"], row["update"]) == (LATENT_SIZE, "gru")
        assert row["peak_memory_mb"] is None  # no isolation, no CPU memory measurement
    short, long = rows
    assert short["state_bytes"] == long["state_bytes"] == 2 * 2 * LATENT_SIZE * 16 * 4 + LATENT_SIZE * 4
    assert long["kv_cache_bytes"] == 2 * short["kv_cache_bytes"] == 2 * (2 * 2 * 16 * 16 * 4)


def test_bench_stream_measures_peak_memory_in_isolated_workers(tmp_path):
    out = tmp_path / "stream.json"
    result = runner.invoke(app, [*TINY_BENCH, "-n", "64", "--isolate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = read_result(out, command="bench")["rows"]
    assert row["status"] == "ok" and row["memory_method"] == "peak RSS growth of a forked worker"
    assert row["peak_memory_mb"] >= 0 and row["kv_cache_peak_memory_mb"] >= 0


def test_bench_stream_skips_bidirectional_rows_and_names_the_mode_in_errors():
    result = runner.invoke(app, [*TINY_BENCH, "-n", "16", "--no-causal", "--no-isolate"])
    assert result.exit_code == 1 and "nothing was measured" in result.stderr, result.output
    assert "skipped" in result.stdout and "causal" in result.stdout
    bad = runner.invoke(app, [*TINY_BENCH[:1], "--mode", "decode", "-n", "16"])
    assert_one_line_error(bad, "unknown mode 'decode'", "stream")


# --- toroidal eval --streaming ------------------------------------------------------------------------

MICRO_EVAL = ["eval", "--model", "micro", "--attention", "toroidal", "--dataset", "periodic"]
MICRO_EVAL += ["--seq-len", "8", "--batch-size", "2", "--max-batches", "1"]


def test_eval_streaming_with_one_slot_per_position_matches_the_normal_score(tmp_path):
    """P = seq_len = 8 and 8 slots: the exact case, so both ways score the same."""
    out = tmp_path / "eval.json"
    result = runner.invoke(app, [*MICRO_EVAL, "--streaming", "--latent-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "untrained" in result.stdout
    record = read_result(out, command="eval")
    metrics = record["metrics"]
    assert metrics["streaming_loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert metrics["streaming_perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert record["config"]["streaming"] is True and record["config"]["latent_size"] == 8
    assert "--streaming" in record["command"]["argv"]


def test_eval_streaming_with_fewer_slots_shows_a_different_score():
    config = EvalConfig(
        model="micro", attention="toroidal", seq_len=8, batch_size=2, max_batches=1,
        streaming=True, latent_size=2, update="gru",
    )  # fmt: skip
    metrics = evaluate(config).metrics
    # A random micro model predicts almost uniformly, so attention moves its loss only a little.
    assert abs(metrics["streaming_loss"] - metrics["loss"]) > 1e-6
    assert metrics["streaming_tokens_per_s"] > 0


def _llama(window=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    toroidal = ToroidalConfig(depth=2, lambda_distance=0.5, rope="none", max_len=12, window=window)
    apply_toroidal(model, toroidal)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "toroidal_fusion" in name:
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("update", ["linear", "gru"])
def test_streaming_inside_a_transformers_model(update):
    """Grouped queries, host rotary and scale: exact with one slot per position, different with fewer."""
    model, ids = _llama(window=5), torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        with streaming_layers(model, latent_size=12, update=update):
            exact = stream_logits(model, ids)
        with streaming_layers(model, latent_size=3, update=update):
            approximate = stream_logits(model, ids)
    assert (exact - full).abs().max() < 1e-5
    assert (approximate - full).abs().max() > 1e-3
    assert not any(hasattr(m, STREAM_ATTR) for m in model.modules())  # removed on the way out


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--layers", "1"], ["streaming needs toroidal attention in every layer", "layer(s) 0"]),
        (["--attention", "baseline"], ["layer(s) 0, 1 are not toroidal"]),
        (["--latent-size", "0"], ["--latent-size 0"]),
        (["--update", "lstm"], ["--update lstm", "gru"]),
    ],
)
def test_eval_streaming_refuses_what_it_cannot_score(args, fragments):
    result = runner.invoke(app, [*MICRO_EVAL, "--streaming", *args])
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("args", [["--update", "gru"], ["--latent-size", "8"]])
def test_streaming_options_without_streaming_are_refused(args):
    assert_one_line_error(runner.invoke(app, [*MICRO_EVAL, *args]), "only applies with --streaming")

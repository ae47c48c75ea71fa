"""Length extrapolation in the library: which lengths a model can score, and one model scored at
several window lengths on the same text (`EvalConfig(lengths=...)`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from toroidal.config import ToroidalConfig
from toroidal.integrations.transformers import (
    apply_mechanism,
    apply_toroidal,
    learned_positions,
    length_refusal,
)
from toroidal.training import TrainConfig, train
from toroidal.training.errors import SetupError
from toroidal.training.evaluate import EvalConfig, evaluate
from toroidal.training.models import remove_rotary

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"Line {i}: the ring wraps at its period, and the platters see the seam.\n" for i in range(80))
MICRO = dict(model="micro", seq_len=16, batch_size=4, eval_batches=1, warmup_steps=1, eval_every=0, steps=2)


def host(family: str, positions: int = 16):
    fields = {"vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "gpt2":
        fields.update(n_embd=32, n_layer=1, n_head=4, n_positions=positions)
    else:
        fields.update(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=positions,
        )  # fmt: skip
    config = AutoConfig.for_model(family, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def logits_at(model, length: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.randint(3, 64, (1, length))).logits


def test_learned_absolute_positions_stop_at_their_last_row():
    gpt2 = host("gpt2", positions=16)
    assert learned_positions(gpt2) == ("transformer.wpe", 16)
    assert length_refusal(gpt2, 16) is None
    reason = length_refusal(gpt2, 17)
    assert "16 positions" in reason and "wpe" in reason


@pytest.mark.parametrize("scheme", ["rope", "nope", "alibi", "toroidal"])
def test_computed_positions_score_past_the_stated_ones(scheme):
    """RoPE, no position encoding, ALiBi and the torus (ring of period 16) at 8x the 16 positions."""
    model = host("llama", positions=16)
    if scheme == "nope":
        assert remove_rotary(model) == 1
    if scheme == "alibi":
        apply_mechanism(model, "alibi")
    if scheme == "toroidal":
        apply_toroidal(model, ToroidalConfig(depth=2, rope="none", max_len=16))
    assert learned_positions(model) is None and length_refusal(model, 128) is None
    assert torch.isfinite(logits_at(model, 128)).all()


def test_a_pinned_backend_that_cannot_take_the_length_is_refused():
    model = host("llama", positions=16)
    apply_toroidal(model, ToroidalConfig(depth=2, rope="none", max_len=16, backend="decomposed"))
    assert length_refusal(model, 16) is None
    assert "decomposed" in length_refusal(model, 32) and "P=16 < N=32" in length_refusal(model, 32)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("lengths") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return f"text:{path}"


def test_every_length_scores_the_same_tokens_as_it_would_alone(text):
    common = dict(model="micro", dataset=text, split="all", batch_size=4, max_tokens=256)
    result = evaluate(EvalConfig(**common, lengths=[64, 16, 32]))
    assert result.metrics is None and result.scored is None
    assert [row["seq_len"] for row in result.rows] == [16, 32, 64]  # sorted
    assert [row["scored"]["tokens"] for row in result.rows] == [256, 256, 256]  # 16, 8 and 4 windows
    assert result.summary == {"training_seq_len": None, "model_positions": 512, "same_text": True}
    assert result.config["lengths"] == [16, 32, 64] and result.config["seq_len"] == 16
    for row in result.rows:  # each row is what that length alone scores: the same fingerprint and loss
        alone = evaluate(EvalConfig(**common, seq_len=row["seq_len"]))
        assert alone.rows is None and "lengths" not in alone.config
        assert alone.scored == row["scored"]
        assert alone.metrics["loss"] == pytest.approx(row["metrics"]["loss"], rel=1e-5)
    # A budget some length does not divide: its last window runs past it, and the rows say so.
    uneven = evaluate(EvalConfig(**{**common, "max_tokens": 100}, lengths=[16, 32]))
    assert [row["scored"]["tokens"] for row in uneven.rows] == [112, 128]
    assert uneven.summary["same_text"] is False


@pytest.mark.parametrize("mechanism", ["toroidal", "alibi"])
def test_a_run_scores_eight_times_its_training_length(text, tmp_path, mechanism):
    run = tmp_path / mechanism
    train(TrainConfig(**MICRO, mechanism=mechanism), run)
    result = evaluate(
        EvalConfig(checkpoint=str(run), dataset=text, split="all", lengths=[16, 128], max_tokens=256)
    )
    assert result.summary["training_seq_len"] == 16
    for row in result.rows:
        assert row["scored"]["tokens"] == 256 and row["metrics"]["perplexity"] < float("inf")
    if mechanism == "toroidal":  # the ring keeps the training period: it wraps 8 times at 128
        assert result.config["toroidal"]["max_len"] == 16 and result.config["toroidal"]["period"] is None


def test_lengths_are_checked_before_the_work():
    with pytest.raises(SetupError, match="given twice"):
        EvalConfig(model="micro", lengths=[16, 16])
    with pytest.raises(SetupError, match="--streaming scores one length"):
        EvalConfig(model="micro", lengths=[16, 32], streaming=True)
    assert EvalConfig(model="micro", lengths=[48]).lengths is None  # one length is seq_len alone
    with pytest.raises(SetupError, match="cannot score --seq-len 2048.*1024 positions"):
        evaluate(EvalConfig(model="tiny-gpt2", lengths=[64, 2048], max_tokens=64))

"""`--position rope|none`: a preset with its rotary encoding, or with none at all (NoPE).

Without rotary encoding (and with no other position signal) a model's logits cannot depend on
its position ids at all. RoPE is relative (a uniform shift changes only rounding), so the check
spreads the positions apart: that changes RoPE's distances, and nothing without it.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.integrations.transformers.host import rotary_dim
from toroidal.training import TrainConfig, load_run
from toroidal.training.errors import SetupError
from toroidal.training.models import NoRotary, build_model, resolve_model
from toroidal.training.tokenization import ByteTokenizer
from toroidal_cli.app import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = ["--model", "micro", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2"]
MICRO += ["--warmup-steps", "1", "--lr", "0.01", "--eval-every", "0", "--steps", "2"]


def moved_logits(model, shift: int, stretch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..11 and at shift + stretch * (0..11)."""
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12)[None].expand(2, -1)
    mask = torch.ones_like(ids)  # given: positions that do not step by 1 would read as packed sequences
    with torch.no_grad():
        return (
            model(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
            model(input_ids=ids, attention_mask=mask, position_ids=shift + stretch * positions).logits,
        )


@pytest.mark.parametrize("preset", ["micro", "tiny-phi"])  # tiny-phi: partial rotary, half of each head
def test_none_removes_the_rotary_encoding(preset):
    source = resolve_model(preset)
    rope = build_model(source, ByteTokenizer(), seq_len=16, seed=0).eval()
    nope = build_model(source, ByteTokenizer(), seq_len=16, seed=0, position="none").eval()
    assert rotary_dim(rope) > 0 and rotary_dim(nope) == 0
    assert any(isinstance(m, NoRotary) for m in nope.modules())
    assert rope.state_dict().keys() == nope.state_dict().keys()  # the same weights: only rotation is gone
    for shift, stretch in ((37, 1), (0, 3), (5, 7)):
        base, moved = moved_logits(nope, shift, stretch)
        assert torch.equal(base, moved)
    base, moved = moved_logits(rope, 37)
    assert (base - moved).abs().max() <= 1e-5  # RoPE is relative: a uniform shift is no test
    for shift, stretch in ((0, 3), (5, 7)):
        base, moved = moved_logits(rope, shift, stretch)
        assert (base - moved).abs().max() > 1e-3
    # Position 0 has no rotation under RoPE either: the first token's logits agree.
    assert torch.allclose(moved_logits(rope, 0)[0][:, 0], moved_logits(nope, 0)[0][:, 0], atol=1e-6)


def test_none_needs_a_rotary_preset():
    with pytest.raises(SetupError, match="no rotary embedding to remove"):
        build_model(resolve_model("tiny-gpt2"), ByteTokenizer(), seq_len=16, seed=0, position="none")
    with pytest.raises(SetupError, match="position"):
        TrainConfig(position="alibi")


def test_a_run_records_its_position_and_reloads_without_rotary(tmp_path):
    run = tmp_path / "nope"
    result = runner.invoke(app, ["train", *MICRO, "--position", "none", "--out", str(run)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "train_config.json").read_text(encoding="utf-8"))
    assert saved["config"]["position"] == "none"
    loaded = load_run(run)
    assert loaded.config.position == "none"
    assert isinstance(loaded.model.model.rotary_emb, NoRotary)
    base, moved = moved_logits(loaded.model, 5, 3)
    assert torch.equal(base, moved)
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--max-batches", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text(encoding="utf-8"))
    assert "--position" not in record["command"]["argv"]  # the checkpoint's own
    refused = runner.invoke(app, ["eval", "--checkpoint", str(run), "--position", "rope"])
    assert_one_line_error(refused, "--position cannot change a checkpoint")


def test_eval_of_a_preset_takes_a_position(tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", "micro", "--position", "none", "--seq-len", "16", "--max-batches", "1"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["config"]["position"] == "none"
    assert_one_line_error(
        runner.invoke(app, ["eval", "--model", "tiny-gpt2", "--position", "none", "--seq-len", "16"]),
        "no rotary embedding to remove",
    )

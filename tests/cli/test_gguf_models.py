"""`--model PATH.gguf` (or a folder holding one GGUF file) in the commands that take a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_fixture import write_tiny_gguf
from typer.testing import CliRunner

from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
TEXT = "".join(f"the cat {i} sat on the mat; another ran in the rain {i % 7} times.\n" for i in range(60))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return write_tiny_gguf(folder / "model" / "tiny.gguf")


def test_eval_takes_a_gguf_file_or_its_folder(model, tmp_path):
    text = ["--dataset", f"text:{model.parent.parent / 'text.txt'}", "--split", "all", "--seq-len", "16"]
    losses = []
    for spec in (model, model.parent):
        out = tmp_path / f"{spec.name}.json"
        done = runner.invoke(
            app, ["eval", "--model", str(spec), *text, "--max-tokens", "64", "--out", str(out)]
        )
        assert done.exit_code == 0, done.output
        record = read_result(out, command="eval")
        assert record["scored"]["tokens"] == 64 and record["config"]["tokenizer"] == "model"  # the GGUF's own
        losses.append(record["metrics"]["loss"])
    assert losses[0] == losses[1]


def test_longbench_runs_a_gguf_model(model, tmp_path):
    out = tmp_path / "lb.json"
    args = ["--model", str(model), "--tasks", "passkey", "--lengths", "128", "--limit", "1"]
    done = runner.invoke(app, ["longbench", *args, "--batch-size", "1", "--out", str(out)])
    assert done.exit_code == 0, done.output
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["models"]["toroidal"]["model"] == str(model)
    assert record["models"]["toroidal"]["model_kind"] == "gguf"


def test_plot_attention_puts_toroidal_attention_into_a_gguf_model(model, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "att.png"
    args = ["--model", str(model), "--text", "the cat sat", "--layer", "1", "--depth", "2", "--head", "1"]
    done = runner.invoke(app, ["plot", "attention", *args, "--out", str(out)])
    assert done.exit_code == 0, done.output
    numbers = json.loads(out.with_suffix(".plot.json").read_text(encoding="utf-8"))
    assert numbers["settings"]["model"] == str(model) and numbers["settings"]["layer"] == 1
    n = numbers["settings"]["tokens"]
    assert len(numbers["platter_tokens"]) == 2 * n and len(numbers["positions"]) == n

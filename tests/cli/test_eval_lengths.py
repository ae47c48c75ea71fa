"""`toroidal eval --seq-len 16,32,64`: a row per length, compared length by length, drawn per length;
`toroidal plot lengths` from several results; one-line refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.training import TrainConfig, train
from toroidal_cli.app import app
from toroidal_cli.results import read_result

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs the plot extra (matplotlib)"
)
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(
    f"Line {i}: a ring of {i % 7} seams wraps around its period, platter by platter.\n" for i in range(90)
)
MICRO = dict(model="micro", seq_len=16, batch_size=4, eval_batches=1, warmup_steps=1, eval_every=0, steps=2)
SINGLE_KEYS = {
    "schema",
    "command",
    "created",
    "toroidal_version",
    "env",
    "config",
    "metrics",
    "scored",
    "mechanism",
}


def invoke(*args: str):
    return runner.invoke(app, ["eval", *args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A toroidal run trained at 16 tokens, a text, and results of it at several lengths and at one."""
    root = tmp_path_factory.mktemp("lengths")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    train(TrainConfig(**MICRO, mechanism="toroidal"), root / "run")
    data = ["--checkpoint", str(root / "run"), "--dataset", f"text:{text}", "--split", "all"]
    data += ["--max-tokens", "256", "--batch-size", "4"]
    outputs = {}
    for name, lengths in (("short", "16,32"), ("long", "32,64,128"), ("one", "32")):
        outputs[name] = root / f"{name}.json"
        result = invoke(*data, "--seq-len", lengths, "--out", str(outputs[name]))
        assert result.exit_code == 0, result.output
        outputs[f"{name}.stdout"] = result.stdout
    return {"root": root, "data": data, **outputs}


def test_a_row_per_length_in_the_table_and_the_result(setup):
    stdout = setup["long.stdout"]
    assert "× train" in stdout and "×2" in stdout and "×8" in stdout
    assert "trained at seq_len 16" in stdout and "scored: the same 256 tokens" in stdout
    record = read_result(setup["long"], command="eval")
    assert "metrics" not in record and "scored" not in record
    assert [row["seq_len"] for row in record["rows"]] == [32, 64, 128]
    for row in record["rows"]:
        assert row["metrics"]["tokens"] == row["scored"]["tokens"] == 256  # the same first 256 tokens
        assert row["scored"]["seq_len"] == row["seq_len"] and len(row["scored"]["fingerprint"]) == 16
        for name in ("perplexity", "bits_per_byte", "loss", "tokens_per_s", "peak_memory_mb"):
            assert row["metrics"][name] is not None
    assert record["summary"] == {"training_seq_len": 16, "model_positions": 512, "same_text": True}
    assert record["mechanism"]["name"] == "toroidal" and record["config"]["lengths"] == [32, 64, 128]
    argv = record["command"]["argv"]
    assert argv[argv.index("--seq-len") + 1] == "32,64,128"


def test_one_length_keeps_the_result_format(setup):
    record = read_result(setup["one"], command="eval")
    assert set(record) == SINGLE_KEYS and "lengths" not in record["config"]
    assert record["scored"]["seq_len"] == 32 and record["metrics"]["tokens"] == 256
    long = read_result(setup["long"])
    assert long["rows"][0]["scored"] == record["scored"]  # the row at 32 scored what 32 alone scores


def test_a_budget_that_some_length_does_not_divide_is_noted(setup):
    data = [arg if arg != "256" else "100" for arg in setup["data"]]
    result = invoke(*data, "--seq-len", "16,32")
    assert result.exit_code == 0, result.output
    assert (
        "112 at 16, 128 at 32" in result.stdout and "--max-tokens 128 scores the same tokens" in result.stdout
    )


def test_compare_goes_length_by_length(setup, tmp_path):
    out = tmp_path / "compared.json"
    result = invoke(*setup["data"], "--seq-len", "16,32", "--compare", str(setup["long"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "per length" in result.stdout and "ppl this" in result.stdout and "ppl other" in result.stdout
    assert "missing: length 16 only in this run" in result.stdout
    assert f"missing: length 64, 128 only in {setup['long']}" in result.stdout
    comparison = read_result(out)["comparison"]
    assert comparison["same_text"] is True
    matches = {row["seq_len"]: row["match"] for row in comparison["rows"]}
    assert matches == {32: "both", 64: "old_only", 128: "old_only", 16: "new_only"}
    at_32 = next(row for row in comparison["rows"] if row["seq_len"] == 32)["metrics"]["perplexity"]
    assert at_32["delta"] == pytest.approx(0.0, abs=1e-9)  # the same model on the same text


def test_one_length_compares_with_the_matching_row_of_several(setup):
    result = invoke(*setup["data"], "--seq-len", "32", "--compare", str(setup["long"]))
    assert result.exit_code == 0, result.output
    assert "this run" in result.stdout and "perplexity" in result.stdout
    assert_one_line_error(
        invoke(*setup["data"], "--seq-len", "48", "--compare", str(setup["long"])),
        "no row at --seq-len 48",
        "32, 64, 128",
    )
    several = invoke(*setup["data"], "--seq-len", "16,32", "--compare", str(setup["one"]))
    assert several.exit_code == 0, several.output
    assert "missing: length 16 only in this run" in several.stdout


def test_fail_on_regression_gates_each_length(setup, tmp_path):
    record = read_result(setup["long"])
    for row in record["rows"]:
        if row["seq_len"] == 64:  # the other side much better at 64 only: this run regressed there
            row["metrics"].update(
                loss=row["metrics"]["loss"] / 2, perplexity=row["metrics"]["perplexity"] / 2
            )
    better = tmp_path / "better.json"
    better.write_text(json.dumps(record))
    gate = ["--fail-on-regression", "1"]
    failing = invoke(*setup["data"], "--seq-len", "32,64", "--compare", str(better), *gate)
    assert failing.exit_code == 1 and "at seq_len 64" in failing.stderr and "worse than" in failing.stderr
    passing = invoke(*setup["data"], "--seq-len", "32,64", "--compare", str(setup["long"]), *gate)
    assert passing.exit_code == 0, passing.output
    # Other text at a shared length: refused (and never gated).
    other_text = [arg if arg != "256" else "512" for arg in setup["data"]]
    assert_one_line_error(
        invoke(*other_text, "--seq-len", "32,64", "--compare", str(setup["long"])), "--compare", "scored"
    )


@needs_matplotlib
def test_eval_plot_and_plot_lengths(setup, tmp_path):
    png = tmp_path / "len.png"
    result = invoke(*setup["data"], "--seq-len", "16,32,64", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads(png.with_suffix(".plot.json").read_text())
    assert numbers["kind"] == "lengths" and numbers["series"][0]["seq_len"] == [16, 32, 64]
    assert numbers["training"] == [{"seq_len": 16, "color": "C0"}]
    # Two files with one label, grouped: their mean and min-max band; files of one length are points.
    fig = tmp_path / "fig.png"
    files = [str(setup["short"]), str(setup["long"]), str(setup["one"])]
    labels = ["--label", "arm", "--label", "arm", "--label", "single"]
    drawn = runner.invoke(app, ["plot", "lengths", *files, *labels, "--group", "--out", str(fig)])
    assert drawn.exit_code == 0, drawn.output
    series = {line["label"]: line for line in json.loads(fig.with_suffix(".plot.json").read_text())["series"]}
    assert series["arm"]["seq_len"] == [16, 32, 64, 128] and series["arm"]["runs"] == [1, 2, 1, 1]
    assert series["single"]["seq_len"] == [32] and series["single"]["training_seq_len"] == []
    assert_one_line_error(
        runner.invoke(
            app, ["plot", "lengths", *files[:2], "--label", "a", "--label", "a", "--out", str(fig)]
        ),
        "two results are labelled 'a'",
        "--group",
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--model", "tiny-gpt2", "--seq-len", "512,2048"],
            ["cannot score --seq-len 2048", "1024 positions"],
        ),
        (["--model", "micro", "--seq-len", "16,16"], ["--seq-len 16 is given twice"]),
        (["--model", "micro", "--seq-len", "16,x"], ["--seq-len", "'x'"]),
        (["--model", "micro", "--seq-len", "16,32", "--streaming"], ["--streaming scores one length"]),
    ],
)
def test_bad_lengths_are_one_line_errors(tmp_path, args, fragments):
    out = tmp_path / "never.json"
    assert_one_line_error(invoke(*args, "--max-tokens", "64", "--out", str(out)), *fragments)
    assert not out.exists()

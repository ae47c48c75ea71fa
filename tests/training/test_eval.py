"""`toroidal eval`: checkpoints and models, metrics, --compare tables and exit codes, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.training import TrainConfig, evaluate_lm, load_run, train
from toroidal.training.data import make_dataset, parse_dataset_spec
from toroidal.training.errors import CheckpointError
from toroidal.training.evaluate import EvalConfig, evaluate
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
MICRO = dict(model="micro", seq_len=16, batch_size=4, eval_batches=2, warmup_steps=2, lr=0.01, eval_every=0)
TEXT = "".join(f"A ring of {i} positions wraps around; platter {i % 4} sees the seam.\n" for i in range(60))


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    return runner.invoke(app, ["eval", *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A toroidal and a baseline run of the same budget, and a text file to evaluate on."""
    root = tmp_path_factory.mktemp("eval")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    toroidal = train(TrainConfig(**MICRO, steps=8, layers=[1]), root / "toroidal")
    train(TrainConfig(**MICRO, steps=8, attention="baseline"), root / "baseline")
    return {
        "root": root,
        "text": text,
        "toroidal": root / "toroidal",
        "baseline": root / "baseline",
        "result": toroidal,
    }


def test_a_loaded_run_computes_what_training_measured(runs):
    """Saving and loading keep every weight, the fusion parameters and toroidal layers included."""
    run = load_run(runs["toroidal"])
    assert run.layers == [1] and run.toroidal.depth == 2 and run.config.attention == "toroidal"
    options = run.config.data_options()
    dataset = make_dataset(parse_dataset_spec("periodic"), options, "validation", run.tokenizer)
    metrics = evaluate_lm(run.model, dataset, batch_size=4, max_batches=2, device=torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(runs["result"].payload["validation"][-1]["loss"], abs=1e-6)


def test_eval_checkpoint_writes_a_result(runs, tmp_path):
    out = tmp_path / "eval.json"
    result = invoke(
        "--checkpoint", str(runs["toroidal"]), "--dataset", f"text:{runs['text']}", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    for name in ("perplexity", "bits_per_byte", "tokens_per_s", "peak_memory_mb"):
        assert name in result.stdout
    record = read_result(out, command="eval")
    metrics = record["metrics"]
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(metrics["bits_per_token"])  # bytes tokenizer
    assert metrics["tokens"] == (len(TEXT.encode()) - 1) // 16 * 16  # the whole file, in chunks
    assert record["config"]["attention"] == "toroidal" and record["config"]["toroidal_layers"] == [1]
    assert record["config"]["seq_len"] == 16  # the run's options are the defaults
    assert record["command"]["argv"][-2:] == ["--checkpoint", str(runs["toroidal"])]


def test_eval_a_model_with_toroidal_attention_on_passkeys(tmp_path):
    out = tmp_path / "eval.json"
    args = ["--model", "micro", "--attention", "toroidal", "--depth", "2", "--dataset", "passkey"]
    result = invoke(
        *args, "--seq-len", "100", "--passkey-digits", "3", "--max-batches", "1", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    record = read_result(out)
    assert 0.0 <= record["metrics"]["passkey_accuracy"] <= 1.0 and record["metrics"]["samples"] == 8
    assert record["config"]["toroidal_layers"] == [0, 1]


def test_library_evaluate_matches_the_command(runs):
    config = EvalConfig(
        checkpoint=str(runs["baseline"]),
        dataset=f"text:{runs['text']}",
        seq_len=16,
        batch_size=4,
        max_batches=2,
    )
    first, second = evaluate(config), evaluate(config)
    assert first.metrics["loss"] == second.metrics["loss"] and first.metrics["samples"] == 8
    assert first.config["attention"] == "baseline" and first.config["toroidal"] is None


# --- compare -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(runs):
    """Eval results of both runs on the same text."""
    paths = {}
    for name in ("toroidal", "baseline"):
        paths[name] = runs["root"] / f"{name}.json"
        args = [
            "--checkpoint",
            str(runs[name]),
            "--dataset",
            f"text:{runs['text']}",
            "--out",
            str(paths[name]),
        ]
        assert invoke(*args).exit_code == 0
    return paths


def test_compare_prints_every_shared_metric_and_exits_0(runs, results):
    result = invoke(
        "--checkpoint",
        str(runs["toroidal"]),
        "--dataset",
        f"text:{runs['text']}",
        "--compare",
        str(results["baseline"]),
    )
    assert result.exit_code == 0, result.output
    for column in ("this run", "other", "delta", "change", "better"):
        assert column in result.stdout
    for metric in ("perplexity", "bits_per_byte", "tokens_per_s", "peak_memory_mb"):
        assert metric in result.stdout
    assert "%" in result.stdout and "note: the runs differ in checkpoint" in result.stdout


def test_fail_on_regression_exits_1_only_for_the_worse_side(runs, results):
    records = {name: read_result(path) for name, path in results.items()}
    worse = max(records, key=lambda name: records[name]["metrics"]["perplexity"])
    better = "baseline" if worse == "toroidal" else "toroidal"
    common = ["--dataset", f"text:{runs['text']}", "--fail-on-regression", "0.001"]
    failing = invoke("--checkpoint", str(runs[worse]), *common, "--compare", str(results[better]))
    assert failing.exit_code == 1
    assert "regression" in failing.stderr and "worse than" in failing.stderr
    passing = invoke("--checkpoint", str(runs[better]), *common, "--compare", str(results[worse]))
    assert passing.exit_code == 0, passing.output
    # Against itself nothing is worse: exit 0 even with a zero threshold (speed is not gated by default).
    same = invoke(
        "--checkpoint",
        str(runs[worse]),
        *common[:2],
        "--fail-on-regression",
        "0",
        "--compare",
        str(results[worse]),
    )
    assert same.exit_code == 0, same.output


def test_a_gate_that_compares_nothing_fails(runs, results, tmp_path):
    record = read_result(results["baseline"])
    record["metrics"] = {name: None for name in record["metrics"]}
    record["config"] = "not a mapping"
    broken = tmp_path / "nulls.json"
    broken.write_text(json.dumps(record))
    args = ["--checkpoint", str(runs["toroidal"]), "--dataset", f"text:{runs['text']}"]
    args += ["--compare", str(broken)]
    assert invoke(*args).exit_code == 0  # no gate: the (empty) comparison is only shown
    gated = invoke(*args, "--fail-on-regression", "5", "--out", str(tmp_path / "kept.json"))
    assert gated.exit_code == 1 and "no gated metric" in gated.stderr
    assert read_result(tmp_path / "kept.json")["metrics"]["loss"] is not None  # the result is still written


def test_compare_result_is_recorded(runs, results, tmp_path):
    out = tmp_path / "compared.json"
    args = ["--checkpoint", str(runs["toroidal"]), "--dataset", f"text:{runs['text']}"]
    assert invoke(*args, "--compare", str(results["baseline"]), "--out", str(out)).exit_code == 0
    rows = {row["metric"]: row for row in read_result(out)["comparison"]["rows"]}
    perplexity = rows["perplexity"]
    assert perplexity["delta"] == pytest.approx(perplexity["this"] - perplexity["other"])
    assert perplexity["better"] == ("this" if perplexity["delta"] < 0 else "other")
    assert rows["tokens_per_s"]["gated"] is False and rows["loss"]["gated"] is True


# --- errors -------------------------------------------------------------------------------------------


def corrupt_copy(runs, tmp_path, edit):
    folder = tmp_path / "run"
    shutil.copytree(runs["toroidal"], folder)
    edit(folder)
    return folder


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda f: (f / "model" / "model.safetensors").write_bytes(b"\x08" * 64), "cannot load the model"),
        (lambda f: (f / "train_config.json").write_text("{oops"), "not valid JSON"),
        (lambda f: (f / "toroidal.json").write_text('{"config": {"depth": "x"}}'), "corrupt"),
        (lambda f: _edit_json(f / "model" / "config.json", num_hidden_layers=3), "another architecture"),
        (
            lambda f: _edit_json(f / "model" / "config.json", model_type="no-such-family"),
            "cannot load the model",
        ),
        (lambda f: shutil.rmtree(f / "model"), "no trained model"),
        (lambda f: shutil.rmtree(f / "tokenizer"), "no saved tokenizer"),
    ],
    ids=["bad-safetensors", "bad-json", "bad-toroidal", "architecture", "family", "unfinished", "tokenizer"],
)
def test_a_broken_checkpoint_is_one_clear_line(runs, tmp_path, edit, fragment):
    folder = corrupt_copy(runs, tmp_path, edit)
    assert_one_line_error(
        invoke("--checkpoint", str(folder), "--max-batches", "1"), "toroidal eval:", fragment
    )


def test_toroidal_weights_of_another_depth_do_not_load(runs, tmp_path):
    def deeper(folder):
        data = json.loads((folder / "toroidal.json").read_text())
        data["config"]["depth"] = 4
        (folder / "toroidal.json").write_text(json.dumps(data))

    folder = corrupt_copy(runs, tmp_path, deeper)
    with pytest.raises(CheckpointError, match="toroidal weights|weights"):
        load_run(folder)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ([], ["nothing to evaluate", "--checkpoint"]),
        (["--checkpoint", "/no/such/run"], ["/no/such/run", "does not exist"]),
        (["--model", "micro", "--dataset", "text:/no/such.txt"], ["/no/such.txt does not exist"]),
        (["--model", "micro", "--dataset", "cifar"], ["unknown dataset"]),
        (["--model", "nobody/none"], ["not reachable"]),
        (["--model", "micro", "--tokenizer", "bpe:500"], ["trained by `toroidal train`"]),
        (["--model", "micro", "--seq-len", "4096"], ["512 positions"]),
        (["--model", "micro", "--fail-on-regression", "5"], ["needs --compare"]),
        (["--model", "micro", "--compare", "/no/such.json"], ["does not exist"]),
        (["--model", "micro", "--gate", "speed"], ["--gate 'speed'"]),
    ],
)
def test_bad_inputs_are_one_line_errors(monkeypatch, args, fragments):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(invoke(*args), *fragments)


def test_checkpoint_with_model_options_or_a_bad_compare_file(runs, tmp_path):
    assert_one_line_error(
        invoke("--checkpoint", str(runs["toroidal"]), "--depth", "4"), "--depth cannot change"
    )
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert_one_line_error(invoke("--model", "micro", "--compare", str(bad)), "not valid JSON")
    train_record = runs["toroidal"] / "metrics.json"
    train_record.write_text(json.dumps({"schema": {"name": "toroidal.train", "version": 1}}))
    assert_one_line_error(
        invoke("--model", "micro", "--compare", str(train_record)), "expected 'toroidal.eval'"
    )
    train_record.unlink()

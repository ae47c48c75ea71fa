"""`toroidal eval`: checkpoints and models, metrics, --compare tables and exit codes, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from toroidal.training import TrainConfig, evaluate_lm, load_run, train
from toroidal.training.data import make_dataset, parse_dataset_spec, split_text
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
    held_out = split_text(TEXT)[1]  # what `train` held out: never the training text by default
    assert metrics["tokens"] == (len(held_out.encode()) - 1) // 16 * 16
    scored = record["scored"]
    assert scored["dataset"] == f"text:{runs['text']}" and scored["split"] == "heldout"
    assert scored["seq_len"] == 16 and scored["tokens"] == metrics["tokens"]
    assert len(scored["fingerprint"]) == 16 and int(scored["fingerprint"], 16) >= 0
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
        (["--model", "tiny-gpt2", "--seq-len", "4096"], ["1024 positions"]),  # learned positions (wpe)
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


# --- what was scored: token budgets, splits, fingerprints ------------------------------------------------


def test_a_token_budget_scores_the_same_text_at_any_batch_size(runs):
    text = f"text:{runs['text']}"
    common = dict(checkpoint=str(runs["baseline"]), dataset=text, split="all", seq_len=16)
    small, large = (evaluate(EvalConfig(**common, batch_size=b, max_tokens=1000)) for b in (2, 8))
    assert small.scored == large.scored  # ceil(1000 / 16) = 63 samples, whatever the batch size
    assert small.scored["tokens"] == 63 * 16 and small.metrics["samples"] == 63
    assert small.metrics["loss"] == pytest.approx(large.metrics["loss"], rel=1e-5)
    # --max-batches counts batches: a different amount of text for another batch size.
    by_batches = [evaluate(EvalConfig(**common, batch_size=b, max_batches=8)).scored for b in (2, 8)]
    assert by_batches[0]["tokens"] * 4 == by_batches[1]["tokens"]
    assert by_batches[0]["fingerprint"] != by_batches[1]["fingerprint"]


def test_text_scores_the_held_out_split_unless_told(runs, tmp_path):
    tokens = {}
    for split in ("heldout", "all", "train"):
        out = tmp_path / f"{split}.json"
        args = ["--checkpoint", str(runs["baseline"]), "--dataset", f"text:{runs['text']}"]
        result = invoke(*args, *(["--split", split] if split != "heldout" else []), "--out", str(out))
        assert result.exit_code == 0, result.output
        record = read_result(out)
        assert record["scored"]["split"] == split and record["config"]["split"] == split
        tokens[split] = record["scored"]["tokens"]
    train, held_out = split_text(TEXT)
    assert tokens == {
        "heldout": (len(held_out) - 1) // 16 * 16,
        "all": (len(TEXT) - 1) // 16 * 16,
        "train": (len(train) - 1) // 16 * 16,
    }


def test_synthetic_data_records_its_test_stream(runs, tmp_path):
    out = tmp_path / "periodic.json"
    result = invoke("--checkpoint", str(runs["baseline"]), "--max-tokens", "100", "--out", str(out))
    assert result.exit_code == 0, result.output
    scored = read_result(out)["scored"]
    assert scored["dataset"] == "periodic" and scored["split"] == "test"
    assert scored["tokens"] == 112 and scored["samples"] == 7  # ceil(100 / 16) samples
    assert_one_line_error(invoke("--checkpoint", str(runs["baseline"]), "--split", "all"), "endless stream")
    assert_one_line_error(invoke("--model", "micro", "--split", "some"), "--split 'some'")


def test_max_tokens_and_max_batches_do_not_combine(runs):
    assert_one_line_error(
        invoke("--checkpoint", str(runs["baseline"]), "--max-tokens", "4k", "--max-batches", "2"),
        "--max-tokens and --max-batches",
    )
    assert_one_line_error(invoke("--model", "micro", "--force"), "--force only applies with --compare")


@pytest.fixture(scope="module")
def periodic_results(runs):
    """Eval results of the baseline run on periodic data: 64 tokens and 2 x 64 tokens."""
    paths = {}
    for name, batches in (("one", "1"), ("two", "2")):
        paths[name] = runs["root"] / f"periodic-{name}.json"
        args = ["--checkpoint", str(runs["baseline"]), "--max-batches", batches, "--out", str(paths[name])]
        assert invoke(*args).exit_code == 0
    return paths


def test_compare_refuses_results_scored_on_other_text(runs, periodic_results, tmp_path):
    this = ["--checkpoint", str(runs["toroidal"])]
    other = str(periodic_results["two"])
    # Another token count: refused before the work, in one line.
    refused = invoke(*this, "--max-batches", "1", "--compare", other)
    assert_one_line_error(refused, "--compare:", "scored 128 tokens", "this run 64 tokens", "--force")
    assert "loss" not in refused.stdout
    # The same count of other tokens (another seed): refused after the work, whose result is kept.
    out = tmp_path / "kept.json"
    late = invoke(*this, "--max-batches", "2", "--seed", "1", "--compare", other, "--out", str(out))
    assert_one_line_error(late, "--compare:", "fingerprint", "--force")
    kept = read_result(out)
    assert "comparison" not in kept and kept["scored"]["tokens"] == 128
    # The same text: compared.
    assert invoke(*this, "--max-batches", "2", "--compare", other).exit_code == 0


def test_force_compares_other_text_but_marks_it(runs, periodic_results, tmp_path):
    out = tmp_path / "forced.json"
    args = ["--checkpoint", str(runs["toroidal"]), "--max-batches", "1"]
    result = invoke(*args, "--compare", str(periodic_results["two"]), "--force", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "warning: compared across different text" in result.stderr
    assert "DIFFERENT TEXT" in result.stdout and "perplexity" in result.stdout
    comparison = read_result(out)["comparison"]
    assert comparison["same_text"] is False and "scored 128 tokens" in comparison["different_text"]
    assert comparison["rows"]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["refused", "forced"])
def test_the_gate_never_applies_across_texts(runs, periodic_results, force):
    # A huge threshold: the gate would pass on the numbers; it must not pass on other text.
    args = ["--checkpoint", str(runs["baseline"]), "--max-batches", "1", "--fail-on-regression", "1000"]
    result = invoke(*args, "--compare", str(periodic_results["two"]), *force)
    assert_one_line_error(result, "--fail-on-regression cannot apply", "scored 128 tokens")
    same = invoke(*args, "--compare", str(periodic_results["one"]), *force)
    assert same.exit_code == 0, same.output


def test_a_result_that_records_no_text_is_refused(runs, periodic_results, tmp_path):
    record = read_result(periodic_results["one"])
    del record["scored"]  # as an older toroidal eval wrote it
    old = tmp_path / "old.json"
    old.write_text(json.dumps(record))
    args = ["--checkpoint", str(runs["baseline"]), "--max-batches", "1", "--compare", str(old)]
    refused = invoke(*args)
    assert_one_line_error(refused, "does not record the text it scored", "--force")
    assert "loss" not in refused.stdout  # before the work
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0 and "warning: compared across different text" in forced.stderr
    assert_one_line_error(invoke(*args, "--force", "--fail-on-regression", "5"), "cannot apply")

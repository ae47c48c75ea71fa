"""`--mechanism` on every subcommand: train, eval, profile, bench and the lm-eval wrapper.

Each registered mechanism trains for two steps on the `micro` preset; its checkpoint must
rebuild the mechanism and compute what training measured. The test-only `gated` mechanism
(see test_mechanisms.py) carries learned weights and options through the whole round trip.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file
from test_mechanisms import GatedKernel
from typer.testing import CliRunner

from toroidal.integrations.transformers import KERNEL_ATTR, applied_mechanism, mechanism_layers
from toroidal.mechanisms import Mechanism, mechanism_names, registry
from toroidal.training import TrainConfig, evaluate_lm, load_run
from toroidal.training.data import make_dataset, parse_dataset_spec
from toroidal.training.mechanism import attention_label
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

MECHANISMS = mechanism_names()
MICRO = ["--model", "micro", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2"]
MICRO += ["--warmup-steps", "1", "--lr", "0.01", "--eval-every", "0"]
PROFILE = ["--seq-len", "16", "--d-model", "32", "--heads", "2", "--depth", "2", "--warmup", "0"]


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture
def gated(monkeypatch):
    mechanism = Mechanism("gated", "test: standard times a learned gain", GatedKernel, ("gain", "depth"))
    monkeypatch.setitem(registry._REGISTRY, "gated", mechanism)
    return "gated"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run of every registered mechanism, on the same data and budget."""
    root = tmp_path_factory.mktemp("mechanisms")
    runs = {}
    for name in MECHANISMS:
        result = invoke("train", *MICRO, "--mechanism", name, "--steps", "2", "--out", root / name)
        assert result.exit_code == 0, result.output
        assert f"toroidal train: {name} on periodic" in result.stdout
        runs[name] = root / name
    return runs


def validation_loss(run) -> float:
    spec, options = parse_dataset_spec("periodic"), run.config.data_options()
    dataset = make_dataset(spec, options, "validation", run.tokenizer)
    return evaluate_lm(run.model, dataset, batch_size=4, max_batches=2, device=torch.device("cpu"))["loss"]


# --- train and its checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MECHANISMS)
def test_train_records_the_mechanism_and_its_metrics(name, trained):
    record = read_result(trained[name] / "metrics.json", command="train")
    assert record["config"]["mechanism"] == name
    assert record["config"]["attention"] == attention_label(name)
    assert record["model"]["mechanism"] == name
    mechanism = record["mechanism"]
    assert mechanism["name"] == name and mechanism["layers"] == ([] if name == "standard" else [0, 1])
    assert isinstance(mechanism["metrics_mean"], dict)
    argv = record["command"]["argv"]
    assert argv[argv.index("--mechanism") + 1] == name and "--attention" not in argv
    assert (trained[name] / "mechanism.json").exists() == (name not in ("standard", "toroidal"))


@pytest.mark.parametrize("name", MECHANISMS)
def test_a_checkpoint_rebuilds_its_mechanism(name, trained):
    run = load_run(trained[name])
    assert run.mechanism == name and applied_mechanism(run.model) == name
    assert mechanism_layers(run.model) == ([] if name == "standard" else [0, 1])
    record = read_result(trained[name] / "metrics.json", command="train")
    assert validation_loss(run) == pytest.approx(record["final"]["val_loss"], abs=1e-6)


@pytest.mark.parametrize("name", MECHANISMS)
def test_eval_of_a_checkpoint_runs_its_own_mechanism(name, trained, tmp_path):
    out = tmp_path / "eval.json"
    result = invoke("eval", "--checkpoint", trained[name], "--max-batches", "1", "--out", out)
    assert result.exit_code == 0, result.output
    record = read_result(out, command="eval")
    assert record["config"]["mechanism"] == name and record["mechanism"]["name"] == name
    assert record["config"]["mechanism_layers"] == ([] if name == "standard" else [0, 1])


def test_learned_kernel_weights_and_options_survive_the_round_trip(gated, tmp_path):
    run_dir = tmp_path / "gated"
    args = ["train", *MICRO, "--mechanism", gated, "--mechanism-option", "gain=2.0", "--lr", "0.05"]
    result = invoke(*args, "--steps", "3", "--out", run_dir)
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "mechanism.json").read_text())
    assert saved["mechanism"] == gated and saved["options"]["gain"] == 2.0 and saved["layers"] == [0, 1]
    assert saved["options"]["depth"] == 2  # a torus flag the mechanism accepts
    record = read_result(run_dir / "metrics.json", command="train")
    assert record["mechanism"]["metrics"]["0"]["calls"] == 2  # the final validation pass: --eval-batches 2
    assert "gated: calls" in result.stdout
    argv = record["command"]["argv"]
    assert argv[argv.index("--mechanism-option") + 1] == "gain=2.0"

    tensors = load_file(str(run_dir / "model" / "model.safetensors"))
    gains = {k: v for k, v in tensors.items() if f".{KERNEL_ATTR}." in k}
    assert len(gains) == 2 and all((v - 2.0).abs().max() > 1e-4 for v in gains.values())  # trained
    run = load_run(run_dir)
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in gains.items())
    assert validation_loss(run) == pytest.approx(record["final"]["val_loss"], abs=1e-6)


def test_mechanism_options_come_from_yaml_too(gated, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mechanism: gated\nmechanism_options: {gain: 0.5}\nsteps: 1\n", encoding="utf-8")
    result = invoke("train", *MICRO, "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "mechanism.json").read_text())["options"]["gain"] == 0.5


def test_attention_stays_the_old_name_of_mechanism(trained, tmp_path):
    result = invoke("train", *MICRO, "--attention", "baseline", "--steps", "1", "--out", tmp_path / "old")
    assert result.exit_code == 0, result.output
    record = read_result(tmp_path / "old" / "metrics.json", command="train")
    assert record["config"]["mechanism"] == "standard"
    # A run saved before mechanisms existed: train_config.json knows only `attention`.
    path = trained["toroidal"] / "train_config.json"
    info = json.loads(path.read_text())
    for key in ("mechanism", "mechanism_options"):
        info["config"].pop(key)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "train_config.json").write_text(json.dumps(info))
    config = TrainConfig.from_dict(info["config"])
    assert config.mechanism == "toroidal"
    assert config.resume_conflicts(load_run(trained["toroidal"]).config) == []


# --- eval with a model, profile, bench, lm-eval --------------------------------------------------------


@pytest.mark.parametrize("name", MECHANISMS)
def test_eval_of_a_model_takes_a_mechanism(name, tmp_path):
    out = tmp_path / f"{name}.json"
    args = ["eval", "--model", "micro", "--mechanism", name, "--seq-len", "16", "--max-batches", "1"]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"toroidal eval: {name} micro" in result.stdout
    record = read_result(out, command="eval")
    assert record["config"]["mechanism"] == name and record["mechanism"]["name"] == name
    argv = record["command"]["argv"]
    assert argv[argv.index("--mechanism") + 1] == name and "--attention" not in argv


def test_eval_compare_across_mechanisms(trained, tmp_path):
    results = {}
    for name in ("standard", "toroidal"):
        results[name] = tmp_path / f"{name}.json"
        result = invoke("eval", "--checkpoint", trained[name], "--max-batches", "1", "--out", results[name])
        assert result.exit_code == 0, result.output
    args = ["eval", "--checkpoint", trained["toroidal"], "--max-batches", "1"]
    result = invoke(*args, "--compare", results["standard"])
    assert result.exit_code == 0, result.output
    assert "this run vs" in result.stdout and "perplexity" in result.stdout
    assert "mechanism: 'standard' -> 'toroidal'" in result.stdout


@pytest.mark.parametrize("name", MECHANISMS)
def test_profile_takes_a_mechanism(name, tmp_path):
    out = tmp_path / "profile.json"
    result = invoke("profile", *PROFILE, "--mechanism", name, "--mode", "fwd", "--out", out)
    assert result.exit_code == 0, result.output
    record = read_result(out, command="profile")
    stages = {row["stage"] for row in record["stages"]}
    assert {"projections", "kernel", "output"} <= stages
    assert ("rotary" in stages) == (name == "toroidal")  # a mechanism layer has no rotary of its own
    assert record["summary"]["mechanism"] == name and record["config"]["mechanism"] == name
    assert isinstance(record["summary"]["mechanism_metrics"], dict)


def test_profile_passes_mechanism_options(gated, tmp_path):
    out = tmp_path / "profile.json"
    result = invoke("profile", *PROFILE, "--mechanism", gated, "--option", "gain=3", "--out", out)
    assert result.exit_code == 0, result.output
    record = read_result(out, command="profile")
    assert record["config"]["kernel_options"] == {"depth": 2, "gain": 3}
    assert record["summary"]["mechanism_metrics"]["calls"] >= 1


@pytest.mark.parametrize("name", MECHANISMS)
def test_bench_takes_a_mechanism(name, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", *PROFILE, "--repeats", "1", "--no-isolate", "--mode", "fwd", "--mechanism", name]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_result(out, command="bench")["rows"]
    assert {row["mechanism"] for row in rows} == {name}
    assert any(row["status"] == "ok" for row in rows), rows  # toroidal: some backends skip on a CPU


@pytest.mark.parametrize("name", MECHANISMS)
def test_lm_eval_wrapper_takes_a_mechanism(name, trained):
    lm_eval = pytest.importorskip("toroidal.integrations.lm_eval")
    lm = lm_eval.ToroidalLM(pretrained="micro", mechanism=name, device="cpu")
    assert applied_mechanism(lm.model) == name and lm.loaded.attention == attention_label(name)
    trained_lm = lm_eval.ToroidalLM(checkpoint=str(trained[name]), device="cpu")
    assert applied_mechanism(trained_lm.model) == name
    baseline = lm_eval.ToroidalLM(checkpoint=str(trained[name]), mechanism="standard", device="cpu")
    assert applied_mechanism(baseline.model) == "standard"


def test_lm_eval_arguments_carry_mechanism_options(gated):
    lm_eval = pytest.importorskip("toroidal.integrations.lm_eval")
    spec = lm_eval.spec_from_args({"pretrained": "micro", "mechanism": gated, "gain": 3.0, "depth": 2})
    assert spec.mechanism == gated and spec.mechanism_options == {"gain": 3.0} and spec.depth == 2
    lm = lm_eval.ToroidalLM(pretrained="micro", mechanism=gated, gain=3.0, device="cpu")
    kernel = getattr(lm.model.model.layers[0].self_attn, KERNEL_ATTR)
    assert torch.equal(kernel.gain, torch.full_like(kernel.gain, 3.0))


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--mechanism", "nope"], ["--mechanism", "unknown mechanism 'nope'", "standard"]),
        (["train", "--mechanism-option", "depth=4"], ["toroidal takes its options as flags", "--depth"]),
        (["train", "--mechanism", "standard", "--mechanism-option", "x=1"], ["'standard' takes no options"]),
        (["train", "--mechanism", "tiled", "--mechanism-option", "budget"], ["is not NAME=VALUES"]),
        (["train", "--attention", "baseline", "--mechanism", "toroidal"], ["disagree", "drop --attention"]),
        (["train", "--mechanism", "standard", "--layers", "0"], ["--layers has no effect"]),
        (["eval", "--model", "micro", "--mechanism", "nope"], ["unknown mechanism 'nope'"]),
        (["profile", "--mechanism", "nope"], ["unknown mechanism 'nope'"]),
        (["profile", "--mechanism", "toroidal", "--option", "budget=2"], ["--option budget", "axis flags"]),
        (["profile", "--mechanism", "standard", "--option", "x=1,2"], ["one value per option"]),
    ],
)
def test_mistakes_are_one_line(args, fragments, tmp_path):
    extra = ["--out", tmp_path / "run"] if args[0] == "train" else []
    assert_one_line_error(invoke(*args, *(MICRO[:2] if args[0] != "profile" else []), *extra), *fragments)


def test_a_checkpoint_keeps_its_mechanism(trained):
    result = invoke("eval", "--checkpoint", trained["standard"], "--mechanism", "toroidal")
    assert_one_line_error(result, "--mechanism cannot change a checkpoint", "--model")


def test_unknown_options_of_a_mechanism_are_one_line(gated, tmp_path):
    args = ["train", *MICRO, "--mechanism", gated, "--mechanism-option", "tile=3", "--out", tmp_path / "r"]
    assert_one_line_error(invoke(*args), "--mechanism-option tile", "takes gain, depth")

"""`toroidal train` and `toroidal.training.train`: learning, resume, atomic checkpoints, DDP, errors.

Every run uses the `micro` preset (2 layers, 32 wide) on a few short samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file
from typer.testing import CliRunner

from toroidal.training import TrainConfig, train
from toroidal.training import checkpoint as checkpoint_module
from toroidal.training import loop as loop_module
from toroidal.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from toroidal.training.models import add_toroidal, build_model, make_toroidal_config, resolve_model
from toroidal.training.tokenization import ByteTokenizer
from toroidal_cli.app import app
from toroidal_cli.results import read_result

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
# Small and fast: every run below takes a second or two.
MICRO = dict(model="micro", seq_len=16, batch_size=4, eval_batches=2, warmup_steps=2, lr=0.01)
MICRO_FLAGS = ["--model", "micro", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2"]
MICRO_FLAGS += ["--warmup-steps", "2", "--lr", "0.01"]
TIMING_KEYS = ("created", "timing", "command")


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{**MICRO, **overrides})


def invoke(*args: str):
    return runner.invoke(app, ["train", *args])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def losses(result) -> list[float]:
    return [entry["loss"] for entry in result.payload["loss_curve"]]


class Stop(Exception):
    """Raised from the progress callback to simulate a crash."""


def stop_after(step: int):
    def progress(event):
        if event.kind == "step" and event.step == step:
            raise Stop

    return progress


# --- learning ------------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_on_periodic_data(tmp_path, capfd):
    result = train(config(steps=20, eval_every=10), tmp_path / "run")
    assert capfd.readouterr() == ("", "")  # the library never prints (nor do the libraries it calls)
    curve = losses(result)
    assert curve[-1] < curve[0] - 1.0, curve
    validation = result.payload["validation"]
    assert [entry["step"] for entry in validation] == [10, 20]
    assert validation[-1]["loss"] < validation[0]["loss"]
    assert result.payload["final"]["val_perplexity"] == pytest.approx(
        torch.tensor(validation[-1]["loss"]).exp().item(), rel=1e-6
    )


def test_the_run_folder_has_model_tokenizer_configs_and_fusion_weights(tmp_path):
    run = tmp_path / "run"
    result = train(config(steps=2, layers=[1]), run)
    for name in ("train_config.json", "toroidal.json", "model/config.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "tokenizer" / "toroidal_tokenizer.json").is_file()
    fusion = [key for key in weights(run) if "toroidal_fusion" in key]
    assert fusion and all(".layers.1." in key for key in fusion)
    saved = json.loads((run / "toroidal.json").read_text())
    assert saved["layers"] == [1] and saved["config"]["max_len"] == 16 and saved["config"]["rope"] == "none"
    assert result.config["toroidal_layers"] == [1] and result.payload["model"]["toroidal_layers"] == [1]


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big = train(config(steps=3, batch_size=4), tmp_path / "big")
    accumulated = train(config(steps=3, batch_size=2, grad_accum=2), tmp_path / "acc")
    assert losses(accumulated) == pytest.approx(losses(big), abs=1e-5)
    assert big.payload["final"]["tokens"] == accumulated.payload["final"]["tokens"] == 3 * 4 * 16


def test_token_budget_sets_the_number_of_steps(tmp_path):
    result = train(config(tokens=200, eval_every=0), tmp_path / "run")  # 64 tokens per step
    assert result.payload["final"]["step"] == 4 and result.config["total_steps"] == 4


def test_freeze_base_trains_only_the_chosen_attention_layers(tmp_path):
    run = tmp_path / "run"
    result = train(config(steps=3, layers=[0], freeze_base=True, lr=0.05), run)
    initial = build_model(resolve_model("micro"), ByteTokenizer(), 16, seed=0).state_dict()
    trained = weights(run)
    changed = {key for key, value in initial.items() if not torch.equal(value, trained[key])}
    assert changed and all(key.startswith("model.layers.0.self_attn.") for key in changed)
    assert any("toroidal_fusion" in key for key in trained)
    model = result.payload["model"]
    assert model["trainable_parameters"] < model["parameters"] / 4


@pytest.mark.parametrize(
    "preset",
    [
        "family: gpt2\nn_embd: 32\nn_layer: 2\nn_head: 4\nn_positions: 64\n",
        "family: phi\nhidden_size: 64\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
        "intermediate_size: 64\nmax_position_embeddings: 64\npartial_rotary_factor: 0.5\n",
    ],
    ids=["gpt2", "phi"],
)
def test_other_model_families_train_from_a_preset_file(tmp_path, preset):
    path = tmp_path / "family.yaml"
    path.write_text(preset, encoding="utf-8")
    result = train(config(model=str(path), steps=2, eval_every=0), tmp_path / "run")
    assert result.payload["final"]["step"] == 2 and result.payload["model"]["toroidal_layers"] == [0, 1]


# --- resume and checkpoints --------------------------------------------------------------------------


def test_resume_gives_exactly_the_uninterrupted_run(tmp_path):
    whole = train(config(steps=6, save_every=2, eval_every=3), tmp_path / "whole")
    with pytest.raises(Stop):
        train(config(steps=6, save_every=2, eval_every=3), tmp_path / "cut", progress=stop_after(5))
    assert [step for step, _ in list_checkpoints(tmp_path / "cut")] == [4]  # only the newest is kept
    resumed = train(config(steps=6, save_every=2, eval_every=3), tmp_path / "cut", resume=True)
    assert resumed.payload["resumed_from_step"] == 4
    assert losses(resumed) == losses(whole)  # bit-exact, not approximately
    assert resumed.payload["validation"] == whole.payload["validation"]
    cut, full = weights(tmp_path / "cut"), weights(tmp_path / "whole")
    assert cut.keys() == full.keys() and all(torch.equal(cut[k], full[k]) for k in full)


def test_resume_refuses_changed_options(tmp_path):
    train(config(steps=2, save_every=1), tmp_path / "run")
    with pytest.raises(ValueError, match="lr"):
        train(config(steps=2, save_every=1, lr=0.5), tmp_path / "run", resume=True)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    saves = []
    real = checkpoint_module._save_optimizer

    def crash_on_second_save(optimizer, folder):
        saves.append(folder)
        if len(saves) == 2:
            (folder / "optimizer.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")
        real(optimizer, folder)

    monkeypatch.setattr(checkpoint_module, "_save_optimizer", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(config(steps=4, save_every=2), run)
    monkeypatch.undo()
    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no temp folder left
    # A process killed mid-save leaves its temp folder: it is ignored, then cleaned up.
    (run / "checkpoints" / ".tmp-step-00000004-999").mkdir()
    assert latest_checkpoint(run).name == "step-00000002"
    model = build_model(resolve_model("micro"), ByteTokenizer(), 16, seed=0)
    add_toroidal(model, make_toroidal_config(config().toroidal_options(), 16), None)
    state = load_checkpoint(latest_checkpoint(run), model, loop_module.make_optimizer(model, config()))
    assert state["step"] == 2 and len(state["history"]) == 2
    resumed = train(config(steps=4, save_every=2), run, resume=True)
    whole = train(config(steps=4, save_every=2), tmp_path / "whole")
    assert losses(resumed) == losses(whole)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    train(config(steps=2, save_every=2), tmp_path / "run")
    folder = latest_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == sorted(checkpoint_module.FILES)
    meta = json.loads((folder / "optimizer.json").read_text())
    assert meta["param_groups"][0]["betas"] == [0.9, 0.95]
    assert any(key.endswith("/exp_avg") for key in load_file(str(folder / "optimizer.safetensors")))


# --- the command -------------------------------------------------------------------------------------


def test_train_command_writes_a_run_folder_and_metrics(tmp_path):
    out = tmp_path / "run"
    result = invoke(*MICRO_FLAGS, "--steps", "4", "--eval-every", "2", "--log", "csv", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "validation" in result.stdout and "val perplexity" in result.stdout
    record = read_result(out / "metrics.json", command="train")
    assert record["config"]["model"] == "micro" and record["config"]["attention"] == "toroidal"
    assert record["env"]["torch"] == torch.__version__
    assert [entry["step"] for entry in record["loss_curve"]] == [1, 2, 3, 4]
    assert set(record["loss_curve"][0]) >= {"step", "loss", "lr", "tokens"}
    assert [entry["step"] for entry in record["validation"]] == [2, 4]
    assert {"loss", "perplexity", "bits_per_byte"} <= set(record["validation"][0])
    assert record["timing"]["tokens_per_s"] > 0 and record["final"]["val_loss"] is not None
    assert "--config" not in record["command"]["argv"] and record["command"]["argv"][:2] == [
        "toroidal",
        "train",
    ]
    log = (out / "log.csv").read_text().splitlines()
    assert log[0] == "step,metric,value" and any(",val/loss," in line for line in log)


def test_same_command_and_seed_give_identical_metrics(tmp_path):
    records, runs = [], []
    for name in ("a", "b"):
        runs.append(tmp_path / name)
        result = invoke(*MICRO_FLAGS, "--steps", "3", "--eval-every", "3", "--out", str(runs[-1]))
        assert result.exit_code == 0, result.output
        record = read_result(runs[-1] / "metrics.json")
        records.append({key: value for key, value in record.items() if key not in TIMING_KEYS})
    assert records[0] == records[1]
    first, second = weights(runs[0]), weights(runs[1])
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_yaml_config_with_flags_overriding(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: micro\ndataset: sinusoidal\nseq-len: 16\nsteps: 5\nbatch_size: 2\nlambda: 0.3\n")
    out = tmp_path / "run"
    result = invoke("--config", str(path), "--steps", "2", "--eval-every", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = read_result(out / "metrics.json")
    cfg = record["config"]
    assert (cfg["steps"], cfg["dataset"], cfg["seq_len"], cfg["batch_size"]) == (2, "sinusoidal", 16, 2)
    assert cfg["lambda_distance"] == 0.3 and cfg["toroidal"]["lambda_distance"] == 0.3
    argv = record["command"]["argv"]
    assert "--config" not in argv and argv[argv.index("--dataset") + 1] == "sinusoidal"


def test_shipped_presets_are_valid(tmp_path):
    for preset in sorted((REPO / "configs" / "train").glob("*.yaml")):
        result = invoke("--config", str(preset), "--out", str(tmp_path / "x"), "--device", "tpu")
        assert_one_line_error(result, "unknown device")  # every key parsed; stopped before any work


def test_cli_resume_after_an_interrupt_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    args = [*MICRO_FLAGS, "--steps", "4", "--save-every", "2", "--eval-every", "0"]
    assert invoke(*args, "--out", str(tmp_path / "whole")).exit_code == 0
    real = loop_module._train_step

    def interrupted(model, setup, optimizer, scaler, cfg, step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        return real(model, setup, optimizer, scaler, cfg, step, *rest)

    monkeypatch.setattr(loop_module, "_train_step", interrupted)
    result = invoke(*args, "--out", str(tmp_path / "cut"))
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.undo()
    result = invoke(*args, "--out", str(tmp_path / "cut"), "--resume")
    assert result.exit_code == 0, result.output
    whole = read_result(tmp_path / "whole" / "metrics.json")
    cut = read_result(tmp_path / "cut" / "metrics.json")
    assert cut["loss_curve"] == whole["loss_curve"] and cut["resumed_from_step"] == 2


def test_bpe_tokenizer_is_trained_on_the_text_and_saved(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(
        "".join(f"the torus has {i} platters and a ring of period {i % 7}.\n" for i in range(300))
    )
    out = tmp_path / "run"
    result = invoke(
        *MICRO_FLAGS, "--dataset", f"text:{text}", "--tokenizer", "bpe:300", "--steps", "2", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    record = read_result(out / "metrics.json")
    assert record["config"]["vocab_size"] <= 300 and record["config"]["tokenizer"] == "bpe"
    assert record["final"]["val_bits_per_byte"] > 0


def test_passkey_training_reports_accuracy(tmp_path):
    result = train(config(dataset="passkey", seq_len=100, steps=2, passkey_digits=3), tmp_path / "run")
    assert 0.0 <= result.payload["final"]["val_passkey_accuracy"] <= 1.0
    assert result.payload["final"]["val_bits_per_byte"] == pytest.approx(
        result.payload["final"]["val_bits_per_token"]
    )  # byte tokenizer: one byte per token


def test_a_local_model_folder_trains(tmp_path):
    train(config(steps=1, attention="baseline"), tmp_path / "first")
    result = train(
        config(model=str(tmp_path / "first" / "model"), tokenizer="bytes", steps=1, eval_every=0),
        tmp_path / "second",
    )
    assert result.payload["model"]["source"].endswith("model")


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dataset", "imagenet"], ["unknown dataset 'imagenet'", "text:PATH"]),
        (["--dataset", "text:/no/such/file.txt"], ["/no/such/file.txt does not exist"]),
        (["--model", "nobody/no-such-model"], ["needs the Hugging Face hub", "not reachable", "preset"]),
        (["--model", "./missing-folder"], ["unknown model", "preset"]),
        (["--dataset", "wikitext2"], ["not reachable", "text:wikitext-2/valid.txt"]),
        (["--precision", "bf16", "--device", "cpu"], ["needs a CUDA device"]),
        (["--precision", "fp8"], ["--precision", "fp8"]),
        (["--layers", "0,7"], ["--layers 7 does not exist"]),
        (["--depth", "3"], ["depth"]),
        (["--tokenizer", "model"], ["--tokenizer model needs a local or hub model"]),
        (["--steps", "3", "--tokens", "100"], ["not both"]),
        (["--steps", "zero"], ["--steps"]),
        (["--attention", "linear"], ["--attention"]),
        (["--attention", "baseline", "--layers", "0"], ["--layers has no effect"]),
        (["--config", "no-such-preset"], ["unknown train preset"]),
        (["--seed", str(2**64)], ["--seed", "out of range"]),
        (["--dataset", "passkey", "--passkey-digits", "19"], ["--passkey-digits 19", "1 to 18"]),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch, args, fragments):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never try the network from tests
    assert_one_line_error(
        invoke(*MICRO_FLAGS, "--steps", "1", "--out", str(tmp_path / "run"), *args), *fragments
    )
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_an_empty_text_file_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = tmp_path / "run"
    result = invoke(*MICRO_FLAGS, "--steps", "1", "--dataset", f"text:{empty}", "--out", str(run))
    assert_one_line_error(result, "has 0 tokens", "--seq-len")


def test_a_run_folder_that_cannot_be_created_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    result = invoke(*MICRO_FLAGS, "--steps", "1", "--out", str(blocker / "run"))
    assert_one_line_error(result, "cannot write --out", "is not a folder")
    assert blocker.read_text() == "kept"


def test_a_folder_holding_other_files_is_refused_and_kept(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "metrics.json").write_text("mine")
    assert_one_line_error(invoke(*MICRO_FLAGS, "--steps", "1", "--out", str(folder)), "is not empty")
    assert (folder / "metrics.json").read_text() == "mine"


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    assert invoke(*MICRO_FLAGS, "--steps", "1", "--out", str(run)).exit_code == 0
    before = (run / "metrics.json").read_bytes()
    result = invoke(*MICRO_FLAGS, "--steps", "2", "--resume", "--out", str(run))
    assert_one_line_error(result, "nothing to resume", "no checkpoint", "--save-every")
    assert (run / "metrics.json").read_bytes() == before


def test_missing_logger_package_fails_at_startup(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    assert_one_line_error(
        invoke(*MICRO_FLAGS, "--log", "tensorboard", "--out", str(tmp_path / "run")),
        "tensorboard package",
        "csv",
    )


def test_an_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    out = tmp_path / "run"
    assert invoke(*MICRO_FLAGS, "--steps", "1", "--eval-every", "0", "--out", str(out)).exit_code == 0
    assert_one_line_error(
        invoke(*MICRO_FLAGS, "--steps", "1", "--out", str(out)), "already holds", "--resume"
    )
    assert_one_line_error(
        invoke(*MICRO_FLAGS, "--resume", "--out", str(tmp_path / "new")), "nothing to resume"
    )
    assert_one_line_error(invoke(*MICRO_FLAGS, "--resume"), "--resume needs --out")


def test_bad_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: micro\nlearning_rate: 0.1\n")
    assert_one_line_error(invoke("--config", str(path)), "unknown key(s) learning_rate")


# --- data parallel -----------------------------------------------------------------------------------


def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    """2 processes x batch 2 = 1 process x batch 4: the same samples, averaged gradients."""
    out = tmp_path / "ddp"
    flags = [*MICRO_FLAGS, "--steps", "3", "--eval-every", "3", "--save-every", "3"]
    flags[flags.index("--batch-size") + 1] = "2"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*launch, "-m", "toroidal_cli", "train", *flags, "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stdout.count("wrote ") == 1  # rank 0 alone renders and writes
    record = read_result(out / "metrics.json", command="train")
    assert record["config"]["world_size"] == 2 and record["final"]["tokens"] == 3 * 4 * 16
    single = train(config(steps=3, eval_every=3, device="cpu"), tmp_path / "single")
    assert [e["loss"] for e in record["loss_curve"]] == pytest.approx(losses(single), abs=1e-5)
    assert record["final"]["val_loss"] == pytest.approx(single.payload["final"]["val_loss"], abs=1e-5)
    assert latest_checkpoint(out) is not None


# --- options and logging -----------------------------------------------------------------------------


def test_gradient_checkpointing_computes_the_same_steps(tmp_path):
    plain = train(config(steps=2, eval_every=0), tmp_path / "plain")
    checkpointed = train(config(steps=2, eval_every=0, grad_checkpointing=True), tmp_path / "ckpt")
    assert losses(checkpointed) == pytest.approx(losses(plain), abs=1e-6)


def test_token_counts_take_suffixes(tmp_path):
    out = tmp_path / "run"
    result = invoke(*MICRO_FLAGS, "--tokens", "0.2k", "--eval-every", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = read_result(out / "metrics.json")
    assert record["config"]["tokens"] == 200 and record["final"]["step"] == 4


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (the tensorboard package is optional)."""

    scalars: list = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, name, value, step):
        FakeWriter.scalars.append((name, step))

    def close(self):
        pass


class FakeWandbRun:
    logged: list = []

    def log(self, metrics, step):
        FakeWandbRun.logged.append((step, sorted(metrics)))

    def finish(self):
        pass


def test_tensorboard_and_wandb_loggers_receive_metrics(tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    train(config(steps=2, eval_every=2, log="tensorboard"), tmp_path / "tb")
    assert ("train/loss", 2) in FakeWriter.scalars and ("val/loss", 2) in FakeWriter.scalars

    started = {}

    def init(**kwargs):
        started.update(kwargs, mode=os.environ.get("WANDB_MODE"))
        return FakeWandbRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for name in ("WANDB_MODE", "WANDB_API_KEY"):  # set, then delete: undo removes what the logger sets
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    train(config(steps=1, eval_every=0, log="wandb"), tmp_path / "wb")
    assert (
        started["mode"] == "offline" and started["project"] == "toroidal" and started["config"]["steps"] == 1
    )
    assert FakeWandbRun.logged[0][0] == 1 and "train/loss" in FakeWandbRun.logged[0][1]

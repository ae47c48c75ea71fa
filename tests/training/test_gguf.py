"""Local GGUF models: resolving a file or folder, loading it as a plain float model, `--freeze-base`
runs on it that save only what they train (and load back exactly), resume, a changed base, a model
that cannot be saved. Every model is the tiny GGUF of tests/gguf_fixture.py (no download)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf_fixture import tokens, write_tiny_gguf
from helpers import assert_one_line_error
from safetensors.torch import load_file
from typer.testing import CliRunner

from toroidal.training import TrainConfig, load_run, train
from toroidal.training import evaluate as evaluate_module
from toroidal.training import loop as loop_module
from toroidal.training.attention_maps import trained_attention_weights
from toroidal.training.checkpoint import latest_checkpoint
from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.frozen import BASE_FILE, TRAINED_FILE, sha256
from toroidal.training.models import build_model, resolve_model, source_tokenizer
from toroidal.training.runs import RESCUED, check_savable
from toroidal_cli.app import app

runner = CliRunner()
TEXT = "".join(
    f"the cat {i} sat on the mat in the rain; then another ran {i * 7 % 13} times.\n" for i in range(120)
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder holding the tiny GGUF model and a text to train on."""
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "model" / "tiny.gguf")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root


def own_copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of the model a test may change."""
    path = tmp_path / "base" / "tiny.gguf"
    path.parent.mkdir()
    shutil.copy(folder / "model" / "tiny.gguf", path)
    return path


def config(folder: Path, model, **overrides) -> TrainConfig:
    options = dict(
        model=str(model), dataset=f"text:{folder / 'text.txt'}", seq_len=16, batch_size=2, eval_batches=2,
        warmup_steps=1, lr=0.01, eval_every=0, steps=2,
    )  # fmt: skip
    return TrainConfig(**{**options, **overrides})


def sample(model) -> torch.Tensor:
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def losses(result) -> list[float]:
    return [entry["loss"] for entry in result.payload["loss_curve"]]


def keep_trained_model(monkeypatch) -> dict:
    """The trained model as training ends (before it is saved)."""
    kept = {}
    save = loop_module.save_model

    def saving(model, run_dir, frozen=None):
        kept["model"] = model
        return save(model, run_dir, frozen)

    monkeypatch.setattr(loop_module, "save_model", saving)
    return kept


# --- resolving and loading ------------------------------------------------------------------------------


def test_a_gguf_file_or_its_folder_is_a_model(folder, tmp_path):
    path = folder / "model" / "tiny.gguf"
    for spec in (path, folder / "model"):
        source = resolve_model(str(spec))
        assert (source.kind, Path(source.name), source.file, source.path) == (
            "gguf",
            path.parent,
            "tiny.gguf",
            path,
        )
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(path, two / name)
    with pytest.raises(SetupError, match="several GGUF files"):
        resolve_model(str(two))
    with pytest.raises(SetupError, match="does not exist"):
        resolve_model(str(tmp_path / "none.gguf"))
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:40])
    with pytest.raises(SetupError, match="not a readable GGUF file"):
        resolve_model(str(tmp_path / "cut.gguf"))


def test_it_loads_as_a_plain_float_model_that_saves_and_reloads(folder, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    source = resolve_model(str(folder / "model" / "tiny.gguf"))
    tokenizer = source_tokenizer(source)  # the GGUF's own
    model = build_model(source, tokenizer, None, seed=0)
    assert capfd.readouterr() == ("", "")  # the library never prints (no progress bar of the GGUF reader)
    assert tokenizer.kind == "model" and tokenizer.vocab_size == len(tokens())
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert (
        getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    )
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(sample(model), sample(again))
    half = build_model(source, tokenizer, None, seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


# --- --freeze-base runs ---------------------------------------------------------------------------------


def test_a_frozen_base_run_saves_only_what_it_trained_and_loads_back_exactly(folder, tmp_path, monkeypatch):
    path, run = folder / "model" / "tiny.gguf", tmp_path / "run"
    kept = keep_trained_model(monkeypatch)
    result = train(config(folder, path, steps=3, layers=[0], freeze_base=True), run)
    assert sorted(p.name for p in (run / "model").iterdir()) == sorted(
        ["config.json", BASE_FILE, TRAINED_FILE]
    )
    base = json.loads((run / "model" / BASE_FILE).read_text(encoding="utf-8"))
    assert base == {
        "kind": "gguf", "path": str(path.resolve()), "name": "tiny.gguf",
        "size": path.stat().st_size, "sha256": sha256(path),
    }  # fmt: skip
    assert result.config["base"] == base  # also in the result record
    saved = load_file(str(run / "model" / TRAINED_FILE))
    assert saved and all(key.startswith("model.layers.0.self_attn.") for key in saved)
    assert any("toroidal_fusion" in key for key in saved)
    assert sum(t.numel() for t in saved.values()) == result.payload["model"]["trainable_parameters"]

    loaded = load_run(run)
    assert torch.equal(sample(kept["model"]), sample(loaded.model))
    drawn = trained_attention_weights(run, "the cat sat", max_tokens=256)  # `toroidal plot attention`
    assert drawn.layer == 0 and drawn.weights.shape[0] == len(drawn.tokens) * drawn.depth
    # `toroidal eval --checkpoint` scores the same loss as the model that was trained, in memory.
    out = tmp_path / "eval.json"
    done = runner.invoke(app, ["eval", "--checkpoint", str(run), "--max-batches", "2", "--out", str(out)])
    assert done.exit_code == 0, done.output
    from_folder = json.loads(out.read_text(encoding="utf-8"))["metrics"]["loss"]
    in_memory = loaded.__class__(**{**loaded.__dict__, "model": kept["model"]})
    monkeypatch.setattr(evaluate_module, "load_run", lambda checkpoint: in_memory)
    as_eval_does = {**evaluate_module.run_defaults(str(run)), "checkpoint": str(run), "max_batches": 2}
    trained = evaluate_module.evaluate(evaluate_module.EvalConfig(**as_eval_does))
    assert trained.metrics["loss"] == from_folder


def test_resume_on_a_frozen_base_is_exact_and_checkpoints_are_small(folder, tmp_path):
    path = own_copy(folder, tmp_path)
    options = dict(mechanism="standard", layers=[1], freeze_base=True, steps=4, save_every=2)
    whole = train(config(folder, path, **options), tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(config(folder, path, **options), tmp_path / "cut", progress=stop_at_3)
    kept = load_file(str(latest_checkpoint(tmp_path / "cut") / "model.safetensors"))
    assert sorted(kept) == [f"model.layers.1.self_attn.{p}_proj.weight" for p in ("k", "o", "q", "v")]
    resumed = train(config(folder, path, **options), tmp_path / "cut", resume=True)
    assert resumed.payload["resumed_from_step"] == 2 and losses(resumed) == losses(whole)
    cut = load_file(str(tmp_path / "cut" / "model" / TRAINED_FILE))
    full = load_file(str(tmp_path / "whole" / "model" / TRAINED_FILE))
    assert cut.keys() == full.keys() and all(torch.equal(cut[k], full[k]) for k in full)

    # One changed byte in the base: resuming and loading are refused, naming the path and hash expected.
    expected = sha256(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SetupError, match="base model differs"):
        train(config(folder, path, **options), tmp_path / "cut", resume=True)
    with pytest.raises(CheckpointError, match=f"{path.resolve()}, has changed .*expected SHA-256 {expected}"):
        load_run(tmp_path / "whole")
    assert_one_line_error(
        runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "whole"), "--max-batches", "1"]),
        str(path.resolve()),
        f"expected SHA-256 {expected}",
    )
    path.unlink()
    assert_one_line_error(
        runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "whole"), "--max-batches", "1"]),
        "is missing",
        expected,
    )


def test_a_model_folder_base_is_named_by_its_files(folder, tmp_path):
    source = resolve_model(str(folder / "model"))
    build_model(source, source_tokenizer(source), None, seed=0).save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    options = dict(mechanism="standard", layers=[0], freeze_base=True, tokenizer="bytes")
    train(config(folder, tmp_path / "base", **options), run)
    base = json.loads((run / "model" / BASE_FILE).read_text(encoding="utf-8"))
    assert base["kind"] == "local" and base["path"] == str((tmp_path / "base").resolve())
    assert [f["name"] for f in base["files"]] == ["config.json", "model.safetensors"]
    assert not (run / "model" / "model.safetensors").exists()
    load_run(run)
    weights = tmp_path / "base" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=f"{weights.resolve()} has changed"):
        load_run(run)


def test_a_full_fine_tune_of_a_gguf_model_saves_the_whole_model(folder, tmp_path, monkeypatch):
    kept = keep_trained_model(monkeypatch)
    run = tmp_path / "run"
    train(config(folder, folder / "model", mechanism="standard", steps=1), run)
    assert (run / "model" / "model.safetensors").is_file() and not (run / "model" / BASE_FILE).exists()
    assert torch.equal(sample(kept["model"]), sample(load_run(run).model))


def test_a_saved_tensor_that_does_not_fit_the_model_is_refused(folder, tmp_path):
    run = tmp_path / "run"
    train(
        config(folder, folder / "model" / "tiny.gguf", mechanism="standard", layers=[0], freeze_base=True),
        run,
    )
    from toroidal.training.frozen import save_tensors

    saved = load_file(str(run / "model" / TRAINED_FILE))
    name = "model.layers.0.self_attn.q_proj.weight"
    save_tensors({**saved, name: saved[name][:4]}, run / "model" / TRAINED_FILE)
    with pytest.raises(CheckpointError, match=f"{name} has shape"):
        load_run(run)
    save_tensors({k: v for k, v in saved.items() if k != name}, run / "model" / TRAINED_FILE)
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        load_run(run)


# --- saving ---------------------------------------------------------------------------------------------


def test_a_model_that_cannot_be_saved_is_refused_before_training(folder):
    source = resolve_model(str(folder / "model"))
    model = build_model(source, source_tokenizer(source), None, seed=0)
    check_savable(model)

    class Quantizer:
        quantization_config = type("Config", (), {"quant_method": "gguf"})()

        def is_serializable(self, safe_serialization=None):
            return False

    model.hf_quantizer = Quantizer()
    with pytest.raises(SetupError, match="refuses a model quantized with gguf.*--freeze-base"):
        check_savable(model)
    model.hf_quantizer = None
    model.config.not_json = object()
    with pytest.raises(SetupError, match="config is not JSON"):
        check_savable(model)


@pytest.mark.parametrize("frozen", [False, True], ids=["preset", "frozen-gguf"])
def test_a_save_error_after_training_keeps_the_trained_parameters(folder, tmp_path, monkeypatch, frozen):
    kept = keep_trained_model(monkeypatch)

    def full_disk(model, run_dir, frozen=None):
        kept["model"] = model
        raise OSError("No space left on device")

    monkeypatch.setattr(loop_module, "save_model", full_disk)
    run = tmp_path / "run"
    args = ["train", "--dataset", f"text:{folder / 'text.txt'}", "--seq-len", "16", "--batch-size", "2"]
    args += ["--steps", "2", "--eval-every", "0", "--eval-batches", "1", "--out", str(run)]
    args += (
        ["--model", str(folder / "model"), "--layers", "1", "--freeze-base"]
        if frozen
        else ["--model", "micro"]
    )
    done = runner.invoke(app, args)
    assert done.exit_code == 1 and "Traceback" not in done.output
    last = done.stderr.strip().splitlines()[-1]  # after the progress lines
    assert "No space left on device" in last and str(run / RESCUED) in last, last
    rescued = load_file(str(run / RESCUED))
    model = kept["model"]
    state = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(rescued) <= set(state)
    assert all(torch.equal(rescued[name], state[name]) for name in rescued)
    if frozen:
        assert all(".layers.1.self_attn." in name for name in rescued)


# --- one-line errors ------------------------------------------------------------------------------------


def test_gguf_errors_are_one_line(folder, tmp_path, monkeypatch):
    text = ["--dataset", f"text:{folder / 'text.txt'}", "--seq-len", "16", "--max-batches", "1"]
    other = write_tiny_gguf(tmp_path / "rwkv" / "other.gguf", architecture="rwkv6")
    assert_one_line_error(
        runner.invoke(app, ["eval", "--model", str(other), *text]), "cannot load GGUF architecture 'rwkv6'"
    )
    (tmp_path / "junk.gguf").write_bytes(b"GGML" + bytes(60))
    assert_one_line_error(
        runner.invoke(app, ["eval", "--model", str(tmp_path / "junk.gguf"), *text]),
        "not a readable GGUF file",
    )
    cut = tmp_path / "cut" / "cut.gguf"  # its header whole, its tensors cut short
    cut.parent.mkdir()
    cut.write_bytes((folder / "model" / "tiny.gguf").read_bytes()[:100_000])
    assert_one_line_error(runner.invoke(app, ["eval", "--model", str(cut), *text]), "cannot load", str(cut))
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if the package were not installed
    assert_one_line_error(
        runner.invoke(app, ["eval", "--model", str(folder / "model"), *text]),
        "needs gguf, from the eval extra: pip install",
    )

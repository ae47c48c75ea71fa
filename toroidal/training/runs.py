"""The folder of a training run, and loading a trained model back from it.

    train_config.json   the run's options (TrainConfig) and what was derived from them
    toroidal.json       the ToroidalConfig and layers (toroidal runs only)
    mechanism.json      name, options and layers of any other mechanism but standard
    model/              save_pretrained: config.json + model.safetensors (fusion parameters included);
                        a --freeze-base run on a pretrained model (folder, hub, GGUF file) instead keeps
                        config.json, base.json (the base's path, size and SHA-256) and
                        trained.safetensors (the trained parameters): see frozen.py
    tokenizer/          the tokenizer (see tokenization.py)
    checkpoints/        training state for --resume (see checkpoint.py)
    metrics.json        the result record (written by the CLI)
    log.csv, tensorboard/, wandb/   with --log

Everything is written to a temp name and renamed, so a folder never holds half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from toroidal.config import ToroidalConfig
from toroidal.training.checkpoint import list_checkpoints
from toroidal.training.config import TrainConfig
from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.frozen import BASE_FILE, FrozenBase, load_frozen_model
from toroidal.training.models import load_checkpoint_model
from toroidal.training.tokenization import load_tokenizer

TRAIN_CONFIG = "train_config.json"
TOROIDAL_CONFIG = "toroidal.json"
MECHANISM_CONFIG = "mechanism.json"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
METRICS = "metrics.json"
RESCUED = "trained_parameters.safetensors"  # written only when the model itself could not be saved


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist", f"pass a folder written by `toroidal train` as {what}"
        ) from None
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON: {error}", f"pass a folder written by `toroidal train` as {what}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def holds_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (
        (run_dir / TRAIN_CONFIG).exists() or bool(list_checkpoints(run_dir)) or (run_dir / MODEL_DIR).exists()
    )


def replace_folder(write, target: Path) -> None:
    """Run `write(tmp_folder)`, then swap the result in for `target` (the old one stays until then)."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, run_dir: Path, frozen: FrozenBase | None = None) -> Path:
    """The trained model into `run_dir/model`: whole, or only what it trained on the `frozen` base."""
    from toroidal.training.models import quiet_transformers

    def write(folder: Path) -> None:
        if frozen is not None:
            frozen.save(model, folder)
            return
        with quiet_transformers():
            model.save_pretrained(folder)  # safetensors, fusion parameters included

    replace_folder(write, Path(run_dir) / MODEL_DIR)
    return Path(run_dir) / MODEL_DIR


def check_savable(model, frozen: FrozenBase | None = None) -> None:
    """SetupError now, before any training, where `save_model` would refuse the model at the end."""
    try:
        model.config.to_json_string()  # config.json, written by either kind of save
    except Exception as error:  # a value JSON cannot hold
        raise SetupError(
            f"the model cannot be saved: its config is not JSON ({_first_line(error)})",
            "use another model",
        ) from None
    quantizer = getattr(model, "hf_quantizer", None)
    if frozen is None and quantizer is not None and not quantizer.is_serializable():
        method = getattr(quantizer.quantization_config, "quant_method", "its quantization")
        raise SetupError(
            f"the model cannot be saved whole: save_pretrained refuses a model quantized with "
            f"{getattr(method, 'value', method)}",
            "train with --freeze-base (only the trained parameters are saved) or use an unquantized model",
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_tokenizer(tokenizer, run_dir: Path) -> None:
    replace_folder(tokenizer.save, Path(run_dir) / TOKENIZER_DIR)


def save_toroidal(run_dir: Path, config: ToroidalConfig, layers: list[int]) -> None:
    write_json(Path(run_dir) / TOROIDAL_CONFIG, {"config": config.to_dict(), "layers": layers})


def save_mechanism(run_dir: Path, name: str, options: dict, layers: list[int]) -> None:
    write_json(Path(run_dir) / MECHANISM_CONFIG, {"mechanism": name, "options": options, "layers": layers})


def read_mechanism(run_dir: Path) -> tuple[str, dict, list[int]]:
    data = read_json(Path(run_dir) / MECHANISM_CONFIG, "--checkpoint")
    try:
        return str(data["mechanism"]), dict(data["options"]), list(data["layers"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{Path(run_dir) / MECHANISM_CONFIG} is corrupt: {error}") from None


def read_train_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    """(the run's TrainConfig, the whole train_config.json)."""
    info = read_json(Path(run_dir) / TRAIN_CONFIG, "--checkpoint")
    try:
        return TrainConfig.from_dict(info["config"]), info
    except (KeyError, TypeError, SetupError) as error:
        raise CheckpointError(f"{Path(run_dir) / TRAIN_CONFIG} is not a training config: {error}") from None


def read_toroidal(run_dir: Path) -> tuple[ToroidalConfig, list[int]]:
    data = read_json(Path(run_dir) / TOROIDAL_CONFIG, "--checkpoint")
    try:
        return ToroidalConfig.from_dict(data["config"]), list(data["layers"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{Path(run_dir) / TOROIDAL_CONFIG} is corrupt: {error}") from None


@dataclass
class TrainedRun:
    model: object
    tokenizer: object
    config: TrainConfig
    toroidal: ToroidalConfig | None
    layers: list[int] | None
    mechanism: str = "toroidal"  # the run's mechanism (see toroidal.training.mechanism)
    mechanism_options: dict | None = None  # options of a mechanism other than toroidal and standard


def finished_run(run_dir: str | Path) -> tuple[TrainConfig, Path]:
    """(the run's TrainConfig, its model folder) of a run folder whose training finished."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"checkpoint folder {run_dir} does not exist", "pass a folder written by `toroidal train --out`"
        )
    config, _ = read_train_config(run_dir)
    if not (run_dir / MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"{run_dir} has no trained model ({MODEL_DIR}/ is missing: the run did not finish)",
            "resume it with `toroidal train --resume` or pick another folder",
        )
    return config, run_dir / MODEL_DIR


def load_run(run_dir: str | Path) -> TrainedRun:
    """The trained model of a run folder, its mechanism's layers and weights restored, in eval mode."""
    run_dir = Path(run_dir)
    config, _ = finished_run(run_dir)
    toroidal, layers = read_toroidal(run_dir) if config.mechanism == "toroidal" else (None, None)
    kernel = None
    if config.mechanism not in ("toroidal", "standard"):
        name, options, layers = read_mechanism(run_dir)
        kernel = (name, options)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    if (run_dir / MODEL_DIR / BASE_FILE).is_file():  # the trained parameters of a pretrained base
        attached = layers if toroidal is not None or kernel is not None else None
        trained = layers if attached is not None else config.layers
        folder = run_dir / MODEL_DIR
        model = load_frozen_model(folder, tokenizer, toroidal, attached, kernel, config.seed, trained)
    else:
        model = load_checkpoint_model(run_dir / MODEL_DIR, toroidal, layers, kernel, config.position)
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > vocab:
        raise CheckpointError(
            f"{run_dir}: the tokenizer ({tokenizer.vocab_size} tokens) does not fit the model ({vocab})"
        )
    return TrainedRun(model, tokenizer, config, toroidal, layers, config.mechanism, kernel and kernel[1])

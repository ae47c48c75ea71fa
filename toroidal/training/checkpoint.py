"""Training checkpoints: safetensors and JSON only (loading never unpickles), written atomically.

A checkpoint is a folder `checkpoints/step-00000100/` holding

    model.safetensors        every model tensor (shared tensors once); a --freeze-base run on a
                             pretrained base: only the tensors it trains (see frozen.py)
    optimizer.safetensors    the optimizer's per-parameter tensors, keyed "<param index>/<name>"
    optimizer.json           its param groups and non-tensor state
    trainer_state.json       step, tokens, loss history, evaluations, elapsed time, GradScaler state

It is written into `checkpoints/.tmp-...` and renamed into place once complete, and older
checkpoints are removed only after that: a process killed at any moment leaves the last
complete checkpoint loadable (a leftover `.tmp-*` folder is ignored and later removed).
There is no RNG state to save: the data order and every random draw are functions of
(seed, step, rank), see `loop.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from toroidal.training.errors import CheckpointError
from toroidal.training.frozen import FORMAT, load_trained, save_tensors

FOLDER = "checkpoints"
_STEP = re.compile(r"step-(\d+)")
FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json")


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temp folders are not checkpoints)."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# --- optimizer state as tensors + JSON --------------------------------------------------------------


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value.detach().contiguous().cpu()
            else:
                plain[f"{index}/{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, template: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["plain"].items()]:
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for saved, current in zip(meta["param_groups"], template["param_groups"], strict=True):
        # JSON turned tuples (betas) into lists: give values back the optimizer's own types.
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


# --- writing -----------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _save_model(model, folder: Path, tensors: dict[str, torch.Tensor] | None) -> None:
    if tensors is None:
        save_model(model, str(folder / "model.safetensors"))
    else:
        save_tensors(tensors, folder / "model.safetensors")


def _save_optimizer(optimizer, folder: Path) -> None:
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", meta)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    keep: int = 1,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically; then keep only the newest `keep` checkpoints.

    `tensors`: save only these model tensors (what a run on a frozen base trains), not the whole model."""
    root = Path(run_dir) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = step_folder(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        _save_model(model, tmp, tensors)
        _save_optimizer(optimizer, tmp)
        _write_json(tmp / "trainer_state.json", trainer_state)
        for name in FILES:
            _fsync(tmp / name)
        if final.exists():  # the same step saved again (e.g. resumed and saved before training on)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {error}") from None


def _trained_only(path: Path) -> bool:
    """Whether a model file holds only trained tensors (`frozen.save_tensors`)."""
    with safe_open(str(path), framework="pt") as file:
        return (file.metadata() or {}).get("format") == FORMAT


def load_checkpoint(folder: Path, model, optimizer, trained: set[str] | None = None) -> dict:
    """Restore model and optimizer from a checkpoint folder; returns its trainer state.

    `trained`: the names of the tensors a run on a frozen base saves; a checkpoint holding only
    trained tensors must hold exactly these."""
    folder = Path(folder)
    state = _read_json(folder / "trainer_state.json")
    meta = _read_json(folder / "optimizer.json")
    path = folder / "model.safetensors"
    try:
        if _trained_only(path):
            if trained is None:
                raise CheckpointError(
                    f"checkpoint {folder} holds only the trained tensors of a frozen base",
                    "resume with the options the run was started with (--freeze-base)",
                )
            load_trained(model, load_file(str(path)), trained, str(path))
            missing, unexpected = [], []
        else:
            missing, unexpected = load_model(model, str(path), strict=False)
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint file {error.filename} is missing") from None
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        raise CheckpointError(f"checkpoint {folder} cannot be read: {error}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})",
            "resume with the options the run was started with",
        )
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta, optimizer.state_dict()))
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder}: optimizer state does not match: {error}") from None
    return state

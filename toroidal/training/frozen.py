"""Runs that train a few parameters of a pretrained model (`--freeze-base` on a model folder, hub
model or GGUF file): the run folder keeps those parameters and the base's identity, not a copy of it.

    model/config.json           the host's config (memory estimates read it)
    model/base.json             the base: kind, absolute path, and size and SHA-256 of its files
    model/trained.safetensors   the trained parameters and every tensor the mechanism added

Loading rebuilds the base, checks its files against base.json (a changed or missing base is a
one-line CheckpointError naming the path and hash expected), attaches the mechanism as trained and
loads the saved tensors strictly: each must name a tensor of the model with its shape, and every
tensor the mechanism added must be among them. A preset's base is its seed-initialized model:
those runs save the whole model as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.mechanism import add_mechanism
from toroidal.training.models import (
    ModelSource,
    add_toroidal,
    build_model,
    check_layers,
    freeze_base,
    resolve_model,
)

BASE_FILE = "base.json"
TRAINED_FILE = "trained.safetensors"
FORMAT = "toroidal-trained"  # the safetensors metadata `format` of a file of trained tensors only
_WEIGHTS = (".safetensors", ".bin")  # a model folder's weight files (with its config.json and index)
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path)}


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in _WEIGHTS or p.name == "config.json" or p.name.endswith(".index.json"))
    )


def base_identity(source: ModelSource, model: nn.Module | None = None) -> dict | None:
    """What names a pretrained base exactly (None for a preset): a GGUF file's absolute path, size and
    SHA-256; a model folder's path and its config and weight files; a hub name and revision."""
    if source.kind == "gguf":
        path = source.path.resolve()
        return {"kind": "gguf", "path": str(path), **_file_record(path)}
    if source.kind == "local":
        folder = Path(source.name).resolve()
        files = [_file_record(p) for p in _folder_files(folder)]
        return {"kind": "local", "path": str(folder), "files": files}
    if source.kind == "hub":
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        return {"kind": "hub", "name": source.name, "revision": revision}
    return None


def _changed(path: Path, record: dict) -> str | None:
    """Why the file at `path` is not the one `record` describes, or None when it is."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != record["size"] or sha256(path) != record["sha256"]:
        return f"has changed (its SHA-256 is {sha256(path)})"
    return None


def check_base(identity: dict, run: str) -> ModelSource:
    """The base model `identity` describes, its files checked; CheckpointError when they differ."""
    try:
        kind = identity["kind"]
        if kind == "gguf":
            path = Path(identity["path"])
            why = _changed(path, identity)
            if why is not None:
                raise CheckpointError(
                    f"the base model of {run}, {path}, {why}: expected SHA-256 {identity['sha256']}",
                    "put the base model the run was trained on back at that path",
                )
            return resolve_model(str(path))
        if kind == "local":
            folder = Path(identity["path"])
            for record in identity["files"]:
                why = _changed(folder / record["name"], record)
                if why is not None:
                    raise CheckpointError(
                        f"the base model of {run}: {folder / record['name']} {why}: "
                        f"expected SHA-256 {record['sha256']}",
                        "put the base model folder the run was trained on back at that path",
                    )
            return ModelSource("local", str(folder))
        if kind == "hub":
            return resolve_model(str(identity["name"]))
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{run}: {BASE_FILE} is corrupt: {error}") from None
    except SetupError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"the base model of {run}: {error.message}", error.fix) from None
    raise CheckpointError(f"{run}: {BASE_FILE} names an unknown kind of base model {kind!r}")


@dataclass(frozen=True)
class FrozenBase:
    """A pretrained base and the tensor names it has before a mechanism is attached."""

    identity: dict
    base_keys: frozenset[str]

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a run of this base saves: the trainable parameters, and whatever the mechanism
        added (its parameters and buffers), by state-dict name."""
        state = model.state_dict()
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        names |= set(state) - self.base_keys
        return {name: state[name] for name in sorted(names)}

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write config.json, base.json and trained.safetensors into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(str(folder / "config.json"))
        (folder / BASE_FILE).write_text(json.dumps(self.identity, indent=2) + "\n", encoding="utf-8")
        save_tensors(self.trained_state(model), folder / TRAINED_FILE)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors as safetensors, each its own copy (tied tensors would share memory, which it refuses)."""
    from safetensors.torch import save_file

    copies = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    save_file(copies, str(path), metadata={"format": FORMAT})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as error:  # safetensors raises its own type for a corrupt header
        raise CheckpointError(f"cannot read {path}: {str(error).strip() or type(error).__name__}") from None


def load_trained(model: nn.Module, saved: dict[str, torch.Tensor], expected: set[str], where: str) -> None:
    """Load `saved` into `model` strictly: exactly the tensors named `expected`, each with the model's
    shape for it. CheckpointError otherwise."""
    state = model.state_dict()
    unknown = sorted(set(saved) - set(state))
    wrong = sorted(k for k in saved if k in state and tuple(saved[k].shape) != tuple(state[k].shape))
    missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected - set(unknown))
    problem = None
    if unknown:
        problem = f"{unknown[0]} is not a tensor of the model"
    elif wrong:
        name = wrong[0]
        problem = f"{name} has shape {tuple(saved[name].shape)}, the model's {tuple(state[name].shape)}"
    elif missing:
        problem = f"{missing[0]} is missing"
    elif extra:
        problem = f"{extra[0]} is not trained by this run's options"
    if problem is not None:
        raise CheckpointError(
            f"the tensors in {where} do not match the model ({problem})",
            "load it with the base model and options the run was trained with",
        )
    model.load_state_dict(saved, strict=False)


def load_frozen_model(
    folder: Path,
    tokenizer,
    toroidal: ToroidalConfig | None,
    layers: list[int] | None,
    mechanism: tuple[str, dict] | None,
    seed: int,
    trained_layers: list[int] | None,
) -> nn.Module:
    """The model of a run folder saved by `FrozenBase.save`, in eval mode (see the module doc).

    `toroidal` or `mechanism` with `layers`: what the run attached; `trained_layers`: the layers whose
    attention `--freeze-base` trained (None: all)."""
    folder = Path(folder)
    try:
        identity = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {folder / BASE_FILE}: {error}") from None
    if not isinstance(identity, dict):
        raise CheckpointError(f"{folder / BASE_FILE} is not a JSON object")
    run = str(folder.parent)
    source = check_base(identity, run)
    saved = load_tensors(folder / TRAINED_FILE)
    try:
        model = build_model(source, tokenizer, None, seed)
        base_keys = frozenset(model.state_dict())
        trained_layers = check_layers(model, trained_layers)
        if toroidal is not None:
            add_toroidal(model, toroidal, layers)
        if mechanism is not None:
            add_mechanism(model, *mechanism, layers)
    except SetupError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"the base model of {run}: {error.message}", error.fix) from None
    revision = identity.get("revision")
    if identity.get("kind") == "hub" and revision and getattr(model.config, "_commit_hash", None) != revision:
        raise CheckpointError(
            f"the base model of {run}, hub model {identity.get('name')}, is now at revision "
            f"{model.config._commit_hash}: expected {revision}",
        )
    freeze_base(model, trained_layers)  # which tensors the run trained, as it trained them
    expected = set(FrozenBase(identity, base_keys).trained_state(model))
    model.requires_grad_(True)  # as any loaded model
    load_trained(model, saved, expected, str(folder / TRAINED_FILE))
    return model.eval()

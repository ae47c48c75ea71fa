"""Paths written in a config file are relative to that file, and a file cannot send writes elsewhere.

`toroidal train --config exp/a.yaml` with `dataset: text:data/a.txt` reads `exp/data/a.txt` from
any working directory, and `out: runs/a` writes `exp/runs/a`. An output path that leaves the
config file's folder (`out: ../../elsewhere`, an absolute path outside it) is refused rather than
followed silently: writing there must be asked for on the command line (`--out`).
"""

from __future__ import annotations

import os
from pathlib import Path

from toroidal_cli.errors import UserError

TEXT_PREFIX = "text:"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def relative_to_file(
    values: dict, config_file: Path, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ("out",)
) -> dict:
    """`values` read from `config_file` with its input and output paths resolved against its folder.

    - `dataset: text:PATH`: PATH relative to the file;
    - `model`: a folder or YAML preset next to the file wins over a preset or hub name of that spelling;
    - `inputs` (e.g. `checkpoint`): relative to the file;
    - `outputs` (e.g. `out`): relative to the file, and refused when they leave its folder.
    """
    folder = Path(config_file).parent
    resolved = dict(values)
    for key in inputs:
        if isinstance(resolved.get(key), str):
            path = Path(resolved[key]).expanduser()
            resolved[key] = os.path.normpath(path if path.is_absolute() else folder / path)
    dataset = resolved.get("dataset")
    if isinstance(dataset, str) and dataset.strip().startswith(TEXT_PREFIX):
        path = Path(dataset.strip()[len(TEXT_PREFIX) :]).expanduser()
        resolved["dataset"] = TEXT_PREFIX + os.path.normpath(path if path.is_absolute() else folder / path)
    model = resolved.get("model")
    if isinstance(model, str) and model.strip() and (folder / model.strip()).exists():
        resolved["model"] = os.path.normpath(folder / model.strip())
    for key in outputs:
        value = resolved.get(key)
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        path = path if path.is_absolute() else folder / path
        if not _inside(path, folder):
            raise UserError(
                f"config {config_file}: {key} {value} would write outside the config file's folder "
                f"{folder.resolve()}",
                f"pass --{key.replace('_', '-')} on the command line to write there",
            )
        resolved[key] = path
    return resolved

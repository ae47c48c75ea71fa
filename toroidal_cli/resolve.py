"""Where an option's value comes from: the command line, then a YAML config, then the default.

A `--config` is a YAML file or a preset name (looked up in ./configs/<kind>, then in the shipped
configs of `toroidal.runtime.install`). Its keys are the option names in snake_case ('seq-len' =
'seq_len'); a flag given on the command line wins over the file's key.
"""

from __future__ import annotations

from pathlib import Path

import typer

from toroidal.runtime.install import config_folders
from toroidal_cli.errors import UserError


def from_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the option parameter `name` was given on the command line (not defaulted)."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "COMMANDLINE"  # duck-typed: typer may vendor click


def flag_name(name: str) -> str:
    """The flag of a parameter name: lambda_ -> --lambda, seq_len -> --seq-len."""
    return "--" + name.rstrip("_").replace("_", "-")


def config_path(spec: str, kind: str) -> Path:
    """A YAML config: a path, or a preset name looked up in ./configs/<kind>, then in the shipped ones."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise UserError(f"config file {spec} does not exist", "pass a YAML file or a preset name")
        return path
    folders = config_folders(kind)
    for folder in folders:
        for suffix in (".yaml", ".yml"):
            if (folder / f"{spec}{suffix}").is_file():
                return folder / f"{spec}{suffix}"
    names = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.y*ml")})
    raise UserError(
        f"unknown {kind} preset {spec!r}",
        f"choose one of {', '.join(names)} or pass a YAML file" if names else "pass a YAML file",
    )


def load_config(path: Path, known_keys: tuple[str, ...]) -> dict:
    """A YAML mapping, keys in snake_case ('seq-len' = 'seq_len') and checked against `known_keys`."""
    import yaml  # only commands with configs need it

    fix = "fix the YAML file"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read config {path}: {error.strerror}", "check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text", "save the YAML file as UTF-8") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise UserError(f"config {path} is not valid YAML{at}: {problem}", fix) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of option names to values", fix)
    config = {str(key).strip().replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(config) - set(known_keys))
    if unknown:
        raise UserError(
            f"config {path}: unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(known_keys)}"
        )
    return config

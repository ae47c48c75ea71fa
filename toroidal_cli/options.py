"""Options shared by commands (device, dtype, output file), parsed into library values or a UserError."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from toroidal.runtime import devices
from toroidal_cli.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def parse_device(text: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    try:
        return devices.parse_device(text)
    except devices.DeviceError as error:
        raise UserError(error.message, error.fix) from None


def parse_dtype(text: str) -> torch.dtype:
    """'fp32', 'fp16' or 'bf16' (and their torch spellings)."""
    spec = text.strip().lower()
    spec = _DTYPE_ALIASES.get(spec, spec)
    if spec not in DTYPES:
        raise UserError(f"unknown dtype {text!r}", f"use --dtype {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def invocation_argv(ctx: typer.Context, given_only: bool = False, exclude: tuple[str, ...] = ()) -> list[str]:
    """The command line that reproduces this run: `toroidal <command>` and every option's resolved value
    (`given_only`: only the options given on the command line, so a --config file still applies;
    `exclude`: parameter names to leave out)."""
    argv = ["toroidal", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        if param.name in exclude:
            continue
        value = ctx.params.get(param.name)
        kind = getattr(param, "param_type_name", "")  # duck-typed: typer may vendor click
        source = getattr(ctx.get_parameter_source(param.name), "name", None)
        if given_only and kind == "option" and source != "COMMANDLINE":
            continue
        if kind == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            argv.extend(str(item) for item in values if item is not None)
        elif kind == "option" and value is not None:
            if param.is_flag and isinstance(value, bool):
                names = param.opts if value else param.secondary_opts
                argv.extend(names[:1])
            elif param.multiple:
                for item in value:
                    argv.extend([param.opts[0], str(item)])
            else:
                argv.extend([param.opts[0], str(value)])
    return argv


def check_can_create_in(folder: Path, path: Path, option: str) -> None:
    """Fail when `folder` (created if missing) could not hold the `option` file or folder `path`."""
    while not folder.exists():  # the folders that would be created: check where they would go
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {option} {path}: {folder} is not a folder", f"choose another {option}")
    try:  # a real probe: os.access says yes to root on read-only or virtual file systems
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        fix = "check the path and permissions"
        raise UserError(f"cannot write {option} {path}: {error.strerror}", fix) from None


def check_out_path(path: Path | None, option: str = "--out") -> Path | None:
    """Fail before the work, not after it, when `option`'s file could not be written."""
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder", f"give {option} a file name inside it")
    check_can_create_in(path.absolute().parent, path, option)
    return path


# --- sweep values and YAML configs (bench, profile; any command with presets) ---------------------

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # presets of a source checkout


def split_items(value) -> list:
    """A flag's comma list ('256, 1024'), a YAML list, or one YAML scalar, as a list of items."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))


def parse_int(value, where: str, minimum: int = 1, none_ok: bool = False) -> int | None:
    """An integer >= `minimum` from a flag string or a YAML value; 'none' too if `none_ok`."""
    if none_ok and _is_none(value):
        return None
    wanted = f"an integer >= {minimum}" + (" or 'none'" if none_ok else "")
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not {wanted}")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise UserError(f"{where}: {value!r} is not {wanted}") from None
    if not isinstance(number, int) or number < minimum:
        raise UserError(f"{where}: {value!r} is not {wanted}")
    return number


def parse_float(value, where: str, minimum: float = 0.0) -> float:
    """A finite number >= `minimum` from a flag string or a YAML value."""
    try:
        number = float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        number = None
    valid = isinstance(number, (int, float)) and not isinstance(number, bool)
    if not valid or not minimum <= number < float("inf"):
        raise UserError(f"{where}: {value!r} is not a number >= {minimum:g}")
    return float(number)


def parse_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise UserError(f"{where}: {value!r} is not true or false")


def config_path(spec: str, kind: str) -> Path:
    """A YAML config: a path, or a preset name looked up in ./configs/<kind>, then in the checkout's."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise UserError(f"config file {spec} does not exist", "pass a YAML file or a preset name")
        return path
    folders = [Path("configs") / kind, REPO_CONFIGS / kind]
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


TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let a hub model run the Python code in its repository (off: only transformers' own code runs).",
    ),
]

"""Options shared by commands (device, dtype, output file), parsed into library values or a UserError.

Options stay strings until the command runs: the parsers here import torch (through
`toroidal.runtime.devices`) when called, so building the app and `--help` import none.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from toroidal_cli.errors import UserError

if TYPE_CHECKING:
    import torch


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32', 'fp16', 'bf16' or 'fp64': the names of the one dtype table."""
    from toroidal.runtime import devices

    return devices.dtype_name(dtype)


def parse_device(text: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    from toroidal.runtime import devices

    try:
        return devices.parse_device(text)
    except devices.DeviceError as error:
        raise UserError(error.message, error.fix) from None


def parse_dtype(text: str) -> torch.dtype:
    """'fp32', 'fp16', 'bf16' or 'fp64' (and their torch spellings)."""
    from toroidal.runtime import devices

    try:
        return devices.parse_dtype(text)
    except devices.DeviceError as error:
        raise UserError(error.message, error.fix) from None


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


OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Also write the result JSON to this file.")]

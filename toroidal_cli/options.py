"""Options shared by commands (device, dtype, output file), parsed into library values or a UserError."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import typer

from toroidal_cli.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def parse_device(text: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    spec = text.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise UserError(f"unknown device {text!r}", "use --device cpu, cuda or cuda:N")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {text!r} is not available: this torch sees no CUDA GPU", "use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"device {text!r} does not exist: {count} CUDA device(s) visible",
                f"use --device cuda:0 to cuda:{count - 1}",
            )
    return device


def parse_dtype(text: str) -> torch.dtype:
    """'fp32', 'fp16' or 'bf16' (and their torch spellings)."""
    spec = text.strip().lower()
    spec = _DTYPE_ALIASES.get(spec, spec)
    if spec not in DTYPES:
        raise UserError(f"unknown dtype {text!r}", f"use --dtype {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def invocation_argv(ctx: typer.Context) -> list[str]:
    """The command line that reproduces this run: `toroidal <command>` and every option's resolved value."""
    argv = ["toroidal", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        kind = getattr(param, "param_type_name", "")  # duck-typed: typer may vendor click
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


def check_out_path(path: Path | None) -> Path | None:
    """Fail before the work, not after it, when --out cannot be a result file."""
    if path is not None and path.is_dir():
        raise UserError(f"--out {path} is a folder", "give --out a file name such as results/run.json")
    return path

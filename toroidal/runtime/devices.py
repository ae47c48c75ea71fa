"""Device and dtype names from users, checked against this machine; THE dtype table."""

from __future__ import annotations

import re

import torch

# The dtype table: the short names that flags, results and tuning tables use...
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# ...and the other spellings accepted for them (torch's names and C's).
DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
    "float64": "fp64", "double": "fp64",
}  # fmt: skip


class DeviceError(ValueError):
    """An unusable device or dtype name. `message` names the problem, `fix` what to do instead."""

    def __init__(self, message: str, fix: str):
        super().__init__(f"{message}; {fix}")
        self.message, self.fix = message, fix


def parse_device(text: str, allow_auto: bool = False) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (and 'auto': CUDA if there is one, when allowed)."""
    spec = text.strip().lower()
    if allow_auto and spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        names = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
        raise DeviceError(f"unknown device {text!r}", f"use --device {names}")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {text!r} is not available: this torch sees no CUDA GPU", "use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"device {text!r} does not exist: {count} CUDA device(s) visible",
                f"use --device cuda:0 to cuda:{count - 1}",
            )
    return device


def parse_dtype(text: str) -> torch.dtype:
    """A name of DTYPES or DTYPE_ALIASES, in any case."""
    spec = text.strip().lower()
    spec = DTYPE_ALIASES.get(spec, spec)
    if spec not in DTYPES:
        raise DeviceError(f"unknown dtype {text!r}", f"use --dtype {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype of the table ('fp32', 'fp16', 'bf16', 'fp64'); ValueError for another."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no name; the table has {', '.join(DTYPES)}")

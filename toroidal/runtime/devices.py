"""Device names from users ('auto', 'cpu', 'cuda', 'cuda:N'), checked against this machine."""

from __future__ import annotations

import re

import torch


class DeviceError(ValueError):
    """An unusable device name. `message` names the problem, `fix` what to do instead."""

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

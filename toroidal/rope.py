"""Rotary encodings over (position, platter): `standard`, `orthogonal`, `periodic`, `none`
(docs/internals.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from toroidal.config import ROPE_MODES


def _rope_schedule(half: int, base: float) -> torch.Tensor:
    return base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / (2 * half))


def _orthogonal_to(reference: torch.Tensor) -> torch.Tensor:
    """A vector orthogonal to `reference`, with the same norm (zero if impossible, i.e. 1 pair)."""
    ramp = torch.linspace(1.0, 0.0, reference.numel(), dtype=torch.float64)
    if reference.numel() < 2:
        return torch.zeros_like(reference)
    unit = reference / reference.norm()
    ortho = ramp - (ramp @ unit) * unit
    return ortho / ortho.norm() * reference.norm()


def periodic_multiples(half: int, period: int, base: float) -> torch.Tensor:
    """Integer multiples m_j >= 1 so that seq_freq_j = 2*pi*m_j/P follows the RoPE schedule."""
    target = period / (2 * math.pi) * _rope_schedule(half, base)
    return target.round().clamp(1, max(1, period // 2)).to(torch.int64)


def frequency_bases(mode: str, platter_width: int, base: float, period: int | None = None):
    """(seq_freqs, platter_freqs), float64 tensors of length w/2."""
    if mode not in ROPE_MODES:
        raise ValueError(f"rope mode {mode!r} must be one of {', '.join(ROPE_MODES)}")
    half = platter_width // 2
    if mode == "none":
        zeros = torch.zeros(half, dtype=torch.float64)
        return zeros, zeros
    if mode == "periodic":
        if period is None:
            raise ValueError("periodic rope needs a period")
        seq = 2 * math.pi * periodic_multiples(half, period, base).to(torch.float64) / period
        return seq, _orthogonal_to(seq)
    seq = _rope_schedule(half, base)
    return seq, (seq.clone() if mode == "standard" else _orthogonal_to(seq))


def orthogonality_score(mode: str, platter_width: int, base: float = 10000.0, period: int = 2048) -> float:
    """Max absolute cosine between the sequence and platter frequency bases (0 = orthogonal)."""
    seq, plat = frequency_bases(mode, platter_width, base, period)
    if seq.norm() == 0 or plat.norm() == 0:
        return 0.0
    return float(abs(seq @ plat) / (seq.norm() * plat.norm()))


class ToroidalRotary(nn.Module):
    """Applies the (position, platter) rotation to per-head tensors (B, H, N, e)."""

    def __init__(self, mode: str, head_dim: int, depth: int, base: float = 10000.0):
        super().__init__()
        if mode not in ROPE_MODES:
            raise ValueError(f"rope mode {mode!r} must be one of {', '.join(ROPE_MODES)}")
        self.mode, self.depth, self.base = mode, depth, base
        self.platter_width = head_dim // depth
        if mode != "none" and self.platter_width % 2:
            raise ValueError(f"rope needs an even platter width, got {self.platter_width}")
        self._cache: dict = {}

    def _cos_sin(self, start: int, n: int, period: int | None, device, dtype):
        key = (start, n, period if self.mode == "periodic" else None, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        seq, plat = frequency_bases(self.mode, self.platter_width, self.base, period)
        positions = torch.arange(start, start + n, dtype=torch.float64)
        if self.mode == "periodic":
            # Reduce i * m mod P in exact integer arithmetic: the angle is then exactly periodic.
            multiples = periodic_multiples(self.platter_width // 2, period, self.base)
            wrapped = (torch.arange(start, start + n)[:, None] * multiples[None, :]) % period
            seq_angle = 2 * math.pi * wrapped.to(torch.float64) / period
        else:
            seq_angle = positions[:, None] * seq[None, :]
        platters = torch.arange(self.depth, dtype=torch.float64)
        angle = seq_angle[:, None, :] + platters[None, :, None] * plat[None, None, :]  # (N, D, w/2)
        cos_sin = (angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype))
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = cos_sin
        return cos_sin

    def forward(self, x: torch.Tensor, start: int = 0, period: int | None = None) -> torch.Tensor:
        """Rotate x (B, H, N, e) whose first position is `start`."""
        if self.mode == "none":
            return x
        b, h, n, e = x.shape
        cos, sin = self._cos_sin(start, n, period, x.device, x.dtype)
        half = self.platter_width // 2
        xp = x.reshape(b, h, n, self.depth, self.platter_width)
        x1, x2 = xp[..., :half], xp[..., half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.reshape(b, h, n, e)

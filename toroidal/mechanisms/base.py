"""The kernel-module contract of every mechanism, and the standalone layer built around one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from toroidal.config import TORUS_OPTIONS, ToroidalConfig
from toroidal.runtime.timing import stage


class KernelModule(nn.Module):
    """Per-head attention of one mechanism (see `toroidal.mechanisms`). Subclasses implement `forward`.

    `sliding_window` W is a host model's key window, |i - j| < W on top of the mechanism's
    own rules; hosts pass it only where it is in effect (a kernel without the keyword then
    still serves every other layer and call).
    """

    serves_sliding_window = True  # False: the kernel refuses a host window in effect (hosts check first)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = True,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
        q_offset: int = 0,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def get_metrics(self) -> dict:
        """What this kernel measured since the last `reset_metrics()` (empty for exact mechanisms)."""
        return {}

    def reset_metrics(self) -> None:
        """Forget the measured metrics (nothing to forget by default)."""


@dataclass(frozen=True)
class Mechanism:
    """A mechanism: a name, a one-line description and its kernel builder."""

    name: str
    description: str
    build_kernel: Callable[..., KernelModule]  # (heads, head_dim, **options) -> kernel module
    accepts: tuple[str, ...] = ()  # the option names `build_kernel` takes
    # The mechanism this one approximates ("toroidal", "standard"), or None when it is exact
    # or a different attention altogether; `toroidal bench` reports the error against it.
    approximates: str | None = None


def check_options(mechanism: str, options: dict, accepted: tuple[str, ...]) -> None:
    """Raise ValueError naming the accepted options when `options` has an unknown key."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(accepted) if accepted else "none"
        raise ValueError(
            f"mechanism {mechanism!r}: unknown option(s) {', '.join(unknown)}; accepted: {known}"
        )


def torus_config(heads: int, head_dim: int, options: dict) -> ToroidalConfig:
    """The torus of a kernel for `heads` heads of width `head_dim`: the `TORUS_OPTIONS` among
    `options` (the others are the mechanism's own), no rotary encoding (the caller's)."""
    torus = {name: value for name, value in options.items() if name in TORUS_OPTIONS}
    return ToroidalConfig(d_model=heads * head_dim, n_heads=heads, rope="none", **torus)


class MechanismAttention(nn.Module):
    """(B, N, d_model) -> (B, N, d_model): q/k/v projection, the kernel, output projection.

    `attention_mask` is (B, N), 1 for real tokens (Hugging Face convention). Exposes the
    kernel's `get_metrics()` and `reset_metrics()`.
    """

    def __init__(self, kernel: KernelModule, d_model: int, n_heads: int, *, causal: bool, bias: bool = True):
        super().__init__()
        self.kernel, self.d_model, self.n_heads, self.causal = kernel, d_model, n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x of shape (B, N, {self.d_model}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        with stage("projections"):  # stage labels for `toroidal profile`
            qkv = self.qkv(x)
        q, k, v = qkv.view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        padding = attention_mask.to(torch.bool) if attention_mask is not None else None
        with stage("kernel"):
            out = self.kernel(q, k, v, causal=self.causal, key_padding_mask=padding)
        out = out.transpose(1, 2).reshape(b, n, self.d_model)
        with stage("output"):
            return self.out(out)

    def get_metrics(self) -> dict:
        return self.kernel.get_metrics()

    def reset_metrics(self) -> None:
        self.kernel.reset_metrics()

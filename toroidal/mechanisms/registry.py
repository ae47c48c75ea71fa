"""The registry of mechanisms: the built-in ones listed explicitly, others added by `register_mechanism`."""

from __future__ import annotations

from torch import nn

from toroidal.mechanisms import adaptive, alibi, fft, hyperbolic, tiled
from toroidal.mechanisms.base import KernelModule, Mechanism, MechanismAttention
from toroidal.mechanisms.builtin import STANDARD, TOROIDAL

# The built-in mechanisms, in the order commands list them.
BUILTIN = (
    STANDARD,
    TOROIDAL,
    tiled.MECHANISM,
    hyperbolic.MECHANISM,
    adaptive.MECHANISM,
    fft.MECHANISM,
    alibi.MECHANISM,
)

_REGISTRY: dict[str, Mechanism] = {}


def register_mechanism(mechanism: Mechanism) -> Mechanism:
    """Add a mechanism under its name (ValueError if the name is empty or taken)."""
    if not mechanism.name or mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism name {mechanism.name!r} is empty or already registered")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


for _mechanism in BUILTIN:
    register_mechanism(_mechanism)


def mechanism_names() -> list[str]:
    return list(_REGISTRY)


def get_mechanism(name: str) -> Mechanism:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def build_kernel(name: str, heads: int, head_dim: int, **options) -> KernelModule:
    """The kernel module of mechanism `name` for `heads` heads of width `head_dim`."""
    return get_mechanism(name).build_kernel(heads, head_dim, **options)


def build_attention(
    name: str, d_model: int, n_heads: int, *, causal: bool = True, bias: bool = True, **options
) -> nn.Module:
    """A standalone attention layer (B, N, d_model) -> (B, N, d_model) around the mechanism's kernel.

    For `toroidal` prefer `ToroidalAttention`, which adds the (position, platter) rotary encoding.
    """
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    kernel = build_kernel(name, n_heads, d_model // n_heads, **options)
    return MechanismAttention(kernel, d_model, n_heads, causal=causal, bias=bias)

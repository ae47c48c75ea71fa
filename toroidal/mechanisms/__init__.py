"""Attention mechanisms compared side by side: `standard`, `toroidal`, and the others registered here.

A mechanism is a way to turn per-head q, k, v into per-head outputs. Each one builds a
*kernel module* with this contract:

    kernel = get_mechanism(name).build_kernel(heads, head_dim, **options)
    out = kernel(q, k, v, causal=True, key_padding_mask=None, scale=None, q_offset=0)
    # q: (B, H, N_q, e); k, v: (B, H, N_k, e); key_padding_mask: (B, N_k), True for real keys;
    # scale None: e ** -0.5 (or the mechanism's own); q_offset: position of the first query.
    # out: (B, H, N_q, e), same dtype as q.
    kernel.get_metrics()   # plain dict of what the mechanism measured since reset_metrics()
    kernel.reset_metrics()

Learned parameters of a mechanism (depth fusion, curvature, gates) live in its kernel
module, so the same kernel serves the standalone layer (`build_attention`), a Hugging
Face model (`apply_mechanism`) and `toroidal bench`. `options` are the mechanism's own
keywords; unknown ones raise ValueError naming the accepted ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from toroidal.mechanisms.base import KernelModule, MechanismAttention, check_options
from toroidal.mechanisms.builtin import TOROIDAL_OPTIONS, StandardKernel, ToroidalKernel
from toroidal.mechanisms.hf import apply_mechanism, mechanism_metrics, remove_mechanism
from toroidal.mechanisms.hyperbolic import HYPERBOLIC_OPTIONS, HyperbolicKernel
from toroidal.mechanisms.tiled import TILED_OPTIONS, TiledKernel


@dataclass(frozen=True)
class Mechanism:
    """A registered mechanism: a name, a one-line description and its kernel builder."""

    name: str
    description: str
    build_kernel: Callable[..., KernelModule]  # (heads, head_dim, **options) -> kernel module
    accepts: tuple[str, ...] = ()  # the option names `build_kernel` takes
    # The mechanism this one approximates ("toroidal", "standard"), or None when it is exact
    # or a different attention altogether; `toroidal bench` reports the error against it.
    approximates: str | None = None


_REGISTRY: dict[str, Mechanism] = {}


def register_mechanism(mechanism: Mechanism) -> Mechanism:
    if not mechanism.name or mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism name {mechanism.name!r} is empty or already registered")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


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


register_mechanism(
    Mechanism("standard", "plain softmax attention (scaled_dot_product_attention)", StandardKernel)
)
register_mechanism(
    Mechanism(
        "toroidal",
        "toroidal attention: ring positions, D platters, torus bias",
        ToroidalKernel,
        accepts=TOROIDAL_OPTIONS,
    )
)
register_mechanism(
    Mechanism(
        "tiled",
        "adaptive tiles of the torus: the top `budget` key tiles exact, the others pooled",
        TiledKernel,
        accepts=TILED_OPTIONS,
        approximates="toroidal",
    )
)
register_mechanism(
    Mechanism(
        "hyperbolic",
        "attention on the Poincaré ball: scores -beta * geodesic distance, values at their gyromidpoint",
        HyperbolicKernel,
        accepts=HYPERBOLIC_OPTIONS,
    )
)

__all__ = [
    "KernelModule",
    "Mechanism",
    "MechanismAttention",
    "apply_mechanism",
    "build_attention",
    "build_kernel",
    "check_options",
    "get_mechanism",
    "mechanism_metrics",
    "mechanism_names",
    "register_mechanism",
    "remove_mechanism",
]

# Mechanisms that live in their own modules register themselves on import (they import this package).
import toroidal.adaptive  # noqa: E402, F401
import toroidal.fft  # noqa: E402, F401

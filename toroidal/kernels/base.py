"""The kernel contract shared by every backend, and the backend registry.

A backend receives platter-token tensors q (B, H, Lq, w), k and v (B, H, Lk, w)
with the same number of heads, a `TorusGeometry`, an optional key padding mask
(B, Lk) (True for real tokens) and the score scale. It returns the attention
output (B, H, Lq, w) in q's dtype and, when asked and supported, the attention
weights (B, H, Lq, Lk) in the compute dtype: float64 for float64 inputs, float32 otherwise
(`compute_dtype`). A backend that takes float64 computes in float64, softmax statistics
included, so that `torch.autograd.gradcheck` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toroidal.geometry import TorusGeometry


@dataclass(frozen=True)
class KernelRequest:
    """What a backend must support for one call (used to check and to choose)."""

    device_type: str
    dtype: torch.dtype
    requires_grad: bool
    need_weights: bool
    geometry: TorusGeometry
    n_queries: int  # positions, not platter-tokens
    n_keys: int
    has_padding: bool

    @classmethod
    def for_tensors(cls, q, k, v, geometry, key_padding, need_weights) -> KernelRequest:
        depth = geometry.depth
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
            need_weights=need_weights,
            geometry=geometry,
            n_queries=q.shape[-2] // depth,
            n_keys=k.shape[-2] // depth,
            has_padding=key_padding is not None,
        )


class Backend:
    """One way to compute toroidal attention. Subclasses set `name` and implement both methods."""

    name: str = ""
    description: str = ""
    # Whether its backward is itself differentiable (`torch.autograd.gradgradcheck` holds).
    double_backward: bool = False

    def unavailable_reason(self, request: KernelRequest) -> str | None:
        """None if this backend can serve `request`, else a one-line reason naming the unmet condition."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop anything cached per geometry or shape (masks, compiled plans). Default: nothing cached."""
        cache = getattr(self, "_cache", None)
        if cache is not None:
            cache.clear()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        geometry: TorusGeometry,
        key_padding: torch.Tensor | None,
        scale: float,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly but cannot serve the call."""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if not backend.name or backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"backend name {backend.name!r} is empty, reserved or already registered")
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose 'auto' or one of {', '.join(_REGISTRY)}"
        ) from None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics are kept in: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives exact zeros (never NaN) on rows with nothing allowed."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))


def register_lse_autograd(forward_op, backward_op) -> None:
    """Make the custom op `forward_op(q, k, v, keep, *geometry) -> (out, lse)` differentiable through
    `backward_op(q, k, v, keep, out, lse, grad, *geometry) -> (dq, dk, dv)`: flash attention's rule,
    which recomputes the probabilities from the output and the log-sum-exp."""

    def setup_context(ctx, inputs, output):
        q, k, v, keep, *geometry = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, keep, out, lse)
        ctx.geometry = geometry

    def backward(ctx, grad, _grad_lse):
        q, k, v, keep, out, lse = ctx.saved_tensors
        grads = backward_op(q, k, v, keep, out, lse, grad.contiguous(), *ctx.geometry)
        return (*grads, None, *(None for _ in ctx.geometry))  # keep and the geometry take none

    forward_op.register_autograd(backward, setup_context=setup_context)

"""`toroidal_attention`: the functional kernel on per-head tensors, before depth fusion."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toroidal.geometry import TorusGeometry, expand_key_padding, sliding_window_that_bites
from toroidal.kernels import KernelRequest, resolve_backend


def _check_inputs(q, k, v, depth, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, N, e); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, _, e = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[-1] != e:
        raise ValueError(
            f"k and v must be (B, H_kv, N_k, e) matching q {tuple(q.shape)}; got {tuple(k.shape)}"
        )
    if h % k.shape[1]:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {k.shape[1]}")
    if e % depth:
        raise ValueError(f"depth={depth} must divide the head dimension {e}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be (B, N_k) = {(b, k.shape[2])}; got {tuple(key_padding_mask.shape)}"
        )


def to_platters(x: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, H, N, e) -> (B, H, N*D, e/D), position-major (platter-token p = i*D + k)."""
    b, h, n, e = x.shape
    return x.reshape(b, h, n * depth, e // depth)


def from_platters(x: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, H, N*D, e/D) -> (B, H, N, e)."""
    b, h, length, w = x.shape
    return x.reshape(b, h, length // depth, w * depth)


@dataclass(frozen=True)
class PlannedCall:
    """One attention call in kernel form: platter-token tensors, geometry, padding, scale."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geometry: TorusGeometry
    padding: torch.Tensor | None
    scale: float
    request: KernelRequest


def plan_call(
    q, k, v, *, depth, lambda_distance=0.0, period=None, causal=False, window=None,
    key_padding_mask=None, scale=None, q_offset=0, return_weights=False, sliding_window=None,
) -> PlannedCall:  # fmt: skip
    """Check inputs and turn per-head tensors into a kernel call (see `toroidal_attention`)."""
    _check_inputs(q, k, v, depth, key_padding_mask)
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    geometry = TorusGeometry(
        depth=depth,
        period=period if period is not None else k.shape[2],
        lambda_distance=float(lambda_distance),
        causal=causal,
        window=window,
        q_offset=q_offset,
        # Only where it bites: otherwise the call is the same call (backends, caches, tuning).
        sliding_window=sliding_window_that_bites(sliding_window, q.shape[2], k.shape[2], q_offset, causal),
    )
    qp, kp, vp = (to_platters(t, depth) for t in (q, k, v))
    padding = expand_key_padding(key_padding_mask, depth)
    if scale is None:
        scale = (q.shape[-1] // depth) ** -0.5
    request = KernelRequest.for_tensors(qp, kp, vp, geometry, padding, return_weights)
    return PlannedCall(qp, kp, vp, geometry, padding, scale, request)


def selected_backend(q, k, v, *, backend: str = "auto", **kwargs) -> str:
    """The name of the backend `toroidal_attention` would run for these arguments (auto resolved).

    Raises `BackendUnavailable` exactly where the call would.
    """
    kwargs.pop("always_tuple", None)  # output packaging only
    return resolve_backend(backend, plan_call(q, k, v, **kwargs).request).name


def backend_for_shape(
    shape: tuple[int, int, int, int], *, device="cpu", dtype=torch.float32, training=False, backend="auto",
    **kwargs,
) -> str:  # fmt: skip
    """The backend `toroidal_attention` would run for q, k, v of `shape` (B, H, N, e), `auto` resolved.

    Uses stride-0 stand-ins: nothing is allocated or computed. `kwargs` are
    `toroidal_attention`'s torus keywords. Raises `BackendUnavailable` where the call would.
    """
    with torch.set_grad_enabled(training):
        stand_in = torch.empty((), device=device, dtype=dtype, requires_grad=training)
        q = stand_in.expand(shape)
        return selected_backend(q, q, q, backend=backend, **kwargs)


def toroidal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    depth: int,
    lambda_distance: float = 0.0,
    period: int | None = None,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    q_offset: int = 0,
    return_weights: bool = False,
    always_tuple: bool = False,
    sliding_window: int | None = None,
):
    """Toroidal attention on per-head tensors.

    q: (B, H, N_q, e); k, v: (B, H_kv, N_k, e) with H a multiple of H_kv (grouped
    queries). Each head is split into `depth` platters of width e/D that attend on
    the torus. `key_padding_mask` is (B, N_k), True for real tokens; `period=None`
    means P = N_k; `q_offset` is the position of the first query (KV-cache decoding).
    `sliding_window` W: a host model's linear key window on top of the torus, |i - j| < W
    (Mistral's convention: a causal query sees itself and W - 1 keys before it).

    Returns (B, H, N_q, e), or (output, weights) with weights (B, H, N_q*D, N_k*D)
    when `return_weights` is True (only backends that materialize scores can), or
    always (output, weights-or-None) with `always_tuple`.
    """
    call = plan_call(
        q, k, v, depth=depth, lambda_distance=lambda_distance, period=period, causal=causal, window=window,
        key_padding_mask=key_padding_mask, scale=scale, q_offset=q_offset, return_weights=return_weights,
        sliding_window=sliding_window,
    )  # fmt: skip
    kernel = resolve_backend(backend, call.request)
    out, weights = kernel.forward(
        call.q, call.k, call.v, call.geometry, call.padding, call.scale, return_weights
    )
    out = from_platters(out, depth)
    return (out, weights) if (return_weights or always_tuple) else out

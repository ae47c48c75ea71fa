"""`flash2`: flash-attn 2 for the calls the torus shares with ordinary attention.

flash-attn adds no score bias and its masks are bands over token indices: query row r
sees key columns [r + Sk - Sq - left, r + Sk - Sq + right] (bottom-right aligned). So it
serves lambda = 0, no key padding, and a window only where it does not wrap around the ring.

The torus masks by position: platter-token (i, k) sees every platter of the positions its
rule allows, a block band over platter-tokens that no single flash band equals when
depth > 1. We therefore work at position level: query platters become extra heads (GQA
over the key heads), each key platter is one flash call (batched), and the D partial
results are merged with their log-sum-exp. flash-attn's backward ignores the gradient
of its log-sum-exp, so that merged path is inference-only. Depth 1, and calls with no
mask at all, are a single differentiable flash call.
"""

from __future__ import annotations

import torch

from toroidal.kernels.base import Backend, BackendUnavailable, register

try:
    from flash_attn import flash_attn_func as _flash_attn_func
except ModuleNotFoundError:
    _flash_attn_func = None
    _IMPORT_ERROR = "flash-attn is not installed (pip install 'toroidal[gpu]')"
except ImportError as exc:  # installed but built for another torch / CUDA
    _flash_attn_func = None
    _IMPORT_ERROR = f"flash-attn is installed but failed to import ({exc})"
else:
    _IMPORT_ERROR = None


def _effective_window(geometry) -> int | None:
    """The window, or None where it allows every pair (a ring distance never exceeds P // 2)."""
    window = geometry.window
    return None if window is None or window >= geometry.period // 2 else window


def _is_masked(geometry) -> bool:
    return geometry.causal or _effective_window(geometry) is not None


def unsupported_call(request) -> str | None:
    """The first condition of this call flash-attn cannot express, independent of the install."""
    geometry = request.geometry
    if request.dtype not in (torch.float16, torch.bfloat16):
        return f"flash2 needs fp16/bf16 (got {str(request.dtype).removeprefix('torch.')})"
    if request.need_weights:
        return "flash2 cannot return attention weights; use backend='reference'"
    if geometry.lambda_distance != 0:
        return "flash2 needs lambda_distance == 0 (flash-attn has no score bias)"
    if request.has_padding:
        return "flash2 takes no key padding mask; use flex or sdpa"
    window = _effective_window(geometry)
    if window is not None and geometry.wraps(request.n_queries, request.n_keys):
        return (
            f"flash2 cannot express a circular window that wraps around the ring "
            f"(window={window}, period={geometry.period}); use flex or sdpa"
        )
    if window is not None and request.n_keys + window < geometry.q_offset + request.n_queries:
        return "flash2 cannot express queries whose whole window lies past the last key"
    if geometry.depth > 1 and _is_masked(geometry) and request.requires_grad:
        return (
            "flash2 with depth > 1 and a causal/window mask is inference-only (per-platter results are "
            "merged by log-sum-exp, which flash-attn's backward ignores); use flex or sdpa for training"
        )
    return None


def _band(geometry, n_queries: int, n_keys: int):
    """Key positions [k0, k1) any query can see, and flash's (causal, window_size) over that slice.

    Query row r is position i = q_offset + r; it may see key j with lo(i) <= j <= hi(i), where
    hi = i (causal) or i + w (window), lo = i - w (window). Slicing off keys no query sees
    makes both flash window sizes non-negative (a negative size would mean "unbounded").
    """
    offset, window = geometry.q_offset, _effective_window(geometry)
    reach = 0 if geometry.causal else window  # how far past its own position a query sees
    k0 = 0 if window is None else max(0, offset - window)
    k1 = n_keys if reach is None else min(n_keys, offset + n_queries + reach)
    shift = (k1 - k0) - n_queries  # flash's bottom-right alignment
    right = -1 if reach is None else offset - k0 + reach - shift
    left = -1 if window is None else shift - offset + k0 + window
    if right == 0:
        return k0, k1, True, (left, -1)  # flash's own causal mask: the fast path
    return k0, k1, False, (left, right)


def _merge(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Combine partial attention over disjoint key sets: out (D, B, S, H, w), lse (D, B, H, S)."""
    # flash reports +inf (or -inf) for a row with no key; such a part carries no mass.
    lse = torch.where(torch.isfinite(lse), lse, float("-inf"))
    total = torch.logsumexp(lse, dim=0, keepdim=True)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weight = torch.exp(lse - total).transpose(-1, -2).unsqueeze(-1)  # (D, B, S, H, 1)
    return (weight * out.float()).sum(dim=0)


class Flash2Backend(Backend):
    name = "flash2"
    description = "flash-attn 2 (CUDA, fp16/bf16, lambda = 0, no padding, non-wrapping window)"

    def unavailable_reason(self, request):
        if _flash_attn_func is None:
            return _IMPORT_ERROR
        if request.device_type != "cuda":
            return f"flash2 needs CUDA (got {request.device_type})"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"flash-attn 2 needs an Ampere or newer GPU (sm80+), found sm{major}{minor}"
        return unsupported_call(request)

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        if not _is_masked(geometry):
            # Every platter-token sees every key: one plain flash call over platter-tokens.
            out = _flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale
            )
            return out.transpose(1, 2), None
        return self._positional(q, k, v, geometry, scale), None

    def _positional(self, q, k, v, geometry, scale):
        """Causal / window attention at position level, platters folded into heads."""
        b, h, lq, w = q.shape
        d = geometry.depth
        nq, nk = lq // d, k.shape[-2] // d
        k0, k1, causal, window_size = _band(geometry, nq, nk)
        # Query (i, k) of head h -> row i, head h*D + k: flash's GQA maps it to key head h.
        qh = q.reshape(b, h, nq, d, w).permute(0, 2, 1, 3, 4).reshape(b, nq, h * d, w)

        def per_key_platter(x):  # (B, H, Nk*D, w) -> (D*B, k1-k0, H, w): key platter l as batch
            return x.reshape(b, h, nk, d, w)[:, :, k0:k1].permute(3, 0, 2, 1, 4).reshape(d * b, k1 - k0, h, w)

        if d == 1:
            out = _flash_attn_func(
                qh,
                per_key_platter(k),
                per_key_platter(v),
                softmax_scale=scale,
                causal=causal,
                window_size=window_size,
            )
        else:
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise BackendUnavailable(
                    "backend 'flash2' unavailable: depth > 1 with a causal/window mask is inference-only"
                )
            out, lse, _ = _flash_attn_func(
                qh.repeat(d, 1, 1, 1),
                per_key_platter(k),
                per_key_platter(v),
                softmax_scale=scale,
                causal=causal,
                window_size=window_size,
                return_attn_probs=True,
            )
            out = _merge(out.reshape(d, b, nq, h * d, w), lse.reshape(d, b, h * d, nq)).to(q.dtype)
        # (B, Nq, H*D, w) -> (B, H, Nq*D, w), position-major platter-tokens again.
        return out.reshape(b, nq, h, d, w).permute(0, 2, 1, 3, 4).reshape(b, h, lq, w)


register(Flash2Backend())

"""`sdpa`: PyTorch's fused scaled_dot_product_attention with the torus as an additive mask.

The (Lq, Lk) bias-plus-mask is built once per geometry, shape, device and dtype and
cached, so repeated calls (every layer, every step) pay only for the kernel. Under
`torch.compile` it is built inside the graph instead (the compiled graph is the cache).
Whether some row may have nothing to attend is decided from the geometry and the presence
of padding, never from tensor values, so the call has no data-dependent branch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from toroidal.kernels.base import Backend, register

_CACHE_SIZE = 8


def rows_may_be_empty(geometry, n_query_positions: int, n_key_positions: int, has_padding: bool) -> bool:
    """Whether some query row can have no allowed key (before looking at any tensor).

    Without padding, the query at position i sees the key at i itself (causal: j <= i; window:
    ring(i, i) = 0) whenever that key exists, which holds when the queries end within the keys.
    """
    return has_padding or geometry.q_offset + n_query_positions > n_key_positions


class SdpaBackend(Backend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention with a cached additive torus bias"

    def __init__(self) -> None:
        self._cache: OrderedDict = OrderedDict()

    def unavailable_reason(self, request):
        if request.need_weights:
            return "sdpa cannot return attention weights; use backend='reference'"
        return None

    @staticmethod
    def _build(geometry, lq, lk, device, dtype):
        bias, allowed = geometry.block(0, lq, 0, lk, device=device, dtype=dtype)
        return bias.masked_fill(~allowed, float("-inf")), allowed

    def _bias(self, geometry, lq, lk, device, dtype):
        """Additive mask (-inf where disallowed), in `dtype`, and the allowed pairs."""
        if torch.compiler.is_compiling():
            return self._build(geometry, lq, lk, device, dtype)
        key = (geometry, lq, lk, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        entry = self._cache[key] = self._build(geometry, lq, lk, device, dtype)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return entry

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        lq, lk = q.shape[-2], k.shape[-2]
        additive, allowed = self._bias(geometry, lq, lk, q.device, q.dtype)
        depth = geometry.depth
        if not rows_may_be_empty(geometry, lq // depth, lk // depth, key_padding is not None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale), None
        if key_padding is not None:
            pad = torch.zeros(key_padding.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(~key_padding, float("-inf"))
            additive = additive + pad[:, None, None, :]
            row_ok = (allowed[None] & key_padding[:, None, :]).any(dim=-1)[:, None, :, None]
        else:
            row_ok = allowed.any(dim=-1)[:, None]
        # Rows with nothing to attend: give SDPA a finite row, then zero the output there.
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.where(row_ok, additive, zero), scale=scale
        )
        return torch.where(row_ok, out, zero), None


register(SdpaBackend())

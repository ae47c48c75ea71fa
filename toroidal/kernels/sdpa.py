"""`sdpa`: PyTorch's fused scaled_dot_product_attention with the torus as an additive mask.

The (Lq, Lk) bias-plus-mask is built once per geometry, shape, device and dtype and
cached, so repeated calls (every layer, every step) pay only for the kernel.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from toroidal.kernels.base import Backend, register

_CACHE_SIZE = 8


class SdpaBackend(Backend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention with a cached additive torus bias"

    def __init__(self) -> None:
        self._cache: OrderedDict = OrderedDict()

    def unavailable_reason(self, request):
        if request.need_weights:
            return "sdpa cannot return attention weights; use backend='reference'"
        return None

    def _bias(self, geometry, lq, lk, device, dtype):
        """Additive mask (-inf where disallowed) and whether each row has any allowed key."""
        key = (geometry, lq, lk, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        bias, allowed = geometry.block(0, lq, 0, lk, device=device)
        additive = bias.masked_fill(~allowed, float("-inf")).to(dtype)
        entry = (additive, allowed, allowed.any(dim=-1))
        self._cache[key] = entry
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return entry

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        lq, lk = q.shape[-2], k.shape[-2]
        additive, allowed, row_ok = self._bias(geometry, lq, lk, q.device, q.dtype)
        if key_padding is not None:
            pad = torch.zeros(key_padding.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(~key_padding, float("-inf"))
            additive = additive + pad[:, None, None, :]
            row_ok = (allowed[None] & key_padding[:, None, :]).any(dim=-1)[:, None]
        if not bool(row_ok.all()):
            # Rows with nothing to attend: give SDPA a finite row, then zero the output.
            additive = torch.where(
                row_ok[..., None], additive, torch.zeros((), dtype=q.dtype, device=q.device)
            )
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale)
            return torch.where(
                row_ok[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device)
            ), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale), None


register(SdpaBackend())

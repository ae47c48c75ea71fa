"""`reference`: materialized scores in float32. The ground truth every backend is checked against."""

from __future__ import annotations

import torch

from toroidal.kernels.base import Backend, masked_softmax, register


class ReferenceBackend(Backend):
    name = "reference"
    description = "materialized (L x L) scores in float32; slow, exact, returns weights"

    def unavailable_reason(self, request):
        return None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        lq, lk = q.shape[-2], k.shape[-2]
        bias, allowed = geometry.block(0, lq, 0, lk, device=q.device)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias
        if key_padding is not None:
            allowed = allowed & key_padding[:, None, None, :]
        weights = masked_softmax(scores, allowed)
        out = torch.matmul(weights, v.float()).to(q.dtype)
        return out, (weights if need_weights else None)


register(ReferenceBackend())

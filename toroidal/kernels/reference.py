"""`reference`: materialized scores in float32 (float64 for float64 inputs). The ground truth every
backend is checked against."""

from __future__ import annotations

import torch

from toroidal.kernels.base import Backend, compute_dtype, masked_softmax, register


class ReferenceBackend(Backend):
    name = "reference"
    description = "materialized (L x L) scores in float32 (float64 for float64); slow, exact, returns weights"
    double_backward = True  # plain differentiable torch ops

    def unavailable_reason(self, request):
        return None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        lq, lk = q.shape[-2], k.shape[-2]
        dtype = compute_dtype(q.dtype)
        bias, allowed = geometry.block(0, lq, 0, lk, device=q.device, dtype=dtype)
        scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale + bias
        if key_padding is not None:
            allowed = allowed & key_padding[:, None, None, :]
        weights = masked_softmax(scores, allowed)
        out = torch.matmul(weights, v.to(dtype)).to(q.dtype)
        return out, (weights if need_weights else None)


register(ReferenceBackend())

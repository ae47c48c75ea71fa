"""Depth fusion: mixes the D platter outputs of each head back to the head dimension e.

Input and output are (B, H, N, e) with e = D * w (platter k in slice k*w:(k+1)*w).
The learned modes start as plain concatenation (identity), so inserting toroidal
attention into a model does not disturb it before training.
"""

from __future__ import annotations

import torch
from torch import nn

from toroidal.config import FUSION_MODES


class DepthFusion(nn.Module):
    """`low_rank`: out_k = sum_l (I + U V^T)[k, l] o_l per head (V starts at zero).
    `attention`: o + g * (attended - o), platters attending each other per token (g starts at 0).
    `mean`: every platter slot gets the platter mean. `concat`: identity.
    """

    def __init__(self, mode: str, n_heads: int, depth: int, rank: int | None = None):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {mode!r} must be one of {', '.join(FUSION_MODES)}")
        self.mode, self.depth = mode, depth
        rank = rank if rank is not None else max(1, depth // 4)
        if mode == "low_rank":
            self.u = nn.Parameter(torch.randn(n_heads, depth, rank) * 0.02)
            self.v = nn.Parameter(torch.zeros(n_heads, depth, rank))
        elif mode == "attention":
            # Platter-to-platter dot products plus a learned bias; the gate keeps concat at init.
            self.score_bias = nn.Parameter(torch.zeros(n_heads, depth, depth))
            self.gate = nn.Parameter(torch.zeros(n_heads))

    def mixing_matrix(self) -> torch.Tensor | None:
        """(H, D, D) platter mix for `low_rank` (None for the other modes)."""
        if self.mode != "low_rank":
            return None
        eye = torch.eye(self.depth, device=self.u.device, dtype=self.u.dtype)
        return eye + self.u @ self.v.transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "concat" or self.depth == 1:
            return x
        b, h, n, e = x.shape
        platters = x.reshape(b, h, n, self.depth, e // self.depth)
        if self.mode == "mean":
            mixed = platters.mean(dim=3, keepdim=True).expand_as(platters)
        elif self.mode == "low_rank":
            mix = self.mixing_matrix().to(x.dtype)  # (H, D, D)
            mixed = torch.einsum("hkl,bhnlw->bhnkw", mix, platters)
        else:
            width = e // self.depth
            logits = torch.einsum("bhnkw,bhnlw->bhnkl", platters, platters) * width**-0.5
            logits = logits + self.score_bias.to(x.dtype)[None, :, None]
            weights = torch.softmax(logits, dim=-1)
            attended = torch.einsum("bhnkl,bhnlw->bhnkw", weights, platters)
            gate = self.gate.to(x.dtype)[None, :, None, None, None]
            mixed = platters + gate * (attended - platters)
        return mixed.reshape(b, h, n, e)

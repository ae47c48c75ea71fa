"""Mechanism `alibi`: softmax attention with ALiBi's per-head linear distance bias (Press et al., 2022).

Score `scale * q.k - m_h * (i - j)` under causal masking, `- m_h * |i - j|` without it; the
slopes are the paper's (`alibi_slopes`). The bias depends on positions only through i - j, so
KV-cache decoding (`q_offset`) computes what the full pass computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toroidal.geometry import position_allowed, sliding_window_that_bites
from toroidal.mechanisms.base import KernelModule, Mechanism, check_options

_CHUNK_ELEMENTS = 1 << 24  # bias elements per chunk of query rows (64 MiB in float32): bounds memory


def alibi_slopes(heads: int) -> list[float]:
    """The paper's slopes: 2^(-8h/H), h = 1..H, for H a power of 2; otherwise those of the largest
    power of 2 below H, then every other slope of twice that power until there are H."""
    if heads < 1:
        raise ValueError(f"alibi needs at least one head, got {heads}")
    power = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * h / power) for h in range(1, power + 1)]
    if power < heads:
        slopes += alibi_slopes(2 * power)[0::2][: heads - power]
    return slopes


def alibi_bias(slopes: torch.Tensor, i: torch.Tensor, j: torch.Tensor, causal: bool) -> torch.Tensor:
    """(H, N_q, N_k) bias -m_h * (i - j) (causal) or -m_h * |i - j|, from (N_q, 1) and (1, N_k) positions."""
    offset = (i - j).to(slopes.dtype)
    distance = offset if causal else offset.abs()
    return -slopes[:, None, None] * distance


class AlibiKernel(KernelModule):
    """Softmax attention plus ALiBi's bias (see the module docstring); no options, nothing learned.

    Rows with no key to attend give zeros. The bias is built per chunk of query rows, in float32
    (float64 for float64 inputs), then handed to `scaled_dot_product_attention` as its mask.
    """

    def __init__(self, heads: int, head_dim: int, **options):
        super().__init__()
        check_options("alibi", options, ())
        self.heads = heads
        # (device, dtype) -> the slopes as a tensor; not a buffer, which a bf16 model would round
        self._slopes: dict = {}

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        b, h, n_q, _ = q.shape
        n_k = k.shape[-2]
        if h != self.heads:
            raise ValueError(f"alibi: kernel built for {self.heads} heads, got q {tuple(q.shape)}")
        sliding_window = sliding_window_that_bites(sliding_window, n_q, n_k, q_offset, causal)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        slopes = self._slopes.get((q.device, dtype))
        if slopes is None:
            slopes = torch.tensor(alibi_slopes(h), dtype=dtype, device=q.device)
            self._slopes[q.device, dtype] = slopes
        j = torch.arange(n_k, device=q.device)[None, :]
        padding = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, None, :]
        rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * n_k))
        outs = []
        for first in range(0, n_q, rows):
            last = min(n_q, first + rows)
            i = q_offset + torch.arange(first, last, device=q.device)[:, None]
            allowed = torch.as_tensor(position_allowed(i, j, causal, None, 1, sliding_window))  # no period
            allowed = allowed.expand(last - first, n_k)[None, None]
            if padding is not None:
                allowed = allowed & padding
            bias = torch.where(allowed, alibi_bias(slopes, i, j, causal), float("-inf"))
            # Rows with nothing to attend: a finite row for SDPA (no NaN, in value or gradient), then zeros.
            has_key = allowed.any(dim=-1, keepdim=True)
            bias = torch.where(has_key, bias, torch.zeros((), dtype=dtype, device=q.device)).to(q.dtype)
            out = F.scaled_dot_product_attention(q[:, :, first:last], k, v, attn_mask=bias, scale=scale)
            outs.append(torch.where(has_key, out, torch.zeros((), dtype=q.dtype, device=q.device)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


MECHANISM = Mechanism(
    "alibi",
    "ALiBi: softmax attention with a per-head linear distance bias (the paper's slopes)",
    AlibiKernel,
)

"""The two reference mechanisms: `standard` (plain softmax attention) and `toroidal`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toroidal.config import TORUS_OPTIONS
from toroidal.functional import toroidal_attention
from toroidal.fusion import DepthFusion
from toroidal.geometry import position_allowed, sliding_window_that_bites
from toroidal.mechanisms.base import KernelModule, Mechanism, check_options, torus_config


def _sdpa_mask(causal, key_padding_mask, n_q, n_k, q_offset, device, sliding_window=None):
    """Boolean (B, 1, N_q, N_k) mask for SDPA, or None when plain `is_causal` (or nothing) suffices."""
    sliding_window = sliding_window_that_bites(sliding_window, n_q, n_k, q_offset, causal)
    plain = not causal or (q_offset == 0 and n_q == n_k)
    if key_padding_mask is None and sliding_window is None and plain:
        return None
    i = torch.arange(n_q, device=device)[:, None] + q_offset
    j = torch.arange(n_k, device=device)[None, :]
    allowed = position_allowed(i, j, causal, None, 1, sliding_window)  # no circular window: no period
    allowed = torch.as_tensor(allowed, device=device).expand(n_q, n_k)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


class StandardKernel(KernelModule):
    """Plain softmax attention over the N tokens at full head width. Rows with no key give zeros."""

    def __init__(self, heads: int, head_dim: int, **options):
        super().__init__()
        check_options("standard", options, ())

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = _sdpa_mask(causal, key_padding_mask, n_q, n_k, q_offset, q.device, sliding_window)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and n_q > 1, scale=scale)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        # SDPA gives NaN on rows with nothing allowed; the house rule is zeros.
        return torch.where(mask.any(dim=-1, keepdim=True), out, torch.zeros_like(out))


class ToroidalKernel(KernelModule):
    """`toroidal_attention` followed by depth fusion (the kernel of `ToroidalAttention`, no rotary).

    Options are the `TORUS_OPTIONS` of `ToroidalConfig`. The period follows
    `ToroidalConfig.period_for` with the call's causal flag. While `captured` is a list, calls
    run the reference backend and append their platter-token weights (B, H, N_q*D, N_k*D) to it.
    """

    def __init__(self, heads: int, head_dim: int, **options):
        super().__init__()
        check_options("toroidal", options, TORUS_OPTIONS)
        self.config = torus_config(heads, head_dim, options)
        self.fusion = DepthFusion(self.config.fusion, heads, self.config.depth, self.config.fusion_rank)
        self.captured: list | None = None

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        cfg = self.config
        capturing = self.captured is not None
        out, weights = toroidal_attention(
            q, k, v, depth=cfg.depth, lambda_distance=cfg.lambda_distance,
            period=cfg.period_for(k.shape[-2], causal), causal=causal, window=cfg.window,
            key_padding_mask=key_padding_mask, scale=scale, backend="reference" if capturing else cfg.backend,
            q_offset=q_offset, return_weights=capturing, always_tuple=True, sliding_window=sliding_window,
        )  # fmt: skip
        if capturing:
            self.captured.append(weights.detach())
        return self.fusion(out)


STANDARD = Mechanism("standard", "plain softmax attention (scaled_dot_product_attention)", StandardKernel)
TOROIDAL = Mechanism(
    "toroidal",
    "toroidal attention: ring positions, D platters, torus bias",
    ToroidalKernel,
    accepts=TORUS_OPTIONS,
)

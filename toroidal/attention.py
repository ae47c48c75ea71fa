"""`ToroidalAttention`: the standalone nn.Module (B, N, d_model) -> (B, N, d_model)."""

from __future__ import annotations

import torch
from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.fft import FFTToroidalMixing
from toroidal.functional import toroidal_attention
from toroidal.fusion import DepthFusion
from toroidal.kv_cache import KVCache
from toroidal.rope import ToroidalRotary
from toroidal.runtime.timing import stage

# Keywords of the original research implementation, mapped to config fields.
_LEGACY_KEYWORDS = {"fusion_mode": "fusion", "window_size": "window"}


def config_from_kwargs(config: ToroidalConfig | None, kwargs: dict) -> ToroidalConfig:
    """A config from either a `ToroidalConfig` or keyword arguments (research-code names accepted)."""
    if config is not None:
        if kwargs:
            raise TypeError("pass either a ToroidalConfig or keyword arguments, not both")
        return config
    renamed = {_LEGACY_KEYWORDS.get(key, key): value for key, value in kwargs.items()}
    return ToroidalConfig.from_dict(renamed)


class ToroidalAttention(nn.Module):
    """Multi-head toroidal attention: projections, (position, platter) rotary encoding,
    the toroidal kernel, depth fusion, output projection.

    Build it from a `ToroidalConfig` or from keywords (`d_model, n_heads, max_len, depth,
    lambda_distance, fusion_mode, fusion_rank, dropout, bias, backend, window_size`, or
    any config field). Dropout applies to the fused attention output.
    """

    def __init__(self, config: ToroidalConfig | None = None, **kwargs):
        super().__init__()
        self.config = config = config_from_kwargs(config, kwargs)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.rotary = ToroidalRotary(config.rope, config.head_dim, config.depth, config.rope_base)
        self.fusion = DepthFusion(config.fusion, config.n_heads, config.depth, config.fusion_rank)
        self.dropout = nn.Dropout(config.dropout)
        self.fft = None  # approximation="fft": content-free circulant mixing in the kernel's place
        if config.approximation == "fft":

            self.fft = FFTToroidalMixing(config.n_heads, config.depth)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_attention: bool = False,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, d_model); attention_mask: (B, N), 1 for real tokens (Hugging Face convention).

        `cache`: exact KV-cache decoding (causal only): x holds positions cache.length.. and
        the cache grows by them; the outputs equal the full forward pass's rows there.
        Returns (output (B, N, d_model), weights (B, H, N*D, N_keys*D) or None).
        """
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"expected x of shape (B, N, {cfg.d_model}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        start = 0 if cache is None else self._decoding_start(cache, attention_mask)
        period = cfg.period_for(start + n)
        # Stages are labelled for torch.profiler (`toroidal profile`); without a profiler, no cost.
        with stage("projections"):
            qkv = self.qkv(x)
        q, k, v = qkv.view(b, n, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        with stage("rotary"):
            q = self.rotary(q, start, period)
        with stage("rotary"):
            k = self.rotary(k, start, period)
        if cache is not None:
            k, v = cache.append(k, v)
        padding = attention_mask.to(torch.bool) if attention_mask is not None else None
        with stage("kernel"):
            out, weights = (toroidal_attention if self.fft is None else self.fft)(
                q,
                k,
                v,
                depth=cfg.depth,
                lambda_distance=cfg.lambda_distance,
                period=period,
                causal=cfg.causal,
                window=cfg.window,
                key_padding_mask=padding,
                backend=cfg.backend,
                return_weights=return_attention,
                always_tuple=True,
                q_offset=start,
            )
        with stage("fusion"):
            out = self.fusion(out)
        out = self.dropout(out).transpose(1, 2).reshape(b, n, cfg.d_model)
        with stage("output"):
            out = self.out(out)
        return out, weights

    def get_metrics(self) -> dict:
        """The mechanism-layer contract (`toroidal.mechanisms`): exact attention measures nothing."""
        return {}

    def reset_metrics(self) -> None:
        """Nothing to forget (see `get_metrics`)."""

    def _decoding_start(self, cache: KVCache, attention_mask) -> int:
        """The position of the first new token; refuses what cached decoding cannot compute exactly."""
        if not self.config.causal:
            raise ValueError(
                "KV-cache decoding needs a causal module: bidirectional positions see later tokens, "
                "and P = N changes with every token; use ToroidalConfig(causal=True)"
            )
        if attention_mask is not None:
            raise ValueError("KV-cache decoding takes no attention_mask; decode unpadded sequences")
        return cache.length

"""Mechanism `fft`: the FFT approximation of toroidal attention (`toroidal.fft`) with depth fusion."""

from __future__ import annotations

from toroidal.config import TORUS_OPTIONS
from toroidal.fft import DEFAULT_BUCKETS, FFTToroidalMixing, convolution_plan
from toroidal.fusion import DepthFusion
from toroidal.geometry import sliding_window_that_bites
from toroidal.mechanisms.base import KernelModule, Mechanism, check_options, torus_config

# The torus without a backend (the mixing is computed here), then its own options.
FFT_OPTIONS = (*(name for name in TORUS_OPTIONS if name != "backend"), "buckets", "content")


class FFTToroidalKernel(KernelModule):
    """Mechanism `fft`: `FFTToroidalMixing` followed by depth fusion.

    Torus options are the `TORUS_OPTIONS` but backend; the period follows
    `ToroidalConfig.period_for` with the call's causal flag.
    Own options: `buckets` (learned offset buckets per direction, 0 for none) and `content`
    (pooled query-key logits, bidirectional only). Metrics: the last call's convolution
    ("circular" or "linear") and FFT length.
    """

    def __init__(self, heads: int, head_dim: int, **options):
        super().__init__()
        check_options("fft", options, FFT_OPTIONS)
        self.config = torus_config(heads, head_dim, options)
        buckets, content = options.get("buckets", DEFAULT_BUCKETS), options.get("content", False)
        self.mixing = FFTToroidalMixing(heads, self.config.depth, buckets, content)
        self.fusion = DepthFusion(self.config.fusion, heads, self.config.depth, self.config.fusion_rank)
        self._plan: tuple[str, int] | None = None

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        cfg = self.config
        n = k.shape[-2]
        period = cfg.period_for(n, causal)
        out = self.mixing(
            q, k, v, depth=cfg.depth, lambda_distance=cfg.lambda_distance, period=period, causal=causal,
            window=cfg.window, key_padding_mask=key_padding_mask, scale=scale, q_offset=q_offset,
            sliding_window=sliding_window,
        )  # fmt: skip
        sliding_window = sliding_window_that_bites(sliding_window, q.shape[-2], n, q_offset, causal)
        self._plan = convolution_plan(n, period, causal, key_padding_mask is not None, sliding_window)
        return self.fusion(out)

    def get_metrics(self) -> dict:
        if self._plan is None:
            return {}
        return {"convolution": self._plan[0], "fft_length": self._plan[1]}

    def reset_metrics(self) -> None:
        self._plan = None


MECHANISM = Mechanism(
    "fft",
    "FFT approximation of toroidal attention: content-free circulant mixing on the torus, O(N log N)",
    FFTToroidalKernel,
    accepts=FFT_OPTIONS,
    approximates="toroidal",
)

"""The one definition of the torus: distances, bias and masks as index functions.

They accept Python ints or integer tensors (broadcasting), so the same code builds a
materialized bias, a tile of it, or a FlexAttention `score_mod`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ring_distance(i, j, period: int):
    """Distance on a ring of `period` positions: min(m, P - m), m = |i - j| mod P."""
    m = (i - j) % period
    if isinstance(m, torch.Tensor):
        return torch.minimum(m, period - m)
    return min(m, period - m)


def toroidal_distance(i, k, j, l, period: int, depth: int):
    """delta((i,k),(j,l)) = ring(i,j)/P + |k-l|/D."""
    return ring_distance(i, j, period) / period + abs(k - l) / depth


def position_allowed(i, j, causal: bool, window: int | None, period: int, sliding_window: int | None = None):
    """Whether a query at position i may attend a key at position j (before padding).

    Causal: j <= i (all platters of a past or present position). Circular window w:
    ring(i, j) <= w, which with causal keeps the recent past and the ring's seam.
    Sliding window W (a host model's, linear, no seam): |i - j| < W.
    Returns a bool tensor for tensor inputs, a bool for ints.
    """
    ok = (j <= i) if causal else None
    if window is not None:
        near = ring_distance(i, j, period) <= window
        ok = near if ok is None else ok & near
    if sliding_window is not None:
        near = abs(i - j) < sliding_window
        ok = near if ok is None else ok & near
    if ok is None:
        if isinstance(i, torch.Tensor) or isinstance(j, torch.Tensor):
            return torch.ones_like(i - j, dtype=torch.bool)
        return True
    return ok


def sliding_window_that_bites(
    sliding_window: int | None, n_queries: int, n_keys: int, q_offset: int, causal: bool
) -> int | None:
    """`sliding_window` where it removes some pair of this call (|i - j| >= W for some pair), else None."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
    reach = q_offset + n_queries - 1  # the last query against key 0
    if not causal:
        reach = max(reach, n_keys - 1 - q_offset)  # the first query against the last key
    return sliding_window if reach >= sliding_window else None


@dataclass(frozen=True)
class RingSegment:
    """The position pairs with lo <= i - j <= hi, on which ring(i, j) = slope * (i - j) + offset."""

    lo: int
    hi: int
    slope: int
    offset: int


@dataclass(frozen=True)
class TorusGeometry:
    """Bias and mask rules of one attention call, in platter-token indices.

    `q_offset` is the position of the first query: 0 for a full forward pass,
    the number of cached positions when decoding with a KV cache. `sliding_window` W is a
    host model's linear key window on top of the torus: |i - j| < W (see `position_allowed`).
    """

    depth: int
    period: int
    lambda_distance: float
    causal: bool
    window: int | None = None
    q_offset: int = 0
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.depth < 1 or self.period < 1:
            raise ValueError(
                f"TorusGeometry needs depth >= 1 and period >= 1, got {self.depth}, {self.period}"
            )
        if self.sliding_window is not None and not self.sliding_window >= 1:
            raise ValueError(f"TorusGeometry needs sliding_window >= 1, got {self.sliding_window}")

    # index -> (position, platter)
    def query_position(self, q_idx):
        return self.q_offset + q_idx // self.depth

    def key_position(self, kv_idx):
        return kv_idx // self.depth

    def bias(self, q_idx, kv_idx):
        """Additive score bias -lambda * delta for platter-token indices (broadcasting)."""
        i, k = self.query_position(q_idx), q_idx % self.depth
        j, l = self.key_position(kv_idx), kv_idx % self.depth
        return -self.lambda_distance * toroidal_distance(i, k, j, l, self.period, self.depth)

    def allowed(self, q_idx, kv_idx):
        """Causal and window rule for platter-token indices (padding handled separately)."""
        return position_allowed(
            self.query_position(q_idx), self.key_position(kv_idx), self.causal, self.window, self.period,
            self.sliding_window,
        )  # fmt: skip

    @property
    def has_mask(self) -> bool:
        return self.causal or self.window is not None or self.sliding_window is not None

    def block(self, q_start: int, q_stop: int, k_start: int, k_stop: int, device=None, dtype=torch.float32):
        """Materialized (bias, allowed bool) of shape (q_stop-q_start, k_stop-k_start).

        The bias is float32, or float64 computed in float64 (float64 indices are exact to 2**53).
        """
        index_dtype = torch.float64 if dtype == torch.float64 else torch.int64
        q_idx = torch.arange(q_start, q_stop, device=device, dtype=index_dtype).unsqueeze(1)
        kv_idx = torch.arange(k_start, k_stop, device=device, dtype=index_dtype).unsqueeze(0)
        bias = self.bias(q_idx, kv_idx).to(dtype)
        allowed = self.allowed(q_idx, kv_idx)
        return bias, allowed.expand(bias.shape)

    def position_mask(self, n_queries: int, n_keys: int, device=None) -> torch.Tensor:
        """(n_queries, n_keys) bool mask at position level, for cheap tile skipping."""
        i = self.q_offset + torch.arange(n_queries, device=device).unsqueeze(1)
        j = torch.arange(n_keys, device=device).unsqueeze(0)
        return torch.as_tensor(
            position_allowed(i, j, self.causal, self.window, self.period, self.sliding_window), device=device
        ).expand(n_queries, n_keys)

    def linear_segments(self, n_queries: int, n_keys: int, limit: int) -> list[RingSegment] | None:
        """The allowed position pairs cut into bands of m = i - j where the ring distance is linear.

        With m = a*P + r (0 <= r < P), ring = r on the near half (r <= P // 2) and P - r on
        the far half; the causal rule and the windows are intervals of m inside each half, so
        the bands cover exactly the pairs `allowed` keeps. None if more than `limit` bands.
        """
        period, half = self.period, self.period // 2
        lo = self.q_offset - (n_keys - 1)
        hi = self.q_offset + n_queries - 1
        if self.causal:
            lo = max(lo, 0)
        if self.sliding_window is not None:  # |i - j| < W: an interval of m too
            lo, hi = max(lo, 1 - self.sliding_window), min(hi, self.sliding_window - 1)
        near_end, far_start = half, half + 1
        if self.window is not None:
            near_end, far_start = min(half, self.window), max(half + 1, period - self.window)
        segments = []
        for a in range(lo // period, hi // period + 1):
            base = a * period
            near = (base, base + near_end, 1, -base)
            far = (base + far_start, base + period - 1, -1, base + period)
            for start, stop, slope, offset in (near, far):
                start, stop = max(start, lo), min(stop, hi)
                if start <= stop:
                    if len(segments) == limit:
                        return None
                    segments.append(RingSegment(start, stop, slope, offset))
        return segments

    def wraps(self, n_queries: int, n_keys: int) -> bool:
        """Whether the ring's wrap-around changes any allowed pair (ring distance != |i - j|)."""
        i_max = self.q_offset + n_queries - 1
        j_max = n_keys - 1
        # Largest |i - j| over allowed pairs; wrap matters once it exceeds P / 2.
        span = i_max if self.causal else max(i_max, j_max - self.q_offset)
        if self.sliding_window is not None:
            span = min(span, self.sliding_window - 1)
        return 2 * span > self.period

    def score_mod(self):
        """A FlexAttention score_mod adding the torus bias."""

        def mod(score, b, h, q_idx, kv_idx):
            return score + self.bias(q_idx, kv_idx).to(score.dtype)

        return mod

    def mask_mod(self):
        """A FlexAttention mask_mod for causal / window rules (None if there are none)."""
        if not self.has_mask:
            return None

        def mod(b, h, q_idx, kv_idx):
            return self.allowed(q_idx, kv_idx)

        return mod


def expand_key_padding(key_padding_mask: torch.Tensor | None, depth: int) -> torch.Tensor | None:
    """(B, N) True-for-real-token mask -> (B, N*D) over platter-tokens."""
    if key_padding_mask is None:
        return None
    return key_padding_mask.to(torch.bool).repeat_interleave(depth, dim=1)

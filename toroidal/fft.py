"""FFT approximation of toroidal attention: content-free mixing on the torus in O(N log N).

Exact toroidal attention weighs key (j, l) for query (i, k) by the query-key product plus
the torus bias. This approximation drops the per-pair product, so that per head and platter
pair (k, l) the weight depends only on the offset d = i - j:

    a_kl(d) ∝ allowed(d) * exp(-lambda * delta(d; k, l) + theta[h, k, l, bucket(d)] + c[b, h, k, l])

normalized over every allowed, unpadded key (j, l) of the row (a softmax over (j, l)), so

    y[i, k] = sum_l sum_j a_kl(i - j) v[j, l] / Z[i, k]

is a sum of D x D convolutions along positions, computed with `torch.fft`:

- delta and allowed are the one definition in `toroidal.geometry` (ring distance with period P,
  causal, circular window, a host's sliding window), evaluated at offsets: both depend on
  positions only through i - j.
- theta: learned logits per (head, platter pair) over `2 * buckets` offset buckets: `buckets`
  for keys behind the query on the ring's short way round, `buckets` for keys ahead. The first
  buckets // 2 ring distances get a bucket each, the rest log-spaced up to P / 2, so the
  parameter count (H * D^2 * 2 * buckets) does not grow with N. Zero at start: the layer then
  computes exact toroidal attention with every query set to zero.
- c (optional, `content=True`, bidirectional only): scale * <mean_i q[i, k], mean_j k[j, l]>,
  pooled over the real positions of the sequence. It is constant over the call, so the
  weights stay circulant; pooling would leak future tokens, so causal calls refuse it.
- Bidirectional with P dividing N, no padding and no sliding window: a_kl(d) depends on d mod N,
  the weights are circulant and one circular FFT of length N computes them exactly. Otherwise
  the weights are Toeplitz (they depend on d itself), computed as a zero-padded linear
  convolution of FFT length >= 2N - 1. The normalizer Z is the same
  convolution applied to the padding mask (ones without padding), so it is exact per row;
  rows with no real key in reach give zeros.

Float32 FFTs have an absolute roundoff near 1e-7 times the kernel's total mass; rows whose
own mass is orders of magnitude below it (only possible with extreme learned logits) lose
accuracy. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from toroidal.geometry import position_allowed, sliding_window_that_bites, toroidal_distance

DEFAULT_BUCKETS = 16


def offset_buckets(offsets: torch.Tensor, period: int, buckets: int) -> torch.Tensor:
    """Bucket index in [0, 2 * buckets) of each position offset d = i - j on a ring of `period`.

    The signed ring offset r in (-P/2, P/2] (the short way round) picks the half: r >= 0
    (key behind or at the query) in [0, buckets), r < 0 in [buckets, 2 * buckets). Within a
    half, ring distances below buckets // 2 are exact, longer ones log-spaced up to P // 2.
    """
    residue = offsets % period
    signed = torch.where(2 * residue > period, residue - period, residue)
    distance = signed.abs()
    exact = max(1, buckets // 2)
    span = math.log(max(period // 2, exact + 1) / exact)
    scaled = torch.log(distance.clamp_min(1).to(torch.float64) / exact) / span * (buckets - exact)
    index = torch.where(distance < exact, distance, exact + scaled.long()).clamp_max(buckets - 1)
    return index + buckets * (signed < 0).long()


def convolution_plan(
    n: int, period: int, causal: bool, padded: bool, sliding_window: int | None = None
) -> tuple[str, int]:
    """("circular", N) when the weights are circulant over the N positions, else ("linear", FFT length).

    `sliding_window`: one that bites (a linear window is not circulant)."""
    if not causal and not padded and sliding_window is None and n % period == 0:
        return "circular", n
    return "linear", _smooth_length(2 * n - 1)


def _smooth_length(minimum: int) -> int:
    """The smallest 2^a 3^b 5^c >= minimum: lengths the FFT handles fast."""
    best = 1 << (minimum - 1).bit_length()
    five = 1
    while five < best:
        three = five
        while three < best:
            length = three
            while length < minimum:
                length *= 2
            best = min(best, length)
            three *= 3
        five *= 5
    return best


def _offsets(plan: str, length: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The offset d held at each index t of the FFT kernel, and whether t holds one at all.

    Circular: d = t. Linear: t < N holds d = t >= 0 and t > length - N holds d = t - length < 0
    (wrapped), the indices between stay zero so the convolution never wraps into real rows.
    """
    t = torch.arange(length, device=device)
    if plan == "circular":
        return t, torch.ones(length, dtype=torch.bool, device=device)
    return torch.where(t < n, t, t - length), (t < n) | (t > length - n)


def _torus_scores(offsets, *, depth, lambda_distance, period, offset_logits, dtype) -> torch.Tensor:
    """(H or 1, D, D, T): -lambda * delta plus the learned logit, per platter pair and offset."""
    platters = torch.arange(depth, device=offsets.device)
    distance = toroidal_distance(offsets, platters.view(-1, 1, 1), 0, platters.view(1, -1, 1), period, depth)
    scores = (-lambda_distance * distance).to(dtype).unsqueeze(0)
    if offset_logits is not None:
        buckets = offset_logits.shape[-1] // 2
        scores = scores + offset_logits.to(dtype)[..., offset_buckets(offsets, period, buckets)]
    return scores


def _content_logits(q, k, key_padding_mask, depth, scale, dtype) -> torch.Tensor:
    """(B, H, D, D): scale * <pooled q of platter k, pooled k of platter l>, over real positions."""
    b, h, n, e = q.shape
    real = (
        torch.ones(b, n, dtype=dtype, device=q.device)
        if key_padding_mask is None
        else key_padding_mask.to(dtype)
    )
    weights = (real / real.sum(-1, keepdim=True).clamp_min(1))[:, None, :, None, None]
    pooled_q = (q.to(dtype).reshape(b, h, n, depth, e // depth) * weights).sum(2)
    pooled_k = (k.to(dtype).reshape(b, h, n, depth, e // depth) * weights).sum(2)
    return scale * torch.einsum("bhkw,bhlw->bhkl", pooled_q, pooled_k)


def _check_call(q, k, v, depth, key_padding_mask, causal, q_offset, content, offset_logits) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must be (B, H, N, e) with k and v alike; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, h, n_q, e = q.shape
    if k.shape[0] != b or k.shape[-1] != e or h % k.shape[1]:
        raise ValueError(f"k, v {tuple(k.shape)} must match q {tuple(q.shape)} (heads a multiple of k's)")
    if e % depth:
        raise ValueError(f"depth={depth} must divide the head dimension {e}")
    if q_offset < 0 or q_offset + n_q != k.shape[2]:
        raise ValueError(
            f"fft mixing computes the query rows q_offset.. of its keys: needs q_offset + N_q = N_k, "
            f"got {q_offset} + {n_q} != {k.shape[2]}"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be (B, N_k) = {(b, k.shape[2])}; got {tuple(key_padding_mask.shape)}"
        )
    if content and causal:
        raise ValueError(
            "fft content=True pools queries and keys over the whole sequence, which would leak future "
            "tokens into causal attention; use content=False with causal=True"
        )
    if offset_logits is not None and (
        offset_logits.dim() != 4 or offset_logits.shape[:3] != (h, depth, depth) or offset_logits.shape[3] % 2
    ):
        raise ValueError(
            f"offset_logits must be (H, D, D, 2 * buckets) = ({h}, {depth}, {depth}, even); "
            f"got {tuple(offset_logits.shape)}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fft_toroidal_mixing(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    depth: int,
    lambda_distance: float = 0.0,
    period: int | None = None,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    offset_logits: torch.Tensor | None = None,
    content: bool = False,
    q_offset: int = 0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The FFT approximation (module docstring) on per-head tensors, in O(N log N).

    q: (B, H, N_q, e); k, v: (B, H_kv, N_k, e) with H a multiple of H_kv; N_q = N_k - q_offset
    (the rows q_offset.. of the keys, e.g. the new tokens of KV-cache decoding). q and k are
    used only by `content=True`. `period=None` means P = N_k. `offset_logits`: (H, D, D, 2 *
    buckets) learned logits or None. Returns (B, H, N_q, e) in q's dtype.
    """
    _check_call(q, k, v, depth, key_padding_mask, causal, q_offset, content, offset_logits)
    b, h, n_q, e = q.shape
    n = k.shape[2]
    period = period if period is not None else n
    if k.shape[1] != h:
        k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    dtype = _compute_dtype(v)
    sliding_window = sliding_window_that_bites(sliding_window, n_q, n, q_offset, causal)
    plan, length = convolution_plan(n, period, causal, key_padding_mask is not None, sliding_window)
    offsets, held = _offsets(plan, length, n, v.device)
    scores = _torus_scores(
        offsets, depth=depth, lambda_distance=lambda_distance, period=period, offset_logits=offset_logits,
        dtype=dtype,
    )  # fmt: skip
    allowed = held & position_allowed(offsets, 0, causal, window, period, sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Any per-(head, query platter) constant cancels in the normalization: subtract the max.
    kernel = torch.exp(scores - scores.amax(dim=(-2, -1), keepdim=True).detach())
    kernel_f = torch.fft.rfft(kernel, n=length).unsqueeze(0)  # (1, H', D, D, F)
    if content:
        scale = scale if scale is not None else (e // depth) ** -0.5
        logits = _content_logits(q, k, key_padding_mask, depth, scale, dtype)
        kernel_f = kernel_f * torch.exp(logits - logits.amax(-1, keepdim=True).detach()).unsqueeze(-1)

    values = v.to(dtype).reshape(b, h, n, depth, e // depth)
    real = torch.ones(1, n, dtype=dtype, device=v.device)
    if key_padding_mask is not None:
        real = key_padding_mask.to(dtype)
        values = values * real[:, None, :, None, None]
    values_f = torch.fft.rfft(values.permute(0, 1, 3, 4, 2), n=length)  # (B, H, D, w, F)
    mixed = torch.fft.irfft(torch.einsum("bhklf,bhlcf->bhkcf", kernel_f, values_f), n=length)
    # The normalizer: the same convolution applied to the real-key indicator (ones without padding).
    norm = torch.fft.irfft(kernel_f.sum(3) * torch.fft.rfft(real, n=length)[:, None, None], n=length)
    rows = slice(q_offset, n)
    norm = norm[..., None, rows]
    if key_padding_mask is None:
        out = mixed[..., rows] / norm
    else:
        # Rows with no real key in reach: divide by 1, not by a roundoff-sized normalizer, so that
        # neither the output nor its gradient (which torch.where does not stop) sees inf or NaN.
        reach = _keys_in_reach(allowed, key_padding_mask, length)[:, None, None, None, rows]
        out = mixed[..., rows] / torch.where(reach, norm, torch.ones((), dtype=dtype, device=v.device))
        out = torch.where(reach, out, torch.zeros((), dtype=dtype, device=v.device))
    return out.permute(0, 1, 4, 2, 3).reshape(b, h, n_q, e).to(q.dtype)


def _keys_in_reach(allowed: torch.Tensor, key_padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, N) whether each row has a real key it may attend: an exact integer count, by FFT in float64."""
    n = key_padding_mask.shape[1]
    counts = torch.fft.irfft(
        torch.fft.rfft(allowed.to(torch.float64), n=length)
        * torch.fft.rfft(key_padding_mask.to(torch.float64), n=length),
        n=length,
    )[..., :n]
    return counts.round() > 0


def materialized_circulant(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    depth: int,
    lambda_distance: float = 0.0,
    period: int | None = None,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    offset_logits: torch.Tensor | None = None,
    content: bool = False,
    q_offset: int = 0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The weights `fft_toroidal_mixing` applies, as a dense (B, H, N_q*D, N_k*D) matrix.

    Built from (position, platter) index grids, not from offsets or FFTs: the independent
    O(L^2) statement of the same function (tests, and `return_attention`). Rows with no
    real key in reach are zero. Computed in float32 (float64 for float64 inputs).
    """
    _check_call(q, k, k, depth, key_padding_mask, causal, q_offset, content, offset_logits)
    b, h, n_q, e = q.shape
    n = k.shape[2]
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    period = period if period is not None else n
    dtype = _compute_dtype(q)
    device = q.device
    # Axes (N_q, D, N_k, D): query position i, query platter, key position j, key platter.
    i = (q_offset + torch.arange(n_q, device=device)).view(n_q, 1, 1, 1)
    j = torch.arange(n, device=device).view(1, 1, n, 1)
    platters = torch.arange(depth, device=device)
    distance = toroidal_distance(
        i, platters.view(1, depth, 1, 1), j, platters.view(1, 1, 1, depth), period, depth
    )
    scores = (-lambda_distance * distance).to(dtype)[None, None]  # (1, 1, N_q, D, N_k, D)
    if offset_logits is not None:
        index = offset_buckets(i.view(n_q, 1) - j.view(1, n), period, offset_logits.shape[-1] // 2)
        learned = offset_logits.to(dtype)[..., index]  # (H, D, D, N_q, N_k)
        scores = scores + learned.permute(0, 3, 1, 4, 2)[None]
    if content:
        scale = scale if scale is not None else (e // depth) ** -0.5
        logits = _content_logits(q, k, key_padding_mask, depth, scale, dtype)  # (B, H, D, D)
        scores = scores + logits[:, :, None, :, None, :]
    allowed = position_allowed(i, j, causal, window, period, sliding_window)
    allowed = allowed[None, None]  # (1, 1, N_q, 1, N_k, 1)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, None, None, :, None]
    shape = (b, h, n_q, depth, n, depth)
    scores = scores.expand(shape).reshape(b, h, n_q * depth, n * depth)
    allowed = allowed.expand(shape).reshape(b, h, n_q * depth, n * depth)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros((), dtype=dtype, device=device))


class FFTToroidalMixing(nn.Module):
    """The FFT approximation with its learned offset logits, called with `toroidal_attention`'s
    keywords so that `ToroidalAttention(approximation="fft")` can call it in the kernel's place.

    `buckets=0` learns nothing (pure torus-bias mixing). `backend` is accepted and ignored: the
    FFT is the computation. `return_weights` gives the dense circulant (O(L^2) memory).
    """

    def __init__(self, heads: int, depth: int, buckets: int = DEFAULT_BUCKETS, content: bool = False):
        super().__init__()
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 0:
            raise ValueError(
                f"fft buckets={buckets!r}: must be an integer >= 0 (0: no learned offset logits)"
            )
        if not isinstance(content, bool):
            raise ValueError(f"fft content={content!r}: must be true or false")
        self.depth, self.buckets, self.content = depth, buckets, content
        self.offset_logits = nn.Parameter(torch.zeros(heads, depth, depth, 2 * buckets)) if buckets else None

    def forward(
        self, q, k, v, *, depth, lambda_distance=0.0, period=None, causal=False, window=None,
        key_padding_mask=None, scale=None, backend=None, q_offset=0, return_weights=False, always_tuple=False,
        sliding_window=None,
    ):  # fmt: skip
        if depth != self.depth:
            raise ValueError(f"fft mixing was built for depth {self.depth}, called with depth {depth}")
        torus = dict(
            depth=depth, lambda_distance=lambda_distance, period=period, causal=causal, window=window,
            key_padding_mask=key_padding_mask, scale=scale, offset_logits=self.offset_logits,
            content=self.content, q_offset=q_offset, sliding_window=sliding_window,
        )  # fmt: skip
        out = fft_toroidal_mixing(q, k, v, **torus)
        if not (return_weights or always_tuple):
            return out
        return out, (materialized_circulant(q, k, **torus) if return_weights else None)

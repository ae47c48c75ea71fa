"""`flash2`: exact toroidal attention composed from flash-attn 2 calls, forward and backward.

Query platters become heads (query head h*D + k reads key head h: flash-attn's grouped
queries), and each call reads one key platter l, so the platter term -lambda*|k - l|/D is a
constant per (call, head). The positions are cut into the bands of m = i - j on which the
ring distance is linear (`TorusGeometry.linear_segments`): ring = slope*m + offset. On a band
[lo, hi] flash-attn's ALiBi gives the ring term exactly, once its kink sits at an end of the
band:

- flash-attn's bias is -a*|t| with t = r + Sk - Sq - c: the row's "diagonal" column is pinned
  bottom-right, so with query rows i in [A, B) and key positions j in [C, E), t = m + (E - B).
- Not flipped: E = B - lo puts the kink at m = lo; the band is 0 <= t <= hi - lo, window_size
  = (hi - lo, 0), and -a*t = -a*(m - lo) is the ring term -lambda*ring/P up to a constant with
  a = lambda*slope/P (negative on a far band, where the ring distance falls as m grows).
  Every key of the band must exist: rows i < Nk + lo, which holds for every band with
  lo >= 0 whenever no query lies past the last key.
- Flipped (rows and keys reversed, so the diagonal is pinned top-left instead): C = A - hi
  puts the kink at m = hi, t = hi - m, the same window (hi - lo, 0) and a = -lambda*slope/P.
  It needs rows i >= hi: every band with hi < 0 (keys after the query, bidirectional calls),
  and the rows past Nk + lo of the others.
- The band's constant -lambda*ring(kink)/P and the platter term are added to each call's
  log-sum-exp; all calls merge by log-sum-exp in float32.

With lambda = 0 there is no kink: adjacent bands join into intervals of m, one window each.
Backward: each call runs flash-attn's own backward with the merged output and the merged
log-sum-exp minus that call's offset, which gives exactly its share of dq, dk and dv (the
ring-flash-attention identity), accumulated in float32.

Not served: key padding (flash-attn can only drop keys at the ends of a call, and the band's
alignment pins those), attention weights, queries past the last key whose band kink no call
can place, and more than `_MAX_BANDS` bands (a period much shorter than the sequence).
The flash-attn calls go through an adapter (`flash_adapter`); `TorchFlashAdapter` runs the
same composition on any device and dtype for tests.

The composition is a pair of registered operators, `torch.ops.toroidal.flash2_forward` (output
and log-sum-exp) and `flash2_backward`, with fake implementations and registered autograd, as
`native`'s; the adapter travels by name ("flash_attn" or "torch").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from toroidal.geometry import TorusGeometry
from toroidal.kernels.base import Backend, BackendUnavailable, register, register_lse_autograd
from toroidal.kernels.flash_adapter import FlashAttnAdapter, TorchFlashAdapter

__all__ = ["FlashCall", "Flash2Backend", "TorchFlashAdapter", "plan_calls", "torus_flash_attention"]

_MAX_BANDS = 64  # bands of the ring; each is D flash calls


@dataclass(frozen=True)
class FlashCall:
    """One flash-attn call (per key platter): query positions [rows), key positions [keys)."""

    rows: tuple[int, int]
    keys: tuple[int, int]
    flipped: bool  # rows and keys reversed: flash's diagonal pinned at the first row and key
    window: tuple[int, int]  # flash's window_size in the call's own (possibly flipped) order
    slope: float  # ALiBi slope for every head (0.0: none)
    offset: float  # -lambda * ring(kink) / P, added to the call's log-sum-exp


def _call(rows, keys, flipped, window, slope, offset) -> FlashCall | None:
    """A call with its window written the way flash-attn runs fastest (-1 where nothing is cut), or
    None where flash-attn would misread it: it takes a size >= Sk as unbounded, which for the right
    size holds only once right >= Sq - 1."""
    n_rows, n_keys = rows[1] - rows[0], keys[1] - keys[0]
    left, right = window
    left = -1 if left >= n_keys - 1 else left  # every row already reaches key 0
    right = -1 if right >= n_rows - 1 else right  # every row already reaches the last key
    if right >= n_keys:
        return None
    return FlashCall(rows, keys, flipped, (left, right), slope, offset)


def _intervals(segments):
    """Adjacent bands joined: (lo, hi) intervals of m (lambda = 0 needs no kink)."""
    joined: list[list[int]] = []
    for seg in segments:
        if joined and joined[-1][1] + 1 == seg.lo:
            joined[-1][1] = seg.hi
        else:
            joined.append([seg.lo, seg.hi])
    return [tuple(pair) for pair in joined]


def _unbiased_calls(intervals, first: int, last: int, n_keys: int):
    """lambda = 0: one call per interval [lo, hi] of m, its window the interval (t = m + shift)."""
    for lo, hi in intervals:
        start, stop = max(first, lo), min(last, n_keys + hi)  # rows with a key in [lo, hi]
        if start < stop:
            end = min(n_keys, stop - lo)
            shift = end - stop
            yield _call((start, stop), (max(0, start - hi), end), False, (hi + shift, -shift - lo), 0.0, 0.0)


def _band_calls(segments, first: int, last: int, n_keys: int, lam: float, period: int):
    """lambda != 0: per band, calls with flash's ALiBi kink at the band's end m = lo (or m = hi, flipped)."""
    for seg in segments:
        lo, hi = seg.lo, seg.hi
        start, stop = max(first, lo), min(last, n_keys + hi)  # rows with a key in [lo, hi]
        if start >= stop:
            continue
        ring_slope = lam * seg.slope / period
        split = min(stop, n_keys + lo) if lo >= 0 else start  # rows [start, split): kink at m = lo
        if split > start:
            offset = -lam * (seg.slope * lo + seg.offset) / period
            keys = (max(0, start - hi), split - lo)
            yield _call((start, split), keys, False, (hi - lo, 0), ring_slope, offset)
        if split < stop:  # rows [split, stop): kink at m = hi, which needs rows >= hi
            offset = -lam * (seg.slope * hi + seg.offset) / period
            keys = (split - hi, min(n_keys, stop - lo))
            yield _call((split, stop), keys, True, (hi - lo, 0), -ring_slope, offset) if split >= hi else None


def plan_calls(
    geometry: TorusGeometry, n_queries: int, n_keys: int, max_bands: int | None = _MAX_BANDS
) -> list[FlashCall] | str:
    """The flash calls (each one per key platter) computing `geometry` exactly, or why there are none.

    Queries at positions before n_keys always have a plan; queries past the last key may not.
    """
    first, last = geometry.q_offset, geometry.q_offset + n_queries
    unbiased = geometry.lambda_distance == 0
    if unbiased and not _cuts_the_ring(geometry):  # one interval of m: every pair, or the causal half
        lo = max(0, first - n_keys + 1) if geometry.causal else first - n_keys + 1
        pieces = [(lo, last - 1)] if lo <= last - 1 else []
    else:
        limit = 2 * (n_queries + n_keys) + 4 if unbiased or max_bands is None else max_bands
        segments = geometry.linear_segments(n_queries, n_keys, limit)
        pieces = _intervals(segments) if unbiased else segments
    if pieces is None or (max_bands is not None and len(pieces) > max_bands):
        return (
            f"flash2 would need more than {max_bands} bands of the ring (period {geometry.period} "
            f"much shorter than {n_keys} keys); use flex or sdpa"
        )
    if unbiased:
        calls = list(_unbiased_calls(pieces, first, last, n_keys))
    else:
        calls = list(_band_calls(pieces, first, last, n_keys, geometry.lambda_distance, geometry.period))
    if None in calls:
        return (
            f"flash2 cannot align its bands for queries past the last key (q_offset {geometry.q_offset} "
            f"+ {n_queries} queries > {n_keys} keys); use flex or sdpa"
        )
    return calls


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Layout:
    """Platter-token tensors (B, H, N*D, w) <-> flash layout: queries (B, N, H*D, w), keys per platter."""

    def __init__(self, q, k, fold: int):
        self.batch, self.heads, length, self.width = q.shape
        self.fold = fold
        self.n_queries, self.n_keys = length // fold, k.shape[-2] // fold

    def queries(self, x):  # (B, H, Nq*D, w) -> (B, Nq, H*D, w); head h*D + k is platter k of head h
        b, h, n, d, w = self.batch, self.heads, self.n_queries, self.fold, self.width
        return x.reshape(b, h, n, d, w).permute(0, 2, 1, 3, 4).reshape(b, n, h * d, w)

    def from_queries(self, x):  # inverse of `queries`
        b, h, n, d, w = self.batch, self.heads, self.n_queries, self.fold, self.width
        return x.reshape(b, n, h, d, w).permute(0, 2, 1, 3, 4).reshape(b, h, n * d, w)

    def lse_from_queries(self, x):  # (B, H*D, Nq) -> (B, H, Nq*D): the log-sum-exp beside the output
        b, h, n, d = self.batch, self.heads, self.n_queries, self.fold
        return x.reshape(b, h, d, n).transpose(2, 3).reshape(b, h, n * d)

    def lse_queries(self, x):  # inverse of `lse_from_queries`
        b, h, n, d = self.batch, self.heads, self.n_queries, self.fold
        return x.reshape(b, h, n, d).transpose(2, 3).reshape(b, h * d, n)

    def key_platters(self, x):  # (B, H, Nk*D, w) -> (D, B, Nk, H, w): [l] holds key platter l
        b, h, n, d, w = self.batch, self.heads, self.n_keys, self.fold, self.width
        return x.reshape(b, h, n, d, w).permute(3, 0, 2, 1, 4).contiguous()

    def from_key_platters(self, x):  # inverse of `key_platters`
        b, h, n, d, w = self.batch, self.heads, self.n_keys, self.fold, self.width
        return x.permute(1, 3, 2, 0, 4).reshape(b, h, n * d, w)


def _flip(x, dim, flipped):
    return x.flip(dim) if flipped else x


def _merge_into(acc, run, out, lse):
    """acc/run (the merged output and log-sum-exp of some rows) absorb one call's (out, lse), in place."""
    new = torch.logaddexp(run, lse)
    empty = torch.isneginf(new)
    keep = torch.where(empty, 0.0, torch.exp(run - new))
    add = torch.where(empty, 0.0, torch.exp(lse - new))
    acc.mul_(keep.transpose(1, 2).unsqueeze(-1)).add_(add.transpose(1, 2).unsqueeze(-1) * out.to(acc.dtype))
    run.copy_(new)


@dataclass(frozen=True)
class _Composition:
    """Everything but the tensors: the calls, the platter fold, the offsets' ingredients, the adapter."""

    calls: tuple[FlashCall, ...]
    fold: int  # D: query platters as heads, one key platter per call (1: plain platter-tokens)
    q_offset: int  # position of query row 0
    lam: float
    scale: float
    adapter: object  # a FlashAttnAdapter or TorchFlashAdapter instance

    def pieces(self, heads: int, device, dtype):
        """(call, key platter, query rows, ALiBi slopes or None, lse offset (Hq, 1)) of every flash call."""
        platter = torch.arange(heads, device=device) % self.fold
        for call in self.calls:
            rows = slice(call.rows[0] - self.q_offset, call.rows[1] - self.q_offset)
            slopes = None
            if call.slope != 0.0:
                slopes = torch.full(
                    (heads,), call.slope, dtype=dtype, device=device
                )  # float32 for flash-attn
            for l in range(self.fold):
                offset = call.offset - self.lam * (platter - l).abs().to(dtype) / self.fold
                yield call, l, rows, slopes, offset[:, None]

    def options(self, call, slopes) -> dict:
        return dict(causal=False, window_size=call.window, alibi_slopes=slopes, softmax_scale=self.scale)


# The composition is a pair of registered operators, `torch.ops.toroidal.flash2_forward` and
# `flash2_backward`, with fake (shape-only) implementations and registered autograd, as `native`'s:
# torch.compile traces them without a graph break. The geometry travels as plain arguments, the
# adapter by name ("flash_attn": `FlashAttnAdapter`, "torch": `TorchFlashAdapter`); `keep` (key
# padding) is always None here and only keeps the signature `register_lse_autograd` expects.
#
# The log-sum-exp comes back in the platter-token layout of the output: (B, H, Lq) in the compute
# dtype (float64 for float64 inputs, float32 otherwise), contiguous, natural log, scale and torus
# bias included; -inf on a row with no key to attend.

_ADAPTERS = {"flash_attn": FlashAttnAdapter(), "torch": TorchFlashAdapter()}


def adapter_name(adapter) -> str:
    """The operators' name for an adapter instance (or a name already)."""
    if isinstance(adapter, str):
        if adapter not in _ADAPTERS:
            raise ValueError(f"unknown flash2 adapter {adapter!r}; choose one of {', '.join(_ADAPTERS)}")
        return adapter
    for name, known in _ADAPTERS.items():
        if isinstance(adapter, type(known)):
            return name
    raise TypeError(f"flash2 takes a FlashAttnAdapter or a TorchFlashAdapter, got {type(adapter).__name__}")


@functools.lru_cache(maxsize=256)
def _cached_plan(geometry: TorusGeometry, n_queries: int, n_keys: int):
    fold, q_offset, calls = planned_calls(geometry, n_queries, n_keys)
    return fold, q_offset, calls if isinstance(calls, str) else tuple(calls)


def _composition(q, k, geometry_args, scale, adapter) -> _Composition:
    depth, period, lambda_distance, causal, window, sliding_window, q_offset = geometry_args
    geometry = TorusGeometry(depth, period, lambda_distance, causal, window, q_offset, sliding_window)
    fold, plan_offset, calls = _cached_plan(geometry, q.shape[-2] // depth, k.shape[-2] // depth)
    if isinstance(calls, str):
        raise BackendUnavailable(f"backend 'flash2' unavailable: {calls}")
    return _Composition(calls, fold, plan_offset, lambda_distance, scale, _ADAPTERS[adapter_name(adapter)])


@torch.library.custom_op("toroidal::flash2_forward", mutates_args=())
def flash2_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, depth: int, period: int,
    lambda_distance: float, causal: bool, window: int | None, sliding_window: int | None, q_offset: int,
    scale: float, adapter: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(output (B, H, Lq, w) in q's dtype, log-sum-exp (B, H, Lq) in the compute dtype) of the flash
    composition on platter-tokens q (B, H, Lq, w), k and v (B, H, Lk, w); both contiguous."""
    if keep is not None:
        raise BackendUnavailable("backend 'flash2' unavailable: flash2 takes no key padding mask")
    geometry = (depth, period, lambda_distance, causal, window, sliding_window, q_offset)
    plan = _composition(q, k, geometry, scale, adapter)
    layout = _Layout(q, k, plan.fold)
    dtype = _compute_dtype(q.dtype)
    qf = layout.queries(q)
    batch, n_queries, heads, width = qf.shape
    acc = torch.zeros(batch, n_queries, heads, width, dtype=dtype, device=q.device)
    run = torch.full((batch, heads, n_queries), float("-inf"), dtype=dtype, device=q.device)
    kp, vp = layout.key_platters(k), layout.key_platters(v)
    for call, l, rows, slopes, offset in plan.pieces(heads, q.device, dtype):
        keys = slice(*call.keys)
        qs = _flip(qf[:, rows], 1, call.flipped)
        ks, vs = (_flip(t[l, :, keys], 1, call.flipped) for t in (kp, vp))
        out, lse = plan.adapter.forward(qs, ks, vs, **plan.options(call, slopes))
        out, lse = _flip(out, 1, call.flipped), _flip(lse, -1, call.flipped).to(dtype)
        # flash-attn's +inf (a row with no key in this call) carries no mass.
        lse = torch.where(torch.isfinite(lse), lse + offset, float("-inf"))
        _merge_into(acc[:, rows], run[:, :, rows], out, lse)
    out = layout.from_queries(acc.to(q.dtype)).contiguous()
    return out, layout.lse_from_queries(run).contiguous()


@flash2_forward.register_fake
def _flash2_forward_fake(q, k, v, keep, *geometry_and_options):
    *lead, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(lead, dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("toroidal::flash2_backward", mutates_args=())
def flash2_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor, grad: torch.Tensor, depth: int, period: int, lambda_distance: float, causal: bool,
    window: int | None, sliding_window: int | None, q_offset: int, scale: float, adapter: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (q, k, v), contiguous, from the forward's output and log-sum-exp: each flash call's
    own backward given the merged output and the merged log-sum-exp minus that call's offset."""
    geometry = (depth, period, lambda_distance, causal, window, sliding_window, q_offset)
    plan = _composition(q, k, geometry, scale, adapter)
    layout = _Layout(q, k, plan.fold)
    dtype = _compute_dtype(q.dtype)
    qf, outf, dout = layout.queries(q), layout.queries(out.to(q.dtype)), layout.queries(grad.to(q.dtype))
    run = layout.lse_queries(lse.to(dtype))
    # A row with no key anywhere has lse -inf: +inf makes each of its probabilities 0.
    lse_all = torch.where(torch.isneginf(run), float("inf"), run)
    kp, vp = layout.key_platters(k), layout.key_platters(v)
    dq = torch.zeros(qf.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(kp.shape, dtype=dtype, device=q.device)
    dv = torch.zeros_like(dk)
    for call, l, rows, slopes, offset in plan.pieces(qf.shape[2], q.device, dtype):
        keys = slice(*call.keys)
        qs, outs, douts = (_flip(t[:, rows], 1, call.flipped) for t in (qf, outf, dout))
        ks, vs = (_flip(t[l, :, keys], 1, call.flipped) for t in (kp, vp))
        lse_c = _flip(lse_all[:, :, rows] - offset, -1, call.flipped)
        dq_c, dk_c, dv_c = plan.adapter.backward(douts, qs, ks, vs, outs, lse_c, **plan.options(call, slopes))
        dq[:, rows] += _flip(dq_c, 1, call.flipped).to(dtype)
        dk[l, :, keys] += _flip(dk_c, 1, call.flipped).to(dtype)
        dv[l, :, keys] += _flip(dv_c, 1, call.flipped).to(dtype)
    dq = layout.from_queries(dq).to(q.dtype).contiguous()
    dk = layout.from_key_platters(dk).to(k.dtype).contiguous()
    dv = layout.from_key_platters(dv).to(v.dtype).contiguous()
    return dq, dk, dv


@flash2_backward.register_fake
def _flash2_backward_fake(q, k, v, keep, out, lse, grad, *geometry_and_options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


# The overloads themselves: calling them skips the Python wrapper's checks.
_FORWARD_OP = torch.ops.toroidal.flash2_forward.default
_BACKWARD_OP = torch.ops.toroidal.flash2_backward.default
register_lse_autograd(flash2_forward, _BACKWARD_OP)


def geometry_args(geometry: TorusGeometry) -> tuple:
    """A `TorusGeometry` as the operators' arguments (depth ... q_offset), before the scale."""
    g = geometry
    return (g.depth, g.period, float(g.lambda_distance), g.causal, g.window, g.sliding_window, g.q_offset)


def _cuts_the_ring(geometry: TorusGeometry) -> bool:
    """Whether a window removes anything (a ring distance never exceeds P // 2; a host's sliding
    window is only set where it bites)."""
    circular = geometry.window is not None and geometry.window < geometry.period // 2
    return circular or geometry.sliding_window is not None


def _is_masked(geometry: TorusGeometry) -> bool:
    return geometry.causal or _cuts_the_ring(geometry)


def _folded(geometry: TorusGeometry, n_key_tokens: int) -> tuple[int, TorusGeometry]:
    """(fold, geometry of the folded positions); lambda = 0, no mask: plain attention on platter-tokens."""
    if geometry.lambda_distance == 0 and not _is_masked(geometry):
        return 1, TorusGeometry(1, max(1, n_key_tokens), 0.0, False)
    return geometry.depth, geometry


def planned_calls(geometry: TorusGeometry, n_queries: int, n_keys: int, max_bands=_MAX_BANDS):
    """(fold, q_offset, the calls or why there are none) for n_queries x n_keys positions."""
    fold, folded = _folded(geometry, n_keys * geometry.depth)
    tokens = geometry.depth // fold  # platter-tokens per position of the folded call
    return fold, folded.q_offset, plan_calls(folded, n_queries * tokens, n_keys * tokens, max_bands)


def torus_flash_attention(q, k, v, geometry: TorusGeometry, scale: float, adapter):
    """Toroidal attention of platter-tokens q (B, H, Nq*D, w), k, v (B, H, Nk*D, w) composed of flash calls.

    Runs `torch.ops.toroidal.flash2_forward`: differentiable in q, k and v (no double backward).
    `adapter`: a `FlashAttnAdapter` or `TorchFlashAdapter` (or its name, "flash_attn" or "torch").
    Raises `BackendUnavailable` where no plan exists (see `plan_calls`).
    """
    depth = geometry.depth
    _, _, calls = _cached_plan(geometry, q.shape[-2] // depth, k.shape[-2] // depth)
    if isinstance(calls, str):
        raise BackendUnavailable(f"backend 'flash2' unavailable: {calls}")
    return _FORWARD_OP(q, k, v, None, *geometry_args(geometry), float(scale), adapter_name(adapter))[0]


def unsupported_call(request) -> str | None:
    """The first condition of this call the composition cannot serve, whatever runs the flash calls."""
    if request.need_weights:
        return "flash2 cannot return attention weights; use backend='reference'"
    if request.has_padding:
        return (
            "flash2 takes no key padding mask (flash-attn calls can only drop keys at a band's "
            "pinned ends); use flex or sdpa"
        )
    _, _, calls = planned_calls(request.geometry, request.n_queries, request.n_keys)
    return calls if isinstance(calls, str) else None


class Flash2Backend(Backend):
    name = "flash2"
    description = "flash-attn 2 calls per ring band and key platter, merged by log-sum-exp (CUDA, fp16/bf16)"

    def __init__(self) -> None:
        # Tests set `TorchFlashAdapter()` here: the same composition in plain PyTorch, any device and dtype.
        self.adapter = FlashAttnAdapter()

    def unavailable_reason(self, request):
        return self.adapter.unavailable_reason(request) or unsupported_call(request)

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        reason = None
        if key_padding is not None:
            reason = "flash2 takes no key padding mask"
        elif need_weights:
            reason = "flash2 cannot return attention weights"
        elif isinstance(self.adapter, FlashAttnAdapter):
            reason = self.adapter.head_dim_reason(q.shape[-1])  # the request does not carry the width
        if reason is not None:
            raise BackendUnavailable(f"backend 'flash2' unavailable: {reason}")
        return torus_flash_attention(q, k, v, geometry, scale, self.adapter), None


register(Flash2Backend())

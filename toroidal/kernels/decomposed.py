"""`decomposed`: the torus bias split into exact low-rank pieces for PyTorch's fused CPU kernel.

Serves CPU, float32 or float64 (computed in float64), P >= N, no window that bites and no
KV-cache offset. Why it is exact: docs/internals.md. The kernel is a pair of registered operators
(`torch.ops.toroidal.decomposed_forward` / `decomposed_backward`), so torch.compile traces it
as one opaque call and autograd finds the backward by registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from toroidal.kernels.base import Backend, compute_dtype, register, register_lse_autograd

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_PAD_SCORE = -1e9  # finite: exp() underflows to exactly 0 without inf - inf = NaN


@dataclass(frozen=True)
class Piece:
    """A rectangle of positions whose pairs all lie in one linear region of the ring.

    `flip`: both sequences are reversed inside the rectangle (turns j >= i into j <= i).
    `causal`: block-causal in the (possibly flipped) local frame, else full.
    Region bias = alpha + beta * lambda*i/P + sign * lambda*j/P.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    flip: bool
    causal: bool
    alpha: float  # in units of lambda
    beta: int
    sign: int


# Linear forms of -ring/P per region, as (alpha, beta, sign) in units of lambda:
# m = i - j in [0, h]: -(i - j)/P;  m in [-h, -1]: -(j - i)/P;
# m >= h + 1: -(P - i + j)/P;  m <= -h - 1: -(P + i - j)/P.
_NEAR_LOWER, _NEAR_UPPER = (0.0, -1, 1), (0.0, 1, -1)
_FAR_LOWER, _FAR_UPPER = (-1.0, 1, -1), (-1.0, -1, 1)


def _prefix(q0, q1, k0, k1, delta, flip, form, out):
    """Pieces covering pairs (x, y) of local offsets with y <= x + delta in the rectangle."""
    if q1 <= q0 or k1 <= k0:
        return
    if delta < 0:  # the first -delta queries see nothing here
        if flip:
            q1 += delta
        else:
            q0 -= delta
        delta = 0
        if q1 <= q0:
            return
    nq, nk = q1 - q0, k1 - k0
    full_keys = min(delta, nk)

    # Local offsets count from the rectangle's start, or from its end when flipped.
    def qs(a, b):
        return (q1 - b, q1 - a) if flip else (q0 + a, q0 + b)

    def ks(a, b):
        return (k1 - b, k1 - a) if flip else (k0 + a, k0 + b)

    if full_keys:
        out.append(Piece(*qs(0, nq), *ks(0, full_keys), flip, False, *form))
    rest = nk - full_keys
    if rest > 0:
        square = min(nq, rest)
        out.append(Piece(*qs(0, square), *ks(full_keys, full_keys + square), flip, True, *form))
        if nq > rest:
            out.append(Piece(*qs(rest, nq), *ks(full_keys, nk), flip, False, *form))


def _lower(q0, q1, k0, k1, t, form, out):
    """Pairs with m = i - j >= t."""
    _prefix(q0, q1, k0, k1, q0 - t - k0, False, form, out)


def _upper(q0, q1, k0, k1, t, form, out):
    """Pairs with m = i - j <= t (reversed, this is a prefix rule again)."""
    _prefix(q0, q1, k0, k1, (k1 - 1) - (q1 - 1) + t, True, form, out)


def _band(n, lo, hi, form, out):
    """Pairs of [0, n) x [0, n) with lo <= i - j <= hi, in rectangles of one mask type."""
    width = hi - lo + 1
    if width < 1:
        return
    for a in range(0, n, width):
        b = min(a + width, n)
        # Keys before a - lo satisfy m > lo for every query of the chunk; the rest satisfy m <= hi.
        _upper(a, b, max(0, a - hi), max(0, min(n, a - lo)), hi, form, out)
        _lower(a, b, max(0, a - lo), max(0, min(n, b - lo)), lo, form, out)


@lru_cache(maxsize=64)
def plan(n: int, period: int, causal: bool) -> tuple[Piece, ...]:
    """The pieces covering every allowed pair of an n-position sequence (requires period >= n)."""
    # |m| <= near takes the near form. At |m| = P/2 (P even) both forms agree, so it goes to
    # the far band: with N = P the near band is then exactly N/2 wide (whole, aligned pieces).
    near = (period - 1) // 2
    out: list[Piece] = []
    _band(n, 0, near, _NEAR_LOWER, out)
    if near + 1 <= n - 1:
        _lower(0, n, 0, n, near + 1, _FAR_LOWER, out)
    if not causal:
        _band(n, -near, -1, _NEAR_UPPER, out)
        if near + 1 <= n - 1:
            _upper(0, n, 0, n, -near - 1, _FAR_UPPER, out)
    return tuple(p for p in out if p.q1 > p.q0 and p.k1 > p.k0)


def _platter_factors(depth: int, lam: float, dtype):
    """(A, B, r): -lam*|k-l|/D = r[k] + A[k] . B[l] with D-1 features."""
    idx = torch.arange(depth, dtype=torch.float64)
    m = -lam * (idx[:, None] - idx[None, :]).abs() / depth
    r = m[:, 0].clone()
    a = (m - r[:, None])[:, 1:]
    b = torch.eye(depth, dtype=torch.float64)[:, 1:]
    return a.to(dtype), b.to(dtype), r.to(dtype)


class _Augmented:
    """q, k, v with the bias features appended, shared by all pieces of one call.

    Feature columns: [D-1 platter features | ring feature (if lambda) | padding (if any)].
    The ring column of q is +1/scale or -1/scale by region, so two q variants are kept.
    """

    def __init__(self, q, k, v, depth, period, lam, key_padding, scale):
        b, h, length, w = q.shape
        n = length // depth
        dtype = compute_dtype(q.dtype)
        self.depth, self.scale, self.lam = depth, scale, lam
        self.lam_over_p = lam / period
        self.positions = torch.arange(n, device=q.device, dtype=dtype).repeat_interleave(depth)
        a, bmat, r = _platter_factors(depth, lam, dtype)
        self.platter_const = r.to(q.device).repeat(n)
        cols_q, cols_k = [], []
        if depth > 1 and lam:
            cols_q.append(a.to(q.device).repeat(n, 1) / scale)
            cols_k.append(bmat.to(q.device).repeat(n, 1))
        if lam:
            cols_q.append(torch.full((length, 1), 1.0 / scale, device=q.device, dtype=dtype))
            cols_k.append((self.lam_over_p * self.positions)[:, None])
        if key_padding is not None:
            cols_q.append(torch.ones(length, 1, device=q.device, dtype=dtype))
        extra_q = torch.cat(cols_q, -1).to(q.dtype) if cols_q else q.new_zeros(length, 0)
        n_extra = extra_q.shape[-1]
        self.q_plus = torch.cat([q, extra_q.expand(b, h, length, n_extra)], -1)
        self._q_minus = None if lam else self.q_plus
        self._ring_col = w + n_extra - 1 - (key_padding is not None)
        k_parts = [k]
        if cols_k:
            extra_k = torch.cat(cols_k, -1).to(k.dtype)
            k_parts.append(extra_k.expand(b, h, length, extra_k.shape[-1]))
        if key_padding is not None:
            pad_col = torch.where(key_padding, 0.0, _PAD_SCORE / scale).to(k.dtype)
            k_parts.append(pad_col[:, None, :, None].expand(b, h, length, 1))
        self.k = torch.cat(k_parts, -1)
        self.v = torch.cat([v, v.new_zeros(b, h, length, n_extra)], -1)
        self.v_width = w  # v's appended columns are zeros

    @property
    def q_minus(self) -> torch.Tensor:
        """q with the ring column negated, for regions across the seam (built on first use)."""
        if self._q_minus is None:
            self._q_minus = self.q_plus.clone()
            self._q_minus[..., self._ring_col] = -1.0 / self.scale
        return self._q_minus

    def tokens(self, start: int, stop: int) -> slice:
        return slice(start * self.depth, stop * self.depth)

    def inputs(self, piece: Piece, signed: bool = True):
        """(q, k, v) of a piece in its local (possibly reversed) frame.

        `signed=False` takes q_plus whatever the region: the caller copies the rows and
        calls `sign_ring` on its copy (no full q_minus clone).
        """
        q = self.q_plus if piece.sign > 0 or not signed else self.q_minus
        qs, ks = self.tokens(piece.q0, piece.q1), self.tokens(piece.k0, piece.k1)
        parts = (q[:, :, qs], self.k[:, :, ks], self.v[:, :, ks])
        return tuple(t.flip(-2) for t in parts) if piece.flip else parts

    def sign_ring(self, q_rows: torch.Tensor, piece: Piece) -> None:
        """Give a copy of q_plus rows the piece's ring sign, in place."""
        if self.lam and piece.sign < 0:
            q_rows[..., self._ring_col] = -1.0 / self.scale

    def row_constant(self, piece: Piece) -> torch.Tensor:
        """c(i) + r(k) of the piece's query platter-tokens (original order)."""
        qs = self.tokens(piece.q0, piece.q1)
        ring = self.lam * piece.alpha + piece.beta * self.lam_over_p * self.positions[qs]
        return ring + self.platter_const[qs]


def _local(t: torch.Tensor, piece: Piece, aug: _Augmented) -> torch.Tensor:
    """Rows of a (B, H, L, ...) tensor for the piece's queries, in its local frame."""
    rows = t[:, :, aug.tokens(piece.q0, piece.q1)]
    return rows.flip(2) if piece.flip else rows


def _upper_pairs(depth: int) -> list[tuple[int, int]]:
    """Platter pairs (k, l) with l > k: what token-causal misses at the query's own position."""
    return [(k, l) for k in range(depth) for l in range(k + 1, depth)]


# The same-position terms combine a few (D x D) weights per position with (D x w) rows. As a
# batched matmul that costs ~8 ms per N = 2048 forward (tiny matrices); one multiply-add per
# pair l > k, into the kernel's own output, costs a fifth of that. (The scores are fine as a
# batched matmul.)


def _add_pair_rows(out5, p, x5):
    """out5[..., k, :] += sum over l > k of p[..., k, l] * x5[..., l, :], in place (p: (..., D, D))."""
    for k, l in _upper_pairs(p.shape[-1]):
        out5[..., k, :].addcmul_(p[..., k, l, None], x5[..., l, :])


def _add_pair_cols(out5, p, x5):
    """out5[..., l, :] += sum over k < l of p[..., k, l] * x5[..., k, :], in place (the transpose)."""
    for k, l in _upper_pairs(p.shape[-1]):
        out5[..., l, :].addcmul_(p[..., k, l, None], x5[..., k, :])


def _same_position_scores(q, k, depth, scale):
    """Scores (B, H, n, D, D) of platters l > k at the same position: what token-causal misses."""
    b, h, length, dim = q.shape
    n = length // depth
    s = torch.einsum("bhnkd,bhnld->bhnkl", q.reshape(b, h, n, depth, dim), k.reshape(b, h, n, depth, dim))
    below = torch.ones(depth, depth, dtype=torch.bool, device=q.device).tril()
    return s.to(compute_dtype(s.dtype)).mul_(scale).masked_fill_(below, float("-inf"))  # s is fresh


def _attend(q, k, v, causal: bool, depth: int, scale: float, v_width: int | None = None):
    """(output, log-sum-exp) of full or block-causal attention on aligned platter-tokens.

    `v_width`: how many leading columns of v can be nonzero (None: all).
    """
    out, lse = _flash_fwd(q, k, v, 0.0, causal, scale=scale)
    if causal and depth > 1:
        b, h, length, dim = q.shape
        n = length // depth
        s = _same_position_scores(q, k, depth, scale)
        # Merge the kernel's rows with the missed pairs: one exp pass over the pair scores.
        kernel_lse = lse.view(b, h, n, depth)
        top = torch.maximum(s.amax(dim=-1), kernel_lse)
        p = s.sub_(top[..., None]).exp_()
        kept = torch.exp(kernel_lse - top)
        total = p.sum(dim=-1).add_(kept)
        p.div_(total[..., None])
        # The kernel's output is ours to update in place; v's feature columns are zeros.
        out = out.mul_(kept.div_(total).view(b, h, length, 1).to(out.dtype))
        real = v_width or dim
        out5, v5 = out.view(b, h, n, depth, dim)[..., :real], v.reshape(b, h, n, depth, dim)[..., :real]
        _add_pair_rows(out5, p.to(v.dtype), v5)
        lse = top.add_(total.log_()).view(b, h, length)
    return out, lse


def _pieces_forward(aug: _Augmented, pieces) -> list:
    """(output, log-sum-exp) of every piece in its local frame, before row constants.

    Block-causal squares are padded at the end to one size and run as one batched call:
    fewer, larger kernel calls. Trailing padding is invisible to real rows under causality.
    """
    results = {}
    squares = [i for i, piece in enumerate(pieces) if piece.causal]
    if len(squares) > 1:
        tokens = max(pieces[i].q1 - pieces[i].q0 for i in squares) * aug.depth
        batch = aug.k.shape[0]
        stacked = [
            t.new_empty(len(squares) * batch, t.shape[1], tokens, t.shape[-1])
            for t in (aug.q_plus, aug.k, aug.v)
        ]
        for slot, i in enumerate(squares):
            for buffer, part in zip(stacked, aug.inputs(pieces[i], signed=False), strict=True):
                rows = buffer[slot * batch : (slot + 1) * batch]
                rows[:, :, : part.shape[-2]] = part
                rows[:, :, part.shape[-2] :] = 0  # only the padding is zeroed (never NaN garbage)
            aug.sign_ring(stacked[0][slot * batch : (slot + 1) * batch], pieces[i])
        out, lse = _attend(*stacked, True, aug.depth, aug.scale, aug.v_width)
        for slot, i in enumerate(squares):
            rows = (pieces[i].q1 - pieces[i].q0) * aug.depth
            chunk = slice(slot * batch, (slot + 1) * batch)
            results[i] = (out[chunk, :, :rows], lse[chunk, :, :rows])
    for i, piece in enumerate(pieces):
        if i not in results:
            results[i] = _attend(*aug.inputs(piece), piece.causal, aug.depth, aug.scale, aug.v_width)
    return [results[i] for i in range(len(pieces))]


def _piece_backward(aug: _Augmented, piece: Piece, grad, out, lse):
    """Gradients (q, k, v) of one piece given the merged output and log-sum-exp (local frame)."""
    q, k, v = aug.inputs(piece)
    gq, gk, gv = _flash_bwd(grad, q, k, v, out, lse, 0.0, piece.causal, scale=aug.scale)
    if piece.causal and aug.depth > 1:
        b, h, length, dim = q.shape
        n, d = length // aug.depth, aug.depth
        shape5 = (b, h, n, d, dim)
        p = torch.exp(_same_position_scores(q, k, d, aug.scale) - lse.reshape(b, h, n, d, 1))
        dtype = p.dtype
        g5, v5 = grad.reshape(shape5).to(dtype), v.reshape(shape5).to(dtype)
        row_dot = (g5 * out.reshape(shape5).to(dtype)).sum(-1, keepdim=True)
        ds = p * (torch.einsum("bhnkd,bhnld->bhnkl", g5, v5) - row_dot) * aug.scale
        # The kernel's gradients are ours to update in place.
        _add_pair_rows(gq.view(shape5), ds, k.reshape(shape5).to(dtype))
        _add_pair_cols(gk.view(shape5), ds, q.reshape(shape5).to(dtype))
        _add_pair_cols(gv.view(shape5), p, g5)
    return gq, gk, gv


def _merged_by_rows(aug: _Augmented, pieces) -> dict[tuple[int, int], tuple]:
    """(output, log-sum-exp) per query range, pieces of the same range merged in one pass.

    Outputs are in the original order with the row constants added to the log-sum-exp.
    """
    groups: dict[tuple[int, int], list] = {}
    for piece, (p_out, p_lse) in zip(pieces, _pieces_forward(aug, pieces), strict=True):
        if piece.flip:
            p_out, p_lse = p_out.flip(2), p_lse.flip(2)
        groups.setdefault((piece.q0, piece.q1), []).append((p_out, p_lse + aug.row_constant(piece)))
    merged = {}
    for rows, parts in groups.items():
        if len(parts) == 1:
            merged[rows] = parts[0]
            continue
        lses = torch.stack([p_lse for _, p_lse in parts])
        total = torch.logsumexp(lses, dim=0)
        weights = torch.exp(lses - total).to(parts[0][0].dtype)
        out = parts[0][0] * weights[0, ..., None]
        for (p_out, _), weight in zip(parts[1:], weights[1:], strict=True):
            out.addcmul_(p_out, weight[..., None])
        merged[rows] = (out, total)
    return merged


def valid_rows(depth, causal, key_padding, length):
    """(B, 1, L, 1) bool: rows with at least one allowed real key (None when all rows have one)."""
    if key_padding is None:
        return None
    real = key_padding[:, ::depth]
    has = real.cumsum(dim=1) > 0 if causal else real.any(dim=1, keepdim=True).expand_as(real)
    return has.repeat_interleave(depth, dim=1)[:, None, :, None]


@torch.library.custom_op("toroidal::decomposed_forward", mutates_args=(), device_types="cpu")
def decomposed_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, depth: int, period: int,
    lambda_distance: float, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(output, natural log-sum-exp in the compute dtype) of toroidal attention on platter-tokens
    q, k, v (B, H, L, w) with P >= N, no window and no query offset; `keep`: (B, L) key padding."""
    aug = _Augmented(q, k, v, depth, period, lambda_distance, keep, scale)
    pieces = plan(q.shape[-2] // depth, period, causal)
    b, h, length, dim = aug.q_plus.shape
    out = q.new_zeros(b, h, length, dim)
    lse = torch.full((b, h, length), float("-inf"), device=q.device, dtype=compute_dtype(q.dtype))
    first_visit = [True] * (length // depth)  # per position; the plan is static, so is this
    for (q0, q1), (p_out, p_lse) in _merged_by_rows(aug, pieces).items():
        rows = aug.tokens(q0, q1)
        if all(first_visit[q0:q1]):  # nothing to merge with yet
            out[:, :, rows], lse[:, :, rows] = p_out, p_lse
        else:
            merged = torch.logaddexp(lse[:, :, rows], p_lse)
            out[:, :, rows] *= torch.exp(lse[:, :, rows] - merged)[..., None].to(out.dtype)
            out[:, :, rows] += p_out * torch.exp(p_lse - merged)[..., None].to(out.dtype)
            lse[:, :, rows] = merged
        first_visit[q0:q1] = [False] * (q1 - q0)
    valid = valid_rows(depth, causal, keep, length)
    if valid is not None:
        out = out * valid
    return out[..., : q.shape[-1]].clone(), lse


@decomposed_forward.register_fake
def _decomposed_forward_fake(q, k, v, keep, depth, period, lambda_distance, causal, scale):
    # Contiguous, as the real kernel's outputs are whatever the strides of q.
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=compute_dtype(q.dtype))


@torch.library.custom_op("toroidal::decomposed_backward", mutates_args=(), device_types="cpu")
def decomposed_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor, grad: torch.Tensor, depth: int, period: int, lambda_distance: float, causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (q, k, v) of `decomposed_forward` from its output and log-sum-exp."""
    valid = valid_rows(depth, causal, keep, q.shape[-2])
    grads = backward(q, k, v, out, lse, depth, period, lambda_distance, causal, keep, scale, valid, grad)
    return tuple(g.contiguous() for g in grads)


@decomposed_backward.register_fake
def _decomposed_backward_fake(q, k, v, keep, out, lse, grad, *geometry):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


register_lse_autograd(decomposed_forward, torch.ops.toroidal.decomposed_backward.default)


def backward(q, k, v, out, lse, depth, period, lam, causal, key_padding, scale, valid, grad):
    """Gradients (q, k, v) of toroidal attention from its output and natural log-sum-exp.

    Each piece reruns the fused kernel's backward with the merged output and log-sum-exp
    (ring attention's rule), so any forward that returns those two could use it.
    `out` may be the real width or the augmented one (its extra columns are zeros).
    """
    aug = _Augmented(q, k, v, depth, period, lam, key_padding, scale)
    pieces = plan(q.shape[-2] // depth, period, causal)
    w, dim = q.shape[-1], aug.v.shape[-1]
    grad = torch.nn.functional.pad(grad, (0, dim - w))
    out = torch.nn.functional.pad(out, (0, dim - out.shape[-1]))
    if valid is not None:
        grad = grad * valid
    gq, gk, gv = torch.zeros_like(aug.q_plus), torch.zeros_like(aug.k), torch.zeros_like(aug.v)
    for piece in pieces:
        p_lse = lse[:, :, aug.tokens(piece.q0, piece.q1)] - aug.row_constant(piece)
        local = (
            _local(grad, piece, aug),
            _local(out, piece, aug),
            p_lse.flip(2) if piece.flip else p_lse,
        )
        pq, pk, pv = _piece_backward(aug, piece, *local)
        if piece.flip:
            pq, pk, pv = pq.flip(2), pk.flip(2), pv.flip(2)
        gq[:, :, aug.tokens(piece.q0, piece.q1)] += pq
        gk[:, :, aug.tokens(piece.k0, piece.k1)] += pk
        gv[:, :, aug.tokens(piece.k0, piece.k1)] += pv
    return gq[..., :w], gk[..., :w], gv[..., :w]


class DecomposedBackend(Backend):
    name = "decomposed"
    description = "exact low-rank split of the torus bias run through the fused CPU flash kernel"

    def unavailable_reason(self, request):
        g = request.geometry
        if request.device_type != "cpu":
            return "decomposed runs on CPU only (it calls the fused CPU flash kernel)"
        if request.dtype not in (torch.float32, torch.float64):
            return "decomposed needs float32 or float64"
        if request.need_weights:
            return "decomposed does not materialize weights; use backend='reference'"
        if g.window is not None and 2 * g.window < g.period:
            return "decomposed does not support a circular window smaller than the half ring"
        if g.sliding_window is not None:
            return "decomposed does not take a host sliding window; use sdpa or blockwise"
        if g.q_offset or request.n_queries != request.n_keys:
            return "decomposed needs a full forward pass (no KV-cache query offset)"
        if g.period < request.n_keys:
            return f"decomposed needs period >= sequence length (P={g.period} < N={request.n_keys})"
        return None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        g = geometry
        out, _ = torch.ops.toroidal.decomposed_forward.default(
            q, k, v, key_padding, g.depth, g.period, float(g.lambda_distance), g.causal, float(scale)
        )
        return out, None


BACKEND = DecomposedBackend()
register(BACKEND)

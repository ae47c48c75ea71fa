"""`blockwise`: tiled attention with an online softmax, O(L * tile) memory in forward and backward.

It computes in float32, or in float64 for float64 inputs (`compute_dtype`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from toroidal.geometry import TorusGeometry
from toroidal.kernels.base import Backend, compute_dtype, register

# Platter-tokens per tile. On a 2-core CPU (L=8192, w=16, B=1, H=8, causal, lambda=0.1)
# 256 beat 128, 384 and 512 in forward and forward+backward.
DEFAULT_TILE = 256


def _tile_plan(geometry: TorusGeometry, lq: int, lk: int, tile: int, key_padding, device):
    """For every query tile, the key tiles to visit as (key tile index, needs_geometric_mask).

    Causal and window rules depend on positions only, so a tile's verdict comes from the
    position-level block it covers: no allowed pair -> skip, all pairs allowed -> no mask.
    """
    k_tiles = [(k0, min(k0 + tile, lk)) for k0 in range(0, lk, tile)]
    n_q_tiles = -(-lq // tile)
    has_keys = [True] * len(k_tiles)
    if key_padding is not None:
        # A key tile padded in every batch row contributes nothing.
        real = F.pad(key_padding.any(0).cumsum(0), (1, 0)).tolist()
        has_keys = [real[k1] > real[k0] for k0, k1 in k_tiles]
    if not geometry.has_mask:
        return [[(j, False) for j, ok in enumerate(has_keys) if ok]] * n_q_tiles

    depth = geometry.depth
    n_key_pos = -(-lk // depth)
    # Positions covered by each key tile, as [lo, hi] inclusive.
    k_lo = torch.tensor([k0 // depth for k0, _ in k_tiles], device=device, dtype=torch.long)
    k_hi = torch.tensor([(k1 - 1) // depth for _, k1 in k_tiles], device=device, dtype=torch.long)
    key_idx = torch.arange(n_key_pos, device=device) * depth  # platter 0 of every key position
    counts, sizes = [], []
    for q0 in range(0, lq, tile):
        q1 = min(q0 + tile, lq)
        q_idx = torch.arange(q0 // depth, (q1 - 1) // depth + 1, device=device) * depth
        allowed = geometry.allowed(q_idx[:, None], key_idx[None, :]).expand(len(q_idx), n_key_pos)
        # Allowed pairs per key tile via a prefix sum over key positions.
        prefix = F.pad(allowed.sum(0).cumsum(0), (1, 0))
        counts.append(prefix[k_hi + 1] - prefix[k_lo])
        sizes.append(len(q_idx) * (k_hi - k_lo + 1))
    if not counts:
        return []
    counts, sizes = torch.stack(counts).tolist(), torch.stack(sizes).tolist()  # one device sync
    return [
        [
            (j, n < full)
            for j, (ok, n, full) in enumerate(zip(has_keys, row_n, row_full, strict=True))
            if ok and n
        ]
        for row_n, row_full in zip(counts, sizes, strict=True)
    ]


class Tiles:
    """Tiling of one call, shared by forward and backward: the plan and each tile's scores.

    `dtype` is the compute dtype of the scores (float32, or float64 for float64 inputs).
    """

    def __init__(self, geometry, key_padding, tile, lq, lk, batch, device, dtype=torch.float32):
        self.geometry, self.tile, self.batch, self.device = geometry, tile, batch, device
        self.lq, self.lk, self.dtype = lq, lk, dtype
        self.plan = _tile_plan(geometry, lq, lk, tile, key_padding, device)
        self.pad_add = None
        if key_padding is not None:
            self.pad_add = torch.zeros(key_padding.shape, device=device, dtype=dtype).masked_fill(
                ~key_padding, float("-inf")
            )
        # int32 indices make the per-tile bias arithmetic about twice as fast and stay exact;
        # float64 indices (exact to 2**53) make a float64 bias computed in float64.
        small = lq + lk + geometry.q_offset + geometry.period < 2**31
        self.index_dtype = torch.int32 if small else torch.int64
        if dtype == torch.float64:
            self.index_dtype = torch.float64

    def split(self, x):
        """(BH, L, c) -> contiguous (BH, tile, c) pieces (batched matmuls want dense operands)."""
        return [t.contiguous() for t in x.split(self.tile, dim=1)]

    def rows(self):
        """(query tile index, q0, q1, visited key tiles) for every query tile."""
        for i, row in enumerate(self.plan):
            yield i, i * self.tile, min(i * self.tile + self.tile, self.lq), row

    def _additive(self, q0, q1, k0, k1, masked):
        """Bias plus -inf on forbidden pairs: (tq, tk) in the compute dtype, or None when all zero."""
        use_bias = self.geometry.lambda_distance != 0
        if not (use_bias or masked):
            return None
        q_idx = torch.arange(q0, q1, device=self.device, dtype=self.index_dtype)[:, None]
        k_idx = torch.arange(k0, k1, device=self.device, dtype=self.index_dtype)[None, :]
        if use_bias:
            additive = self.geometry.bias(q_idx, k_idx).to(self.dtype)
        else:
            additive = torch.zeros(q1 - q0, k1 - k0, device=self.device, dtype=self.dtype)
        if masked:
            additive = additive.masked_fill(~self.geometry.allowed(q_idx, k_idx), float("-inf"))
        return additive

    def scores(self, q_t, k_t, q0, q1, j, masked):
        """(BH, tq, tk) scores of a query tile (already scaled) against key tile j, compute dtype."""
        k0 = j * self.tile
        k1 = k0 + k_t.shape[1]
        additive = self._additive(q0, q1, k0, k1, masked)
        k_t = k_t.transpose(-1, -2)
        s = torch.bmm(q_t, k_t) if additive is None else torch.baddbmm(additive, q_t, k_t)
        if self.pad_add is not None:
            s.view(self.batch, -1, *s.shape[1:]).add_(self.pad_add[:, None, None, k0:k1])
        return s


def tiled_forward(tiles: Tiles, q, k, v, scale: float):
    """Online-softmax forward over `tiles` on (B*H, L, w) tensors of the compute dtype (one batched
    matmul per tile).

    Returns the output (B*H, Lq, w) and the row log-sum-exp (B*H, Lq, 1), +inf on rows that see
    nothing, so that probabilities recomputed from it are exactly 0. `toroidal.ring` merges these.
    """
    bh, lq, w = q.shape
    q_tiles, k_tiles = tiles.split(q), tiles.split(k)
    # A column of ones after v makes p @ v also return the row sums of p.
    v_tiles = tiles.split(F.pad(v, (0, 1), value=1.0))
    out = q.new_zeros(bh, lq, w)
    lse = torch.full((bh, lq, 1), float("inf"), device=q.device, dtype=q.dtype)
    lowest = torch.finfo(q.dtype).min
    for i, q0, q1, row in tiles.rows():
        if not row:
            continue
        q_t = q_tiles[i] * scale
        row_max = torch.full((bh, q1 - q0, 1), float("-inf"), device=q.device, dtype=q.dtype)
        acc = q_t.new_zeros(bh, q1 - q0, w + 1)
        for j, masked in row:
            s = tiles.scores(q_t, k_tiles[j], q0, q1, j, masked)
            new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
            # While a row has seen only masked keys its max is -inf; shifting by a finite
            # number instead keeps exp() at exactly 0 without computing inf - inf.
            shift = new_max.clamp(min=lowest)
            p = s.sub_(shift).exp_()
            acc.mul_(torch.exp(row_max - shift)).baddbmm_(p, v_tiles[j])
            row_max = new_max
        row_sum = acc[..., w:]
        seen = row_sum > 0
        out[:, q0:q1] = acc[..., :w] / torch.where(seen, row_sum, 1.0)
        lse[:, q0:q1] = torch.where(seen, row_max + row_sum.log(), float("inf"))
    return out, lse


def tiled_backward(tiles: Tiles, q, k, v, grad_out, lse, delta, scale: float, need_dk=True, need_dv=True):
    """(dq, dk, dv) over `tiles`, (B*H, L, w) in the compute dtype, recomputing each tile's probabilities.

    `lse` and `delta` = rowsum(dO * O) belong to the whole softmax, which may span more keys
    than these tiles (`toroidal.ring` sums the pieces).
    """
    q_tiles, k_tiles, v_tiles, do_tiles = (tiles.split(t) for t in (q, k, v, grad_out))
    lse_tiles, delta_tiles = tiles.split(lse), tiles.split(delta)
    dq = torch.zeros_like(q)
    dk_tiles = [torch.zeros_like(t) for t in k_tiles]
    dv_tiles = [torch.zeros_like(t) for t in v_tiles]
    for i, q0, q1, row in tiles.rows():
        q_t, do_t = q_tiles[i] * scale, do_tiles[i]
        dq_t = torch.zeros_like(q_t)
        for j, masked in row:
            p = tiles.scores(q_t, k_tiles[j], q0, q1, j, masked).sub_(lse_tiles[i]).exp_()
            if need_dv:
                dv_tiles[j].baddbmm_(p.transpose(-1, -2), do_t)
            ds = torch.bmm(do_t, v_tiles[j].transpose(-1, -2)).sub_(delta_tiles[i]).mul_(p)  # P*(dP-D)
            dq_t.baddbmm_(ds, k_tiles[j], alpha=scale)
            if need_dk:
                dk_tiles[j].baddbmm_(ds.transpose(-1, -2), q_t)  # q_t already carries the scale
        dq[:, q0:q1] = dq_t
    return dq, torch.cat(dk_tiles, dim=1), torch.cat(dv_tiles, dim=1)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, geometry, key_padding, scale, tile):
        b, h, lq, w = q.shape
        dtype = compute_dtype(q.dtype)
        tiles = Tiles(geometry, key_padding, tile, lq, k.shape[-2], b, q.device, dtype)
        # Float32 (float64) math on (B*H, L, w): one batched matmul per tile covers every head.
        qf, kf, vf = (t.reshape(b * h, -1, w).to(dtype) for t in (q, k, v))
        out, lse = tiled_forward(tiles, qf, kf, vf, scale)
        out = out.view(b, h, lq, w).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.scale = tiles, scale  # the plan is reused by the backward pass
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, lq, w = q.shape
        _, need_dk, need_dv = ctx.needs_input_grad[:3]
        dtype = ctx.tiles.dtype
        qf, kf, vf, of, dof = (t.reshape(b * h, -1, w).to(dtype) for t in (q, k, v, out, grad_out))
        delta = (dof * of).sum(-1, keepdim=True)  # D_i = rowsum(dO * O)
        dq, dk, dv = tiled_backward(ctx.tiles, qf, kf, vf, dof, lse, delta, ctx.scale, need_dk, need_dv)
        grads = (g.view(b, h, -1, w).to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))
        return (*grads, None, None, None, None)


class BlockwiseBackend(Backend):
    name = "blockwise"
    description = "tiled online-softmax attention in float32 (float64 for float64); O(L * tile) memory"

    def __init__(self, tile: int = DEFAULT_TILE) -> None:
        self.tile = tile

    def with_tile(self, tile: int) -> BlockwiseBackend:
        """This backend with another tile size (what a tuning table measured fastest)."""
        return BlockwiseBackend(tile)

    def unavailable_reason(self, request):
        if request.need_weights:
            return "blockwise does not materialize weights; use backend='reference'"
        return None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        if self.tile < 1:
            raise ValueError(f"blockwise tile must be >= 1 platter-token, got {self.tile}")
        return _BlockwiseAttention.apply(q, k, v, geometry, key_padding, scale, self.tile), None


register(BlockwiseBackend())

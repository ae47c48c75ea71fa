"""`tiled`: adaptive tiled attention on the torus, exact where it matters and pooled elsewhere.

Queries and keys (as platter-tokens, see `toroidal.functional.to_platters`) are cut into
tiles of `tile_size` platter-tokens, a whole number of positions with all their platters.
For every query tile each key tile is one of:

- *masked*: causal/window rules (or padding) leave no pair of the two tiles allowed;
- *forced exact*: the rules allow some but not all pairs (the causal diagonal, window
  edges), or the key tile lies within `local_tiles` tiles of the query tile on the ring;
- a *candidate*: every pair allowed. Candidates are ranked per (batch, head, query tile)
  by an upper bound on the log of the attention mass any query of the tile can put on the
  key tile (below); the top `budget` are attended exactly. Every other candidate enters the
  same softmax as one pooled key (`summaries=True`) or is skipped (`summaries=False`).

The ranking bound, from tile-pooled queries and keys. With q̄, k̄ the means of a query
tile and of a key tile's real keys and r_q, r_k the largest distances to them, every pair
has q·k <= q̄·k̄ + r_q |k̄| + |q̄| r_k + r_q r_k (write q = q̄ + a, k = k̄ + b and bound
each term by Cauchy-Schwarz). So every query of the tile has
log Σ_k exp(s(q, k)) <= scale x that + largest bias + log(count): the largest bias is
-lambda times the least ring distance between the two tiles over P (every tile holds every
platter, so the platter term can be 0). Costs O(tiles² · w) against O(L² · w) for exact.

The pooled key. Mean key k̄ and mean value v̄ of the tile's real keys, with score
scale q·k̄ + bias(q, tile centre) + log(count): by Jensen's inequality this is a lower
bound on the tile's log-mass (count times the mean of exp(s) >= count times exp of the
mean score), and the mean over the tile's platters of the platter term is exact. The
bias at the centre equals the tile's mean bias wherever the ring distance is linear
across the tile.

With `budget` covering every candidate, no summary is computed and the result is exact
attention (within float32 rounding). Exact tiles are gathered with index tensors and
attended in chunks of query tiles; the torus bias of a (query tile, key tile) block
depends only on the difference of their indices, so it comes from a small table of
blocks built once per shape and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toroidal.config import TORUS_OPTIONS
from toroidal.functional import from_platters, plan_call
from toroidal.fusion import DepthFusion
from toroidal.geometry import TorusGeometry, ring_distance
from toroidal.mechanisms.base import KernelModule, Mechanism, check_options, torus_config

# The torus without a backend (tiles are attended here), then its own options.
TILED_OPTIONS = (*(name for name in TORUS_OPTIONS if name != "backend"), "tile_size", "budget", "summaries",
                 "local_tiles")  # fmt: skip
DEFAULT_TILE = 128  # platter-tokens; rounded down to a multiple of the depth
DEFAULT_BUDGET = 8
_CHUNK_ELEMENTS = 1 << 22  # float32 scores per chunk of query tiles (16 MiB): bounds peak memory


@dataclass(frozen=True)
class TilingSettings:
    """How `tiled_attention` cuts and chooses. `budget=None`: every candidate tile is exact."""

    tile: int  # platter-tokens per tile, a multiple of the depth
    budget: int | None = DEFAULT_BUDGET
    summaries: bool = True
    local_tiles: int = 1


def _ring_min(lo, hi, period: int):
    """Least ring distance over the integer differences lo..hi (tensors, lo <= hi elementwise)."""
    hits_zero = hi - torch.remainder(hi, period) >= lo  # a multiple of P lies in [lo, hi]
    ends = torch.minimum(ring_distance(lo, 0, period), ring_distance(hi, 0, period))
    return torch.where(hits_zero, torch.zeros_like(ends), ends)


def _ring_max(lo, hi, period: int):
    """Largest ring distance over the differences lo..hi: P // 2 if reached, else at an end."""
    half = period // 2
    hits_half = lo + torch.remainder(half - lo, period) <= hi
    ends = torch.maximum(ring_distance(lo, 0, period), ring_distance(hi, 0, period))
    return torch.where(hits_half, torch.full_like(ends, half), ends)


@dataclass
class _Plan:
    """Everything about one call that depends on the geometry and shape, not on the values."""

    nq: int
    nk: int
    visible: torch.Tensor  # (nq, nk) bool: some pair of the two tiles is allowed
    candidate: torch.Tensor  # (nq, nk) bool: every pair allowed and not local
    exact_idx: torch.Tensor  # (nq, S0) key tiles always exact (forced; all candidates when no ranking)
    exact_ok: torch.Tensor  # (nq, S0) bool: the slot holds a tile
    ranking: bool  # whether candidates compete for `budget` slots
    bias_bound: torch.Tensor  # (nq, nk) float32: largest torus bias over the tile pair
    table: torch.Tensor  # (U + 1, T, T) float32: bias and -inf masks per tile-index difference
    diff_min: int  # table[d - diff_min] is the block of query tile i, key tile j with i - j = d
    q_len: torch.Tensor  # (nq,) real platter-tokens per query tile
    k_len: torch.Tensor  # (nk,) real platter-tokens per key tile
    k_centre: torch.Tensor  # (nk,) float32 centre position of each key tile
    platter_mean: torch.Tensor  # (D,) float32 mean over l of |k - l| / D


def _make_plan(geometry: TorusGeometry, lq: int, lk: int, settings: TilingSettings, device) -> _Plan:
    tile, depth, period = settings.tile, geometry.depth, geometry.period
    span = tile // depth  # positions per tile
    nq, nk = -(-lq // tile), -(-lk // tile)
    n_qpos, n_kpos = lq // depth, lk // depth
    qi, kj = torch.arange(nq, device=device), torch.arange(nk, device=device)
    q_lo = geometry.q_offset + qi * span
    q_hi = geometry.q_offset + torch.clamp((qi + 1) * span, max=n_qpos) - 1
    k_lo, k_hi = kj * span, torch.clamp((kj + 1) * span, max=n_kpos) - 1
    # Position differences i - j over a tile pair cover the whole integer range [d_lo, d_hi].
    d_lo, d_hi = q_lo[:, None] - k_hi[None, :], q_hi[:, None] - k_lo[None, :]
    visible = torch.ones(nq, nk, dtype=torch.bool, device=device)
    full = torch.ones_like(visible)
    lo = d_lo
    if geometry.causal:
        visible &= d_hi >= 0
        full &= d_lo >= 0
        lo = torch.clamp(d_lo, min=0)
    if geometry.window is not None:
        # Pairs the causal rule already removed (lo > d_hi) keep a valid range here and stay hidden.
        visible &= _ring_min(torch.minimum(lo, d_hi), d_hi, period) <= geometry.window
        full &= _ring_max(d_lo, d_hi, period) <= geometry.window
    if geometry.sliding_window is not None:  # |i - j| < W: least and largest |i - j| of the pair
        reach = geometry.sliding_window - 1
        nearest = torch.where((lo <= 0) & (d_hi >= 0), 0, torch.minimum(lo.abs(), d_hi.abs()))
        visible &= nearest <= reach
        full &= torch.maximum(d_lo.abs(), d_hi.abs()) <= reach
    full &= visible
    closest = _ring_min(d_lo, d_hi, period)
    local = closest < settings.local_tiles * span
    forced = visible & (~full | local)
    candidate = full & ~local
    most_candidates = int(candidate.sum(1).max()) if nq else 0
    ranking = settings.budget is not None and settings.budget < most_candidates
    always = forced if ranking else forced | candidate
    width = int(always.sum(1).max()) if nq else 0
    order = torch.sort(always.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    exact_ok = torch.gather(always, 1, order)
    bias_bound = -geometry.lambda_distance * closest.to(torch.float32) / period

    diffs = (qi[:, None] - kj[None, :])[visible]
    diff_min = int(diffs.min()) if diffs.numel() else 0
    diff_max = int(diffs.max()) if diffs.numel() else -1
    d = torch.arange(diff_min, diff_max + 1, device=device)
    offsets = torch.arange(tile, device=device)
    # Block of query tile i against key tile j = block of query tile (i - j) against key tile 0.
    q_idx = (d[:, None] * tile + offsets)[:, :, None]
    k_idx = offsets[None, None, :]
    table = geometry.bias(q_idx, k_idx).to(torch.float32)
    if geometry.has_mask:
        table = table.masked_fill(~geometry.allowed(q_idx, k_idx), float("-inf"))
    blocked = torch.full((1, tile, tile), float("-inf"), device=device)  # the block of empty slots
    table = torch.cat([table.expand(len(d), tile, tile), blocked])

    platters = torch.arange(depth, device=device, dtype=torch.float32)
    return _Plan(
        nq=nq,
        nk=nk,
        visible=visible,
        candidate=candidate,
        exact_idx=order,
        exact_ok=exact_ok,
        ranking=ranking,
        bias_bound=bias_bound,
        table=table,
        diff_min=diff_min,
        q_len=torch.clamp(lq - qi * tile, max=tile),
        k_len=torch.clamp(lk - kj * tile, max=tile),
        k_centre=(k_lo + k_hi).to(torch.float32) / 2,
        platter_mean=(platters[:, None] - platters[None, :]).abs().mean(1) / depth,
    )


def _tiles(x: torch.Tensor, n_tiles: int, tile: int) -> torch.Tensor:
    """(BH, L, c) float32 -> (BH, n_tiles, tile, c), zero-padded at the end."""
    bh, length, c = x.shape
    if length < n_tiles * tile:
        x = F.pad(x, (0, 0, 0, n_tiles * tile - length))
    return x.view(bh, n_tiles, tile, c)


@dataclass
class TileCounts:
    """What one call did, summed over batch, heads and query tiles (tile pairs and matmul FLOPs)."""

    visible: int = 0  # tile pairs the rules leave some pair of, whose key tile holds a real key
    exact: int = 0
    pooled: int = 0
    skipped: int = 0
    flops: float = 0.0  # matmul FLOPs computed
    flops_exact: float = 0.0  # matmul FLOPs of exact tiled attention over the visible tile pairs

    def add(self, other: TileCounts) -> None:
        for name in ("visible", "exact", "pooled", "skipped", "flops", "flops_exact"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def tiled_attention(q, k, v, geometry: TorusGeometry, padding, scale: float, settings: TilingSettings,
                    plan: _Plan | None = None) -> tuple[torch.Tensor, TileCounts]:  # fmt: skip
    """Adaptive tiled attention on platter-token tensors q (B, H, Lq, w), k, v (B, H, Lk, w).

    `padding` is (B, Lk), True for real keys. Returns the output (B, H, Lq, w) in q's dtype
    and the call's `TileCounts`. `plan` (from a previous call with the same geometry and
    shapes) skips rebuilding the tile classification and the bias table.
    """
    b, h, lq, w = q.shape
    lk, tile, bh, device = k.shape[2], settings.tile, b * h, q.device
    if plan is None:
        plan = _make_plan(geometry, lq, lk, settings, device)
    nq, nk = plan.nq, plan.nk
    qt = _tiles(q.reshape(bh, lq, w).float() * scale, nq, tile)
    kt = _tiles(k.reshape(bh, lk, w).float(), nk, tile)
    vt = _tiles(v.reshape(bh, lk, w).float(), nk, tile)

    real = None  # (BH, nk, T) real keys; None: all of them
    if padding is not None or lk % tile:
        real = torch.zeros(b, nk * tile, dtype=torch.bool, device=device)
        real[:, :lk] = True if padding is None else padding
        real = real.view(b, nk, tile).repeat_interleave(h, 0)
        count = real.sum(-1)
    else:
        count = torch.full((bh, nk), tile, device=device)
    has_keys = count > 0
    pad_add = None
    if real is not None:
        pad_add = torch.zeros(real.shape, device=device).masked_fill(~real, float("-inf"))

    visible = plan.visible[None] & has_keys[:, None, :]  # (BH, nq, nk)
    area = plan.q_len[:, None].float() * plan.k_len[None, :].float()
    counts = TileCounts(visible=int(visible.sum()))
    counts.flops_exact = 4.0 * w * float((visible * area).sum())

    chosen = chosen_ok = pooled = v_bar = None
    if plan.ranking:
        k_bar = _tile_mean(kt, real)
        log_count = count.float().log()  # -inf on empty tiles
        candidate = plan.candidate[None] & has_keys[:, None, :]
        with torch.no_grad():  # the ranking only picks indices
            q_real = (torch.arange(nq * tile, device=device) < lq).view(1, nq, tile) if lq % tile else None
            q_bar = _tile_mean(qt, q_real)
            bound = _logit_bound(q_bar, _radius(qt, q_bar, q_real), k_bar, _radius(kt, k_bar, real))
            bound = (bound + plan.bias_bound + log_count[:, None, :]).masked_fill(~candidate, float("-inf"))
            best, chosen = bound.topk(settings.budget, dim=-1)  # (BH, nq, budget)
        chosen_ok = best > float("-inf")
        rest = candidate & ~torch.zeros_like(candidate).scatter_(-1, chosen, chosen_ok)
        counts.flops += 2.0 * w * bh * nq * nk  # q̄ . k̄
        if settings.summaries:
            pooled, v_bar = rest, _tile_mean(vt, real)
            counts.pooled = int(rest.sum())
            counts.flops += 4.0 * w * bh * lq * nk  # q . k̄ and p . v̄ against every key tile
        else:
            counts.skipped = int(rest.sum())

    width = plan.exact_idx.shape[1] + (settings.budget if plan.ranking else 0)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, bh * tile * (width * tile + (nk if pooled is not None else 0))))
    rows = torch.arange(bh, device=device)[:, None, None]
    outs = []
    exact_area = torch.zeros((), device=device)
    for i0 in range(0, nq, chunk):
        i1 = min(i0 + chunk, nq)
        q_c = qt[:, i0:i1]  # (BH, c, T, w), already scaled
        idx, ok = plan.exact_idx[None, i0:i1], plan.exact_ok[None, i0:i1]
        if chosen is not None:
            idx = torch.cat([idx.expand(bh, -1, -1), chosen[:, i0:i1]], dim=-1)
            ok = torch.cat([ok.expand(bh, -1, -1), chosen_ok[:, i0:i1]], dim=-1)
        ok = ok & torch.gather(has_keys[:, None, :].expand(-1, i1 - i0, -1), 2, idx.expand(bh, -1, -1))
        exact_area = exact_area + (ok * area[torch.arange(i0, i1, device=device)[:, None], idx]).sum()
        counts.exact += int(ok.sum())
        pooled_scores = None
        if pooled is not None:
            # scale q . k̄ + bias at the tile centre + log(count), -inf on tiles not pooled: one fused matmul.
            log_mass = torch.where(pooled[:, i0:i1], log_count[:, None, :], float("-inf"))
            extra = _mean_bias(geometry, plan, i0, i1, tile) + log_mass[:, :, None, :]
            k_bar_c = k_bar[:, None].expand(bh, i1 - i0, nk, w).reshape(-1, nk, w)
            pooled_scores = torch.baddbmm(
                extra.view(-1, tile, nk), q_c.reshape(-1, tile, w), k_bar_c.transpose(1, 2)
            ).view(bh, i1 - i0, tile, nk)
        outs.append(_attend_chunk(q_c, kt, vt, idx, ok, rows, plan, i0, i1, pad_add, pooled_scores, v_bar))
    counts.flops += 4.0 * w * float(exact_area)
    out = torch.cat(outs, dim=1).view(bh, nq * tile, w)[:, :lq]
    return out.view(b, h, lq, w).to(q.dtype), counts


def _tile_mean(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """(BH, n, T, w) tiles, (.., n, T) real-row flags (None: all real) -> (BH, n, w) real-row means."""
    if real is None:
        return x.mean(2)
    real = real.to(x.dtype)
    return (x * real[..., None]).sum(2) / real.sum(-1).clamp(min=1)[..., None]


def _radius(x: torch.Tensor, mean: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """(BH, n) largest distance of a real row of each tile to the tile's mean.

    From |x - m|^2 = |x|^2 - 2 x . m + |m|^2, without materializing x - m (rounding may shave
    a relative 1e-6 off the bound, which only ranks).
    """
    squared = (x * x).sum(-1) - 2 * (x @ mean[..., None])[..., 0] + (mean * mean).sum(-1)[..., None]
    if real is not None:
        squared = squared * real
    return squared.amax(-1).clamp(min=0).sqrt()


def _logit_bound(q_bar, q_radius, k_bar, k_radius) -> torch.Tensor:
    """(BH, nq, nk) upper bound on q . k over every q within q_radius of q̄ and k within k_radius of k̄.

    q . k = q̄ . k̄ + a . k̄ + q̄ . b + a . b with |a| <= r_q, |b| <= r_k (Cauchy-Schwarz).
    """
    bound = q_bar @ k_bar.transpose(-1, -2)
    bound += q_radius[..., None] * k_bar.norm(dim=-1)[:, None, :]
    bound += q_bar.norm(dim=-1)[..., None] * k_radius[:, None, :]
    return bound + q_radius[..., None] * k_radius[:, None, :]


def _mean_bias(geometry: TorusGeometry, plan: _Plan, i0: int, i1: int, tile: int) -> torch.Tensor:
    """(c, T, nk) torus bias of each query platter-token against the centre of each key tile."""
    depth = geometry.depth
    p = torch.arange(i0 * tile, i1 * tile, device=plan.k_centre.device).view(i1 - i0, tile)
    position = (geometry.q_offset + p // depth).to(torch.float32)
    ring = ring_distance(position[..., None] - plan.k_centre, 0, geometry.period) / geometry.period
    return -geometry.lambda_distance * (ring + plan.platter_mean[p % depth][..., None])


def _attend_chunk(q_c, kt, vt, idx, ok, rows, plan: _Plan, i0, i1, pad_add, pooled_scores, v_bar):
    """Softmax of a chunk of query tiles over its exact key tiles (gathered) and pooled summaries."""
    bh, c, tile, w = q_c.shape
    slots = idx.shape[-1]
    out = None
    row_max = torch.full((bh, c, tile), float("-inf"), device=q_c.device)
    exact = None
    if slots:
        k_g = kt[rows, idx].view(bh, c, slots * tile, w)  # (BH, c, S*T, w)
        v_g = vt[rows, idx].view(bh, c, slots * tile, w)
        diff = torch.arange(i0, i1, device=idx.device)[:, None] - idx - plan.diff_min
        where = torch.where(ok, diff, plan.table.shape[0] - 1)  # the all -inf block for empty slots
        exact = (q_c @ k_g.transpose(-1, -2)).view(bh, c, tile, slots, tile)
        # Whole blocks gather fast along the table's first dim; the add reads them transposed
        # (.., c, S, Tq, Tk) -> (.., c, Tq, S, Tk). In place: matmul keeps its inputs for backward.
        blocks = plan.table.index_select(0, where.reshape(-1)).view(*where.shape, tile, tile)
        exact += blocks.transpose(2, 3)
        if pad_add is not None:
            exact += pad_add[rows, idx][:, :, None]
        exact = exact.view(bh, c, tile, slots * tile)
        with torch.no_grad():
            row_max = exact.amax(-1)
    if pooled_scores is not None:
        with torch.no_grad():
            row_max = torch.maximum(row_max, pooled_scores.amax(-1))
    # The shift cancels in the softmax (no gradient needed). Rows that see nothing keep a finite
    # shift so that exp gives exact zeros, never NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))[..., None]
    total = torch.zeros_like(row_max)
    if exact is not None:
        p = exact.sub_(row_max).exp_()
        total = total + p.sum(-1, keepdim=True)
        out = p @ v_g
    if pooled_scores is not None:
        p = torch.exp(pooled_scores - row_max)
        total = total + p.sum(-1, keepdim=True)
        pooled_out = p @ v_bar[:, None]
        out = pooled_out if out is None else out + pooled_out
    if out is None:
        return q_c.new_zeros(bh, c, tile, w)
    return out / torch.where(total > 0, total, torch.ones_like(total))


def tiling_settings(depth: int, tile_size, budget, summaries, local_tiles) -> TilingSettings:
    """Checked settings; `tile_size=None` is DEFAULT_TILE rounded down to a multiple of `depth`."""
    if tile_size is None:
        tile_size = max(depth, DEFAULT_TILE - DEFAULT_TILE % depth)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1 or tile_size % depth:
        raise ValueError(f"tiled: tile_size={tile_size!r} must be a positive multiple of depth={depth}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"tiled: budget={budget!r} must be None (every tile exact) or an integer >= 0")
    if not isinstance(summaries, bool):
        raise ValueError(f"tiled: summaries={summaries!r} must be true or false")
    if isinstance(local_tiles, bool) or not isinstance(local_tiles, int) or local_tiles < 0:
        raise ValueError(f"tiled: local_tiles={local_tiles!r} must be an integer >= 0")
    return TilingSettings(tile_size, budget, summaries, local_tiles)


class TiledKernel(KernelModule):
    """Adaptive tiled toroidal attention followed by depth fusion (see the module docstring).

    Options: the torus (`TORUS_OPTIONS` but backend; the period rule is `ToroidalKernel`'s) and
    tile_size (platter-tokens, a multiple of depth; default 128 rounded down to one), budget
    (candidate key tiles attended exactly per query tile; None: all, which is exact attention),
    summaries (pool the other candidates, else skip them) and local_tiles (key tiles within this
    many tiles on the ring are always exact).
    `get_metrics()`: fractions of visible tile pairs computed exactly, pooled and skipped, and
    matmul FLOPs saved against exact tiled attention over the same tiles.
    """

    def __init__(self, heads: int, head_dim: int, **options):
        super().__init__()
        check_options("tiled", options, TILED_OPTIONS)
        self.config = torus_config(heads, head_dim, options)
        self.settings = tiling_settings(
            self.config.depth,
            options.get("tile_size"),
            options.get("budget", DEFAULT_BUDGET),
            options.get("summaries", True),
            options.get("local_tiles", 1),
        )
        self.fusion = DepthFusion(self.config.fusion, heads, self.config.depth, self.config.fusion_rank)
        self._plan_key, self._plan = None, None
        self._counts, self._calls = TileCounts(), 0

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        cfg = self.config
        call = plan_call(
            q, k, v, depth=cfg.depth, lambda_distance=cfg.lambda_distance,
            period=cfg.period_for(k.shape[-2], causal), causal=causal, window=cfg.window,
            key_padding_mask=key_padding_mask, scale=scale, q_offset=q_offset, sliding_window=sliding_window,
        )  # fmt: skip
        # Layers and repeated steps share a shape: keep the last plan (classification and bias table).
        key = (call.geometry, call.q.shape[2], call.k.shape[2], str(q.device))
        if key != self._plan_key:
            self._plan_key = key
            self._plan = _make_plan(call.geometry, key[1], key[2], self.settings, q.device)
        out, counts = tiled_attention(
            call.q, call.k, call.v, call.geometry, call.padding, call.scale, self.settings, self._plan
        )
        self._counts.add(counts)
        self._calls += 1
        return self.fusion(from_platters(out, cfg.depth))

    def get_metrics(self) -> dict:
        c = self._counts
        if not self._calls:
            return {}
        share = (lambda n: n / c.visible) if c.visible else (lambda n: 0.0)
        return {
            "calls": self._calls,
            "tile_pairs": c.visible,
            "exact_fraction": share(c.exact),
            "pooled_fraction": share(c.pooled),
            "skipped_fraction": share(c.skipped),
            "flops": c.flops,
            "flops_exact": c.flops_exact,
            "flops_saved": c.flops_exact - c.flops,
            "flops_saved_fraction": (c.flops_exact - c.flops) / c.flops_exact if c.flops_exact else 0.0,
        }

    def reset_metrics(self) -> None:
        self._counts, self._calls = TileCounts(), 0


MECHANISM = Mechanism(
    "tiled",
    "adaptive tiles of the torus: the top `budget` key tiles exact, the others pooled",
    TiledKernel,
    accepts=TILED_OPTIONS,
    approximates="toroidal",
)

"""Ring attention: toroidal attention sequence-parallel across the ranks of a `torch.distributed`
group; key/value shards circulate while each rank computes its own queries (docs/internals.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from toroidal.functional import from_platters, to_platters
from toroidal.geometry import TorusGeometry, expand_key_padding
from toroidal.kernels.blockwise import DEFAULT_TILE, Tiles, tiled_backward, tiled_forward

LAYOUTS = ("contiguous", "zigzag")
_GRADIENT_TAG = 8  # shard messages use tags 0 (k), 1 (v) and 2 (key padding)


# --- which positions a rank holds ------------------------------------------------------------------


def chunk_starts(layout: str, rank: int, world_size: int, n_local: int) -> list[int]:
    """Global position of the first token of each chunk rank `rank` holds (chunks in local order).

    The chunks are equally long: n_local for `contiguous`, n_local / 2 for `zigzag`.
    """
    if layout == "contiguous":
        return [rank * n_local]
    if layout == "zigzag":
        if n_local % 2:
            raise ValueError(f"the zigzag layout needs an even shard length, got {n_local}")
        half = n_local // 2
        return [rank * half, (2 * world_size - 1 - rank) * half]
    raise ValueError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")


def sequence_positions(layout: str, rank: int, world_size: int, n_local: int) -> torch.Tensor:
    """Global positions of a rank's n_local tokens (e.g. for rotary encodings), int64."""
    starts = chunk_starts(layout, rank, world_size, n_local)
    length = n_local // len(starts)
    return torch.cat([torch.arange(start, start + length) for start in starts])


def _check_divisible(n: int, world_size: int, layout: str) -> None:
    parts = 2 * world_size if layout == "zigzag" else world_size
    if world_size < 1 or n % parts:
        raise ValueError(
            f"a sequence of {n} positions cannot be cut into {parts} equal chunks "
            f"({layout} layout, world size {world_size}); pad it to a multiple of {parts}"
        )


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous", dim: int = 2):
    """This rank's shard of a full-sequence tensor (sequence along `dim`, default (B, H, N, e))."""
    _check_divisible(x.shape[dim], world_size, layout)
    n_local = x.shape[dim] // world_size
    starts = chunk_starts(layout, rank, world_size, n_local)
    length = n_local // len(starts)
    return torch.cat([x.narrow(dim, start, length) for start in starts], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard (in rank order); inverse of `shard_sequence`."""
    world_size, n_local = len(shards), shards[0].shape[dim]
    pieces = {}
    for rank, shard in enumerate(shards):
        starts = chunk_starts(layout, rank, world_size, n_local)
        length = n_local // len(starts)
        for index, start in enumerate(starts):
            pieces[start] = shard.narrow(dim, index * length, length)
    return torch.cat([pieces[start] for start in sorted(pieces)], dim=dim)


def gather_sequence(x: torch.Tensor, layout: str = "contiguous", group=None, dim: int = 2) -> torch.Tensor:
    """All-gather every rank's shard and return the full-sequence tensor on every rank."""
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, layout, dim)


# --- the ring of ranks -----------------------------------------------------------------------------


class _Transfer:
    """Posted sends to the next rank and receives from the previous one; `wait` returns the received."""

    def __init__(self, works, received):
        self._works, self._received = works, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        return self._received


@dataclass(frozen=True)
class _Ring:
    group: object
    rank: int
    world_size: int
    next_peer: int  # global ranks, as point-to-point calls want them
    prev_peer: int

    @classmethod
    def of(cls, group) -> _Ring:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ring_attention needs an initialized torch.distributed process group "
                "(launch with torchrun, or call torch.distributed.init_process_group)"
            )
        group = group if group is not None else dist.group.WORLD
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        peer = lambda r: dist.get_global_rank(group, r % world)
        return cls(group, rank, world, peer(rank + 1), peer(rank - 1))

    def pass_on(self, tensors: list[torch.Tensor], tag: int = 0) -> _Transfer:
        """Send `tensors` to the next rank and receive the previous rank's, without waiting.

        Messages of different kinds (shards, gradients) get different tags, so that a
        transport matching by (peer, tag) never pairs one kind with the other.
        """
        if self.world_size == 1:
            return _Transfer([], tensors)
        received = [torch.empty_like(t) for t in tensors]
        ops = []
        for index, (sent, buffer) in enumerate(zip(tensors, received, strict=True)):
            ops.append(dist.P2POp(dist.isend, sent, self.next_peer, self.group, tag + index))
            ops.append(dist.P2POp(dist.irecv, buffer, self.prev_peer, self.group, tag + index))
        return _Transfer(dist.batch_isend_irecv(ops), received)


# --- the attention -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything about one ring call except the tensors."""

    ring: _Ring
    layout: str
    n_local: int  # positions per rank
    depth: int
    period: int
    lambda_distance: float
    causal: bool
    window: int | None
    scale: float
    tile: int

    def starts(self, rank: int) -> list[int]:
        return chunk_starts(self.layout, rank, self.ring.world_size, self.n_local)

    @property
    def chunk(self) -> int:
        """Platter-tokens per chunk."""
        return self.n_local // len(self.starts(0)) * self.depth

    def tiles(self, q_start: int, k_start: int, key_padding, batch: int, device) -> Tiles | None:
        """The tiling of one (query chunk, key chunk) pair at global starts; None if no pair is allowed."""
        offset = q_start - k_start
        geometry = TorusGeometry(
            self.depth, self.period, self.lambda_distance, self.causal, self.window, q_offset=offset
        )
        tiles = Tiles(geometry, key_padding, self.tile, self.chunk, self.chunk, batch, device)
        return tiles if any(tiles.plan) else None


def _merge(out, lse, block_out, block_lse) -> None:
    """Fold one block's (output, log-sum-exp) into the running ones, in place."""
    block_lse = block_lse.masked_fill(block_lse == float("inf"), float("-inf"))  # saw nothing: weight 0
    total = torch.logaddexp(lse, block_lse)
    shift = total.masked_fill(total == float("-inf"), 0.0)  # rows nothing reached so far stay 0
    out.mul_(torch.exp(lse - shift)).add_(block_out * torch.exp(block_lse - shift))
    lse.copy_(total)


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(B*H, L, w) -> views of its chunks along L (the tiles copy what they need)."""
    return list(x.split(size, dim=1))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding, spec: _Spec):
        b, h, length, w = q.shape
        ring, size = spec.ring, spec.chunk
        q_chunks = _chunks(q.reshape(b * h, length, w).float(), size)
        outs = [torch.zeros_like(chunk) for chunk in q_chunks]
        lses = [torch.full((b * h, size, 1), float("-inf"), device=q.device) for _ in q_chunks]
        shard = [k.contiguous(), v.contiguous()]  # sent as they are: no packing copy
        if key_padding is not None:
            shard.append(key_padding.to(torch.uint8))  # bool is not a transport type everywhere
        plans = []  # per step, {(query chunk, key chunk): tiles}: the backward pass reuses them
        for step in range(ring.world_size):
            source = (ring.rank - step) % ring.world_size
            incoming = ring.pass_on(shard) if step < ring.world_size - 1 else None
            k_chunks, v_chunks = (_chunks(t.reshape(b * h, length, w).float(), size) for t in shard[:2])
            pad_chunks = shard[2].bool().split(size, dim=1) if key_padding is not None else None
            plan = {}
            for qi, q_start in enumerate(spec.starts(ring.rank)):
                for ki, k_start in enumerate(spec.starts(source)):
                    pad = pad_chunks[ki] if pad_chunks is not None else None
                    tiles = spec.tiles(q_start, k_start, pad, b, q.device)
                    if tiles is None:
                        continue
                    plan[qi, ki] = tiles
                    block = tiled_forward(tiles, q_chunks[qi], k_chunks[ki], v_chunks[ki], spec.scale)
                    _merge(outs[qi], lses[qi], *block)
            plans.append(plan)
            if incoming is not None:
                shard = incoming.wait()
        out = torch.cat(outs, dim=1)
        # Rows that saw nothing get lse = +inf so that their recomputed probabilities are 0.
        lse = torch.cat(lses, dim=1)
        lse.masked_fill_(lse == float("-inf"), float("inf"))
        out = out.view(b, h, length, w).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, key_padding)
        ctx.spec, ctx.plans = spec, plans
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding = ctx.saved_tensors
        spec, plans = ctx.spec, ctx.plans
        ring, size = spec.ring, spec.chunk
        b, h, length, w = q.shape
        qf, of, dof = (t.reshape(b * h, length, w).float() for t in (q, out, grad_out))
        q_chunks, do_chunks = _chunks(qf, size), _chunks(dof, size)
        lse_chunks = lse.split(size, dim=1)
        delta_chunks = (dof * of).sum(-1, keepdim=True).split(size, dim=1)  # D_i = rowsum(dO * O)
        dq = torch.zeros_like(qf)
        shard = [k.contiguous(), v.contiguous()]
        grads_in_flight = None
        for step in range(ring.world_size):
            incoming = ring.pass_on(shard) if step < ring.world_size - 1 else None
            k_chunks, v_chunks = (_chunks(t.reshape(b * h, length, w).float(), size) for t in shard)
            # This step's contribution to the gradients of the key/value shard it holds.
            dkv = qf.new_zeros(2, b * h, length, w)
            for (qi, ki), tiles in plans[step].items():
                dq_c, dk_c, dv_c = tiled_backward(
                    tiles, q_chunks[qi], k_chunks[ki], v_chunks[ki], do_chunks[qi],
                    lse_chunks[qi], delta_chunks[qi], spec.scale,
                )  # fmt: skip
                dq[:, qi * size : (qi + 1) * size] += dq_c
                dkv[0, :, ki * size : (ki + 1) * size] += dk_c
                dkv[1, :, ki * size : (ki + 1) * size] += dv_c
            if grads_in_flight is not None:  # what the ranks before this one added to the same shard
                dkv += grads_in_flight.wait()[0]
            # The last pass brings each accumulator home: rank r's arrives from rank r - 1.
            grads_in_flight = ring.pass_on([dkv], tag=_GRADIENT_TAG)
            if incoming is not None:
                shard = incoming.wait()
        dk, dv = grads_in_flight.wait()[0]
        grads = (g.reshape(b, h, length, w).to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))
        return (*grads, None, None)


def ring_attention(
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
    layout: str = "contiguous",
    group=None,
    tile: int = DEFAULT_TILE,
) -> torch.Tensor:
    """Toroidal attention over a sequence sharded across the ranks of `group` (default: the world).

    q: (B, H, n, e), k and v: (B, H_kv, n, e), this rank's n = N/W positions as laid out by
    `shard_sequence(x, rank, W, layout)`; every rank must pass the same shapes and options.
    `key_padding_mask` is this rank's (B, n) shard, True for real tokens. `period=None`
    means P = N, the global length; `scale=None` means (e/D)^-0.5. Returns this rank's
    (B, H, n, e) output shard, equal to `toroidal_attention` on the full sequence; gradients
    flow to q, k and v. Grouped k/v heads are expanded to H before they travel.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, n, e) with k and v alike; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, h, n, e = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, n, e) or h % k.shape[1]:
        raise ValueError(f"k and v must be (B, H_kv, n, e) matching q {tuple(q.shape)}; got {tuple(k.shape)}")
    if e % depth:
        raise ValueError(f"depth={depth} must divide the head dimension {e}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, n):
        raise ValueError(
            f"key_padding_mask must be this rank's (B, n) = {(b, n)}; got {tuple(key_padding_mask.shape)}"
        )
    if tile < 1:
        raise ValueError(f"tile must be >= 1 platter-token, got {tile}")
    chunk_starts(layout, 0, 1, n)  # rejects unknown layouts and odd zigzag shards
    ring = _Ring.of(group)
    if k.shape[1] != h:
        k, v = (t.repeat_interleave(h // k.shape[1], dim=1) for t in (k, v))
    spec = _Spec(
        ring=ring,
        layout=layout,
        n_local=n,
        depth=depth,
        period=period if period is not None else n * ring.world_size,
        lambda_distance=float(lambda_distance),
        causal=causal,
        window=window,
        scale=scale if scale is not None else (e // depth) ** -0.5,
        tile=tile,
    )
    padding = expand_key_padding(key_padding_mask, depth)
    qp, kp, vp = (to_platters(t, depth) for t in (q, k, v))
    return from_platters(_RingAttention.apply(qp, kp, vp, padding, spec), depth)

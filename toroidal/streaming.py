"""Streaming inference: causal toroidal attention with a constant-size state (`LatentKV`).

    stream = StreamingToroidalAttention(ToroidalAttention(causal=True, ...), latent_size=64, update="gru")
    state = stream.init_state(batch=2)
    for x_t in tokens:                      # (B, d_model) each
        y_t, state = stream.forward_streaming(x_t, state)

What the slots approximate and when it is exact: docs/internals.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from toroidal.attention import ToroidalAttention
from toroidal.geometry import ring_distance, toroidal_distance
from toroidal.kernels.base import masked_softmax

UPDATES = ("gru", "linear")


@dataclass
class LatentKV:
    """The streaming state of one layer: m latent slots per head, O(1) in the tokens seen.

    keys, values: (B, H_kv, m, e), keys rotated like the keys they summarize;
    counts: (m,) float, tokens written to each slot; step: tokens seen so far
    (the position of the next token).
    """

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    step: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, latent_size: int, head_dim: int, device=None, dtype=None):
        shape = (batch, heads, latent_size, head_dim)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        return cls(zeros, zeros.clone(), torch.zeros(latent_size, device=device), 0)

    @property
    def latent_size(self) -> int:
        return self.keys.shape[2]

    @property
    def numel(self) -> int:
        return self.keys.numel() + self.values.numel() + self.counts.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.counts))


def slot_of(position: int, latent_size: int, period: int) -> int:
    """The slot of a position: its ring position's share of the ring, in m equal arcs."""
    return (position % period) * latent_size // period


def slot_anchors(latent_size: int, period: int, device=None) -> torch.Tensor:
    """(m,) the centre of each slot's arc of ring positions (float; empty arcs when m > P)."""
    s = torch.arange(latent_size, dtype=torch.float64)
    first = torch.ceil(s * period / latent_size)
    last = torch.ceil((s + 1) * period / latent_size) - 1
    return ((first + last) / 2).to(device=device, dtype=torch.float32)


class LatentUpdate(nn.Module):
    """How a token is merged into its slot (see the module docstring): `linear` or `gru`."""

    def __init__(self, mode: str, heads: int, depth: int, platter_width: int):
        super().__init__()
        if mode not in UPDATES:
            raise ValueError(f"update {mode!r} must be one of {', '.join(UPDATES)}")
        self.mode, self.depth, self.width = mode, depth, platter_width
        if mode == "linear":
            self.log_rate = nn.Parameter(torch.zeros(heads))  # rho = exp(0) = 1: the running mean
        else:
            self.cell = nn.GRUCell(2 * platter_width, 2 * platter_width)

    def forward(self, key, value, old_key, old_value, count: torch.Tensor):
        """key, value, old_*: (B, H, e); count: 0-d, tokens in the slot after this write."""
        if self.mode == "linear":
            rate = count.to(key.dtype) ** -self.log_rate.exp().to(key.dtype)  # (H,), 1 for an empty slot
            rate = rate[None, :, None]
            return old_key + rate * (key - old_key), old_value + rate * (value - old_value)
        b, h, e = key.shape
        split = (b * h * self.depth, self.width)
        token = torch.cat((key.reshape(split), value.reshape(split)), dim=-1)
        hidden = torch.cat((old_key.reshape(split), old_value.reshape(split)), dim=-1)
        merged = torch.where(count > 1, self.cell(token, hidden), token)
        new_key, new_value = merged.split(self.width, dim=-1)
        return new_key.reshape(b, h, e), new_value.reshape(b, h, e)


def latent_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LatentKV,
    update: LatentUpdate,
    *,
    depth: int,
    lambda_distance: float,
    period: int,
    window: int | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, LatentKV]:
    """One streaming step on per-head tensors, before depth fusion.

    q: (B, H, 1, e), k, v: (B, H_kv, 1, e) (H a multiple of H_kv), all at position
    state.step and rotated there. Returns (output (B, H, 1, e), the state with the
    token written).
    """
    b, h, _, e = q.shape
    kv_heads, m, w = k.shape[1], state.latent_size, e // depth
    if state.keys.shape != (b, kv_heads, m, e):
        raise ValueError(
            f"state keys {tuple(state.keys.shape)} do not match keys {tuple(k.shape)}: "
            f"expected (B, H_kv, m, e) = {(b, kv_heads, m, e)}"
        )
    t, device = state.step, q.device
    scale = w**-0.5 if scale is None else scale
    # Key positions: the m arc centres, then the token itself; platters innermost.
    positions = torch.cat((slot_anchors(m, period, device), torch.full((1,), float(t), device=device)))
    positions = positions.repeat_interleave(depth)
    key_platters = torch.arange(depth, device=device).repeat(m + 1)
    query_platters = torch.arange(depth, device=device)[:, None]
    bias = -lambda_distance * toroidal_distance(t, query_platters, positions, key_platters, period, depth)
    counts = torch.cat((state.counts, torch.ones(1, device=device))).repeat_interleave(depth)
    bias = bias + counts.clamp_min(1).log()  # a slot weighs as many tokens as it merged
    allowed = (counts > 0).expand(depth, -1)
    if window is not None:
        allowed = allowed & (ring_distance(t, positions, period) <= window)

    queries = q.float().reshape(b, kv_heads, h // kv_heads, depth, w)
    keys = torch.cat((state.keys.float(), k.float()), dim=2).reshape(b, kv_heads, (m + 1) * depth, w)
    values = torch.cat((state.values.float(), v.float()), dim=2).reshape(b, kv_heads, (m + 1) * depth, w)
    scores = torch.einsum("bngkw,bnlw->bngkl", queries, keys) * scale + bias
    weights = masked_softmax(scores, allowed)
    out = torch.einsum("bngkl,bnlw->bngkw", weights, values).reshape(b, h, 1, e).to(q.dtype)

    slot = slot_of(t, m, period)
    count = state.counts[slot] + 1
    old_key, old_value = state.keys[:, :, slot], state.values[:, :, slot]
    new_key, new_value = update(k[:, :, 0], v[:, :, 0], old_key, old_value, count)
    index = torch.tensor([slot], device=device)
    new_state = replace(
        state,
        keys=state.keys.index_copy(2, index, new_key.unsqueeze(2).to(state.keys.dtype)),
        values=state.values.index_copy(2, index, new_value.unsqueeze(2).to(state.values.dtype)),
        counts=state.counts.index_add(0, index, torch.ones(1, device=device)),
        step=t + 1,
    )
    return out, new_state


class StreamingToroidalAttention(nn.Module):
    """A causal `ToroidalAttention` run one token at a time on a `LatentKV` state.

    It shares the wrapped module's projections, rotary encoding and depth fusion, and
    owns the update parameters (`latent_update`: the 'gru' or 'linear' rule).
    """

    def __init__(self, attention: ToroidalAttention, latent_size: int = 64, update: str = "gru"):
        super().__init__()
        cfg = attention.config
        if not cfg.causal:
            raise ValueError("streaming is causal: wrap a ToroidalAttention with causal=True")
        if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
            raise ValueError(f"latent_size={latent_size!r} must be a positive integer")
        self.attention, self.latent_size = attention, latent_size
        self.latent_update = LatentUpdate(update, cfg.n_heads, cfg.depth, cfg.platter_width)

    @property
    def period(self) -> int:
        return self.attention.config.period_for(0)  # causal: fixed

    def init_state(self, batch: int, device=None, dtype=None) -> LatentKV:
        weight = self.attention.qkv.weight
        cfg = self.attention.config
        return LatentKV.empty(
            batch,
            cfg.n_heads,
            self.latent_size,
            cfg.head_dim,
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )

    def forward_streaming(self, x_t: torch.Tensor, state: LatentKV) -> tuple[torch.Tensor, LatentKV]:
        """x_t: (B, d_model), the token at position state.step. Returns (y_t (B, d_model), new state)."""
        attn, cfg = self.attention, self.attention.config
        if x_t.dim() != 2 or x_t.shape[-1] != cfg.d_model:
            raise ValueError(f"expected x_t of shape (B, {cfg.d_model}), got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        q, k, v = attn.qkv(x_t).view(b, 1, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        period = self.period
        q, k = attn.rotary(q, state.step, period), attn.rotary(k, state.step, period)
        out, state = latent_attention_step(
            q,
            k,
            v,
            state,
            self.latent_update,
            depth=cfg.depth,
            lambda_distance=cfg.lambda_distance,
            period=period,
            window=cfg.window,
        )
        out = attn.dropout(attn.fusion(out))
        return attn.out(out.reshape(b, cfg.d_model)), state

    def forward(self, x: torch.Tensor, state: LatentKV | None = None) -> tuple[torch.Tensor, LatentKV]:
        """Stream a whole sequence x: (B, N, d_model) token by token; returns (y (B, N, d_model), state)."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        outputs = []
        for t in range(x.shape[1]):
            y_t, state = self.forward_streaming(x[:, t], state)
            outputs.append(y_t)
        return torch.stack(outputs, dim=1), state

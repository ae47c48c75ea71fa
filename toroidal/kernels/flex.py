"""`flex`: torch FlexAttention with the torus as a compiled `score_mod` and a block-sparse mask;
with a bias, the call is split into bands of linear ring distance (docs/internals.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

from toroidal.geometry import RingSegment, TorusGeometry, toroidal_distance
from toroidal.kernels.base import Backend, BackendUnavailable, register

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError as exc:  # torch < 2.5
    flex_attention = None
    _IMPORT_ERROR = f"FlexAttention is not available in torch {torch.__version__} ({exc})"
else:
    _IMPORT_ERROR = None
try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9 returns the log-sum-exp with return_lse=True
    AuxRequest = None

_CACHE_SIZE = 8
_MIN_CUDA_WIDTH = 16  # the Triton kernel's tl.dot needs head dim >= 16
_STATIC_MIN_QUERIES = 2048  # query rows from which inference calls compile per shape
_STATIC_MAX_SHAPES = 16  # then new shapes share one dynamic kernel
_MAX_SEGMENTS = 4  # causal or not with P >= N needs at most 4 bands
# Banding needs the log-sum-exp, which the compiled CPU kernel does not return (torch 2.13).
_BANDED_DEVICES = {"cuda"}


@functools.cache
def _compiled_flex(static: bool = False):
    """FlexAttention under torch.compile (eager flex falls back to a slow reference).

    `static`: one kernel per shape. A kernel compiled for symbolic lengths (what dynamo
    switches to at the second shape it sees) ran the torus 1.6x slower at N = 8192 on an
    H100, so long and training calls, whose shapes rarely change, compile per shape;
    short inference calls (decoding, where the key length grows every step) stay dynamic.
    """
    # Each mask/score structure (causal, window, padding, bias on/off, dtype) is one graph:
    # more than dynamo's default 8, and falling back to eager flex would be silently slow.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False if static else None)


_static_seen: set[tuple] = set()


def _static_shapes(q, k, v) -> bool:
    """Whether this call compiles for its exact shape (see `_compiled_flex`).

    Only the first `_STATIC_MAX_SHAPES` distinct shapes do: a workload whose lengths keep
    changing (dynamically padded batches) would otherwise recompile on every new length.
    """
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not (training or q.shape[-2] >= _STATIC_MIN_QUERIES):
        return False
    shape = (tuple(q.shape), tuple(k.shape), q.dtype, training)
    if shape not in _static_seen and len(_static_seen) >= _STATIC_MAX_SHAPES:
        return False
    _static_seen.add(shape)
    return True


def _cpu_reason(requires_grad: bool) -> str | None:
    if requires_grad:
        return (
            f"flex on CPU is forward-only in torch {torch.__version__.split('+')[0]} (no backward); "
            "use blockwise or sdpa for training"
        )
    if sys.platform == "darwin" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "flex on CPU needs an x86 CPU with AVX2 (torch.compile's CPU flex kernel); use sdpa"
    return None


def _traced(geometry: TorusGeometry, device) -> TorusGeometry:
    """The same geometry with its scalars as device tensors, so the kernel reads them as inputs."""

    def as_tensor(value, dtype):
        return torch.tensor(value, dtype=dtype, device=device)

    return dataclasses.replace(
        geometry,
        lambda_distance=as_tensor(geometry.lambda_distance, torch.float32),
        period=as_tensor(geometry.period, torch.int32),
        q_offset=as_tensor(geometry.q_offset, torch.int32),
        window=None if geometry.window is None else as_tensor(geometry.window, torch.int32),
        sliding_window=(
            None if geometry.sliding_window is None else as_tensor(geometry.sliding_window, torch.int32)
        ),
    )


def _everything(b, h, q_idx, kv_idx):
    return q_idx >= 0


def _kv_blocks(flags):
    """(count, indices) per query block of a (..., Q blocks, KV blocks) bool layout, set blocks first."""
    counts = flags.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, order


def _all_partial(block_mask, mask_mod):
    """The same block layout with every non-empty block partial, so `mask_mod` runs on all of them."""
    return BlockMask.from_kv_blocks(
        *_kv_blocks(block_mask.to_dense().bool()),
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=block_mask.seq_lengths,
    )


class FlexBackend(Backend):
    name = "flex"
    description = "torch FlexAttention (compiled score_mod + block mask); CUDA train/infer, CPU inference"

    def __init__(self) -> None:
        self._cache: OrderedDict = OrderedDict()

    def unavailable_reason(self, request):
        if flex_attention is None:
            return _IMPORT_ERROR
        if request.need_weights:
            return "flex cannot return attention weights; use backend='reference'"
        if request.device_type == "cpu":
            if request.dtype == torch.float64:  # torch's CPU flex kernel takes fp32, fp16 and bf16 only
                return "flex on CPU has no float64 kernel; use reference, sdpa, blockwise or native"
            return _cpu_reason(request.requires_grad)
        if request.device_type != "cuda":
            return f"flex here supports cuda and cpu, not {request.device_type}"
        if importlib.util.find_spec("triton") is None:
            return "flex on CUDA needs triton (it ships with the CUDA builds of torch)"
        return None

    def _cached(self, key, build):
        """`build()`, kept for the last `_CACHE_SIZE` keys (geometry, shape and device)."""
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        value = self._cache[key] = build()
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    def _plan(self, geometry, lq, lk, device):
        """(geometry with tensor scalars, its block mask) of a single call."""

        def build():
            traced = _traced(geometry, device)
            mask_mod = traced.mask_mod() or _everything
            return traced, create_block_mask(mask_mod, None, None, lq, lk, device=device)

        return self._cached((geometry, lq, lk, str(device)), build)

    @staticmethod
    def _with_padding(traced, blocks, key_padding):
        """The cached layout with every block partial and a mask_mod that also reads the padding."""
        inner = traced.mask_mod()
        if inner is None:

            def mask_mod(b, h, q_idx, kv_idx):
                return key_padding[b, kv_idx]

        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return key_padding[b, kv_idx] & inner(b, h, q_idx, kv_idx)

        return _all_partial(blocks, mask_mod)

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        if q.device.type == "cpu":
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise BackendUnavailable(f"backend 'flex' unavailable: {_cpu_reason(True)}")
            # The CPU kernel rejects requires_grad inputs even under no_grad; nothing is recorded here.
            q, k, v = q.detach(), k.detach(), v.detach()
        width = q.shape[-1]
        if q.device.type == "cuda" and width < _MIN_CUDA_WIDTH:
            # Zero features change no dot product; the padded output columns are dropped.
            q, k, v = (F.pad(t, (0, _MIN_CUDA_WIDTH - width)) for t in (q, k, v))
        depth = geometry.depth
        segments = None
        if geometry.lambda_distance != 0 and q.device.type in _BANDED_DEVICES:
            segments = geometry.linear_segments(q.shape[-2] // depth, k.shape[-2] // depth, _MAX_SEGMENTS)
        if segments is None:
            out = self._single_call(q, k, v, geometry, key_padding, scale)
        else:
            out = self._banded(q, k, v, geometry, key_padding, scale, segments)
        return out[..., :width], None

    def _single_call(self, q, k, v, geometry, key_padding, scale):
        """One call over platter-tokens; the bias, if any, is computed per score."""
        traced, block_mask = self._plan(geometry, q.shape[-2], k.shape[-2], q.device)
        if key_padding is not None:
            block_mask = self._with_padding(traced, block_mask, key_padding)
        score_mod = traced.score_mod() if geometry.lambda_distance != 0 else None
        # Rows with nothing to attend come back as zeros (FlexAttention's documented behaviour).
        flex = _compiled_flex(_static_shapes(q, k, v))
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)

    def _banded(self, q, k, v, geometry, key_padding, scale, segments):
        """One call per band of the ring with query platters as heads, merged by log-sum-exp."""
        batch, heads, n_query_tokens, width = q.shape
        depth = geometry.depth
        n_queries, n_keys = n_query_tokens // depth, k.shape[-2] // depth
        # (B, H, Nq*D, w) -> (B, H*D, Nq, w): head h*D + k holds platter k of head h.
        q_heads = (
            q.view(batch, heads, n_queries, depth, width)
            .transpose(2, 3)
            .reshape(-1, heads * depth, n_queries, width)
        )
        outs, lses = [], []
        for band in self._bands(geometry, segments, n_queries, n_keys, q.device):
            block_mask = band.block_mask
            if key_padding is not None:
                block_mask = self._with_padding(band, block_mask, key_padding)
            out, lse = _flex_with_lse(q_heads, k, v, band.score_mod(), block_mask, scale)
            outs.append(out)
            lses.append(lse + band.row_bias)
        out = outs[0] if len(outs) == 1 else _compiled_merge()(outs, lses)
        return out.view(batch, heads, depth, n_queries, width).transpose(2, 3).reshape(q.shape)

    def _bands(self, geometry, segments, n_queries, n_keys, device):
        return self._cached(
            ("bands", geometry, n_queries, n_keys, str(device)),
            lambda: [_Band.build(geometry, segment, n_queries, n_keys, device) for segment in segments],
        )


@dataclasses.dataclass
class _Band:
    """One band lo <= i - j <= hi of the ring: its block mask, key bias and per-query bias."""

    depth: int
    q_offset: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    key_bias: torch.Tensor  # (D, N_k * D) float32: row k is the bias query platter k adds to each key
    row_bias: torch.Tensor  # (N_q,) float32: the per-query constant, added to the log-sum-exp
    block_mask: object = None

    @classmethod
    def build(cls, geometry: TorusGeometry, segment: RingSegment, n_queries: int, n_keys: int, device):
        depth, period, lam = geometry.depth, geometry.period, geometry.lambda_distance
        # -lam*ring/P with ring = slope*(i - j) + offset splits into
        # -lam*(slope*i + offset)/P per query and +lam*slope*j/P per key.
        i = geometry.q_offset + torch.arange(n_queries, device=device, dtype=torch.float64)
        row_bias = (-lam * (segment.slope * i + segment.offset) / period).float()
        j = torch.arange(n_keys, device=device, dtype=torch.float64).repeat_interleave(depth)
        platter = torch.arange(depth, device=device)
        # The platter part of the torus distance: both positions 0, so ring(0, 0) = 0.
        same = torch.zeros((), dtype=torch.long, device=device)
        key_platter = platter.repeat(n_keys)
        platter_term = -lam * toroidal_distance(same, platter[:, None], same, key_platter, period, depth)
        key_bias = (lam * segment.slope * j / period + platter_term).float()

        def scalar(value):
            return torch.tensor(value, dtype=torch.int32, device=device)

        band = cls(
            depth, scalar(geometry.q_offset), scalar(segment.lo), scalar(segment.hi), key_bias, row_bias
        )
        band.block_mask = _band_block_mask(
            n_queries,
            n_keys * depth,
            depth,
            geometry.q_offset,
            segment.lo,
            segment.hi,
            band.mask_mod(),
            device,
        )
        return band

    def mask_mod(self):
        depth, q_offset, lo, hi = self.depth, self.q_offset, self.lo, self.hi

        def mod(b, h, q_idx, kv_idx):
            m = q_offset + q_idx - kv_idx // depth
            return (m >= lo) & (m <= hi)

        return mod

    def score_mod(self):
        depth, key_bias = self.depth, self.key_bias

        def mod(score, b, h, q_idx, kv_idx):
            return score + key_bias[h % depth, kv_idx].to(score.dtype)

        return mod


def _band_block_mask(n_queries, n_key_tokens, depth, q_offset, lo, hi, mask_mod, device, block=128):
    """The BlockMask of lo <= i - j <= hi over (query position, key platter-token), from block corners.

    `create_block_mask` would evaluate `mask_mod` on every pair (N x N*D: gigabytes at N = 32768);
    a band's blocks are empty, full or partial by the extreme values of i - j inside them.
    Blocks cut short by the end of a sequence stay partial, as `create_block_mask` leaves them.
    """
    q_start = torch.arange(0, n_queries, block, device=device)
    k_start = torch.arange(0, n_key_tokens, block, device=device)
    q_stop = torch.clamp(q_start + block, max=n_queries)
    k_stop = torch.clamp(k_start + block, max=n_key_tokens)
    m_min = (q_offset + q_start)[:, None] - ((k_stop - 1) // depth)[None, :]
    m_max = (q_offset + q_stop - 1)[:, None] - (k_start // depth)[None, :]
    touched = (m_max >= lo) & (m_min <= hi)
    complete = (q_stop - q_start == block)[:, None] & (k_stop - k_start == block)[None, :]
    full = (m_min >= lo) & (m_max <= hi) & complete

    # Leading (batch, head) dimensions of 1: the band is the same for every sequence and head.
    return BlockMask.from_kv_blocks(
        *_kv_blocks((touched & ~full)[None, None]),
        *_kv_blocks(full[None, None]),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(n_queries, n_key_tokens),
    )


def _flex_with_lse(q, k, v, score_mod, block_mask, scale):
    """FlexAttention over query heads grouped on the key heads, with its (natural) log-sum-exp."""
    flex = _compiled_flex(_static_shapes(q, k, v))
    if AuxRequest is None:
        return flex(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True
        )
    out, aux = flex(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=True,
        return_aux=AuxRequest(lse=True),
    )
    return out, aux.lse


@functools.cache
def _compiled_merge():
    # One fused kernel instead of a dozen elementwise passes over the bands' outputs.
    return torch.compile(_merge, dynamic=False)


def _merge(outs, lses):
    """Combine the bands' outputs by their log-sum-exp; rows no band can see stay zeros."""
    lse = torch.stack(lses)
    # A row empty in every band has lse = -inf everywhere; 0 there keeps softmax and its gradient finite.
    with torch.no_grad():
        empty = torch.isneginf(lse).all(dim=0)
    weights = torch.softmax(lse.masked_fill(empty, 0.0), dim=0)
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs, strict=True))
    return out.to(outs[0].dtype)


register(FlexBackend())

"""`flex`: torch FlexAttention, with the torus as a compiled `score_mod` and a block-sparse mask.

The bias and the causal/window rule come from `TorusGeometry.score_mod()` / `mask_mod()`.
Their scalars (lambda, period, window, q_offset) are handed to the compiled kernel as
0-dim tensors, not Python numbers: dynamo guards on captured Python numbers, so every
new lambda or decoding offset would otherwise cost a fresh compile (~5-20 s).

Block masks are cached per geometry, shape and device. A key padding mask changes every
batch, so it is not part of the cache: padded calls reuse the cached block layout with
every block marked partial, and a per-call mask_mod that also reads the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

from toroidal.geometry import TorusGeometry
from toroidal.kernels.base import Backend, BackendUnavailable, register

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError as exc:  # torch < 2.5
    flex_attention = None
    _IMPORT_ERROR = f"FlexAttention is not available in torch {torch.__version__} ({exc})"
else:
    _IMPORT_ERROR = None

_CACHE_SIZE = 8
_MIN_CUDA_WIDTH = 16  # the Triton kernel's tl.dot needs head dim >= 16


@functools.cache
def _compiled_flex():
    # FlexAttention is only fused under torch.compile; eager falls back to a slow reference.
    # Each mask/score structure (causal, window, padding, bias on/off, dtype) is one graph:
    # more than dynamo's default 8, and falling back to eager flex would be silently slow.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(flex_attention)


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
    )


def _everything(b, h, q_idx, kv_idx):
    return q_idx >= 0


def _all_partial(block_mask, mask_mod):
    """The same block layout with every non-empty block partial, so `mask_mod` runs on all of them."""
    dense = block_mask.to_dense().to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        dense.sum(dim=-1, dtype=torch.int32),
        order,
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
            return _cpu_reason(request.requires_grad)
        if request.device_type != "cuda":
            return f"flex here supports cuda and cpu, not {request.device_type}"
        if importlib.util.find_spec("triton") is None:
            return "flex on CUDA needs triton (it ships with the CUDA builds of torch)"
        return None

    def _plan(self, geometry, lq, lk, device):
        """(geometry with tensor scalars, its block mask), cached per geometry, shape and device."""
        key = (geometry, lq, lk, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        traced = _traced(geometry, device)
        blocks = create_block_mask(traced.mask_mod() or _everything, None, None, lq, lk, device=device)
        self._cache[key] = (traced, blocks)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return traced, blocks

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
        traced, block_mask = self._plan(geometry, q.shape[-2], k.shape[-2], q.device)
        if key_padding is not None:
            block_mask = self._with_padding(traced, block_mask, key_padding)
        score_mod = traced.score_mod() if geometry.lambda_distance != 0 else None
        width = q.shape[-1]
        if q.device.type == "cuda" and width < _MIN_CUDA_WIDTH:
            # Zero features change no dot product; the padded output columns are dropped.
            q, k, v = (F.pad(t, (0, _MIN_CUDA_WIDTH - width)) for t in (q, k, v))
        # Rows with nothing to attend come back as zeros (FlexAttention's documented behaviour).
        out = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        return out[..., :width], None


register(FlexBackend())

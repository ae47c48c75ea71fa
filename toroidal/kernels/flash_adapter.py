"""The two flash-attn calls `flash2` composes, behind one small interface, in two implementations.

An adapter has `forward(q, k, v, *, causal, window_size, alibi_slopes, softmax_scale) -> (out, lse)`
and `backward(dout, q, k, v, out, lse, *, same options) -> (dq, dk, dv)` with flash-attn 2's
documented semantics:

- layout (B, S, H, d): q (B, Sq, Hq, d), k and v (B, Sk, Hk, d) with Hq a multiple of Hk;
  query head h reads key head h // (Hq // Hk) (grouped queries);
- bottom-right alignment: query row r faces key column r + Sk - Sq (its "diagonal"); with
  t = r + Sk - Sq - c, `window_size=(left, right)` keeps -right <= t <= left, a negative size
  being unbounded; `causal` means right = 0;
- `alibi_slopes` (Hq,) or (B, Hq) float32 add -slope * |t| to every score (a negative slope
  is allowed: the bias then grows with |t|);
- lse: the natural log-sum-exp of each row's scores (scale included), float32 (B, Hq, Sq);
  a row with no allowed key has out = 0 and lse = +inf;
- `backward` recomputes P = exp(scores - lse) from the lse it is given, and D = rowsum(dout * out)
  from the out it is given: given a merged output and log-sum-exp, it returns this call's share
  of the gradients (as ring attention uses it).

`TorchFlashAdapter` is those semantics in plain PyTorch, on any device and dtype: `flash2`'s
composition is tested through it on the CPU in float32. `FlashAttnAdapter` calls flash-attn
itself (written against flash-attn 2.8.3's `flash_attn.flash_attn_interface`; 2.6.x, whose
private functions take `window_size` as one tuple, is handled too).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toroidal.runtime.install import install_command

_MIN_FLASH_VERSION = (2, 6)
_MAX_HEAD_DIM = 256


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalized_window(causal: bool, window_size, n_keys: int) -> tuple[int, int]:
    """(left, right) as flash-attn's C++ entry normalizes them: >= Sk or < 0 is unbounded (-1)."""
    left, right = window_size
    left = -1 if left < 0 or left >= n_keys else left
    right = -1 if right < 0 or right >= n_keys else right
    return left, (0 if causal else right)


def diagonal_offsets(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """t = r + Sk - Sq - c for every (row, column): (Sq, Sk) int64."""
    rows = torch.arange(n_queries, device=device)[:, None]
    cols = torch.arange(n_keys, device=device)[None, :]
    return rows + (n_keys - n_queries) - cols


def _slopes(alibi_slopes, batch: int, heads: int, dtype) -> torch.Tensor | None:
    """(B or 1, Hq, 1, 1) slopes in `dtype`, or None."""
    if alibi_slopes is None:
        return None
    slopes = alibi_slopes.to(dtype)
    slopes = slopes.reshape(1, heads) if slopes.dim() == 1 else slopes.reshape(batch, heads)
    return slopes[:, :, None, None]


class TorchFlashAdapter:
    """flash-attn 2's documented semantics (see the module docstring) in plain PyTorch, any device or dtype.

    Materializes (B, Hq, Sq, Sk) scores: for tests and small calls, not for speed.
    """

    name = "torch"

    def unavailable_reason(self, request) -> str | None:
        return None

    @staticmethod
    def _scores(q, k, causal, window_size, alibi_slopes, softmax_scale):
        batch, n_q, heads, _ = q.shape
        n_k, kv_heads = k.shape[1], k.shape[2]
        dtype = _accumulation_dtype(q.dtype)
        k_rep = k.to(dtype).repeat_interleave(heads // kv_heads, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k_rep) * softmax_scale
        t = diagonal_offsets(n_q, n_k, q.device)
        left, right = _normalized_window(causal, window_size, n_k)
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
        if left >= 0:
            allowed &= t <= left
        if right >= 0:
            allowed &= t >= -right
        slopes = _slopes(alibi_slopes, batch, heads, dtype)
        if slopes is not None:
            scores = scores - slopes * t.abs().to(dtype)
        return scores.masked_fill(~allowed, float("-inf")), dtype

    @staticmethod
    def _probabilities(scores, lse):
        # lse = +inf on empty rows: exp(-inf) = 0 there, as flash-attn's backward sees it.
        return torch.exp(scores - lse.to(scores.dtype)[..., None])

    def forward(self, q, k, v, *, causal=False, window_size=(-1, -1), alibi_slopes=None, softmax_scale):
        scores, dtype = self._scores(q, k, causal, window_size, alibi_slopes, softmax_scale)
        lse = torch.logsumexp(scores, dim=-1)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        probs = self._probabilities(scores, lse)
        v_rep = v.to(dtype).repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v_rep)
        return out.to(q.dtype), lse.to(_accumulation_dtype(q.dtype))

    def backward(
        self, dout, q, k, v, out, lse, *, causal=False, window_size=(-1, -1), alibi_slopes=None, softmax_scale
    ):
        scores, dtype = self._scores(q, k, causal, window_size, alibi_slopes, softmax_scale)
        probs = self._probabilities(scores, lse)
        groups = q.shape[2] // k.shape[2]
        k_rep, v_rep = (t.to(dtype).repeat_interleave(groups, dim=2) for t in (k, v))
        dout = dout.to(dtype)
        delta = (dout * out.to(dtype)).sum(-1).transpose(1, 2)  # (B, Hq, Sq)
        dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_rep)
        dscores = probs * (dprobs - delta[..., None])
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_rep) * softmax_scale
        dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(dtype)) * softmax_scale
        dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)

        def per_kv_head(x):
            b, n, _, d = x.shape
            return x.reshape(b, n, k.shape[2], groups, d).sum(3)

        return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


@dataclass(frozen=True)
class _FlashApi:
    forward: object
    backward: object
    split_window: bool  # >= 2.7: window_size_left, window_size_right; 2.6: window_size=(left, right)
    version: str


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@functools.cache
def _load_flash_api() -> _FlashApi | str:
    """flash-attn's private forward/backward functions, or why they cannot be had (one line)."""
    if importlib.util.find_spec("flash_attn") is None:
        return f"flash-attn is not installed ({install_command('gpu')})"
    try:
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as exc:  # installed but built for another torch / CUDA
        return f"flash-attn is installed but failed to import ({exc})"
    version = str(getattr(package, "__version__", "0"))
    if _version_tuple(version) < _MIN_FLASH_VERSION:
        return f"flash2 needs flash-attn >= 2.6 (found {version})"
    forward = getattr(interface, "_flash_attn_forward", None)
    backward = getattr(interface, "_flash_attn_backward", None)
    if forward is None or backward is None:
        return f"flash-attn {version} has no _flash_attn_forward/_flash_attn_backward"
    return _FlashApi(forward, backward, _version_tuple(version) >= (2, 7), version)


class FlashAttnAdapter:
    """flash-attn 2 itself (CUDA, fp16/bf16), through `flash_attn.flash_attn_interface`'s private calls.

    Two things it does so that callers see exactly the documented semantics:
    - pads the head dimension to a multiple of 8 (the CUDA entry points require it; zero
      features change no score) and cuts the outputs back;
    - in flash-attn's causal mode (left unbounded and right = 0 after its own normalization)
      the kernel adds ALiBi as `+slope * c` instead of `-slope * |t|`: the same softmax, but a
      log-sum-exp larger by slope * (r + Sk - Sq). `forward` subtracts that shift, `backward`
      adds it back before handing the lse to the kernel.
    """

    name = "flash-attn"

    @staticmethod
    def api() -> _FlashApi | str:
        return _load_flash_api()

    def unavailable_reason(self, request) -> str | None:
        if request.device_type != "cuda":
            return f"flash2 needs a CUDA GPU (got {request.device_type})"
        api = self.api()
        if isinstance(api, str):
            return api
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"flash-attn 2 needs an Ampere or newer GPU (sm80+), found sm{major}{minor}"
        if request.dtype not in (torch.float16, torch.bfloat16):
            return f"flash2 needs fp16/bf16 (got {str(request.dtype).removeprefix('torch.')})"
        return None

    @staticmethod
    def head_dim_reason(width: int) -> str | None:
        if width > _MAX_HEAD_DIM:
            return f"flash-attn takes head dims up to {_MAX_HEAD_DIM}; the platter width here is {width}"
        return None

    @staticmethod
    def _pad(*tensors):
        width = tensors[0].shape[-1]
        extra = -width % 8
        if extra == 0:
            return tensors
        return tuple(F.pad(t, (0, extra)) for t in tensors)

    @staticmethod
    def _causal_shift(causal, window_size, alibi_slopes, n_q, n_k, device):
        """What the kernel's causal ALiBi adds to each row's lse: slope * (r + Sk - Sq), or None."""
        if alibi_slopes is None:
            return None
        left, right = _normalized_window(causal, window_size, n_k)
        if not (left < 0 and right == 0):
            return None
        rows = torch.arange(n_q, device=device, dtype=torch.float32) + (n_k - n_q)
        slopes = alibi_slopes.float()
        return (slopes[..., None] * rows).unsqueeze(0) if slopes.dim() == 1 else slopes[..., None] * rows

    def _window_args(self, api, window_size) -> dict:
        left, right = window_size
        if api.split_window:
            return {"window_size_left": left, "window_size_right": right}
        return {"window_size": (left, right)}

    def forward(self, q, k, v, *, causal=False, window_size=(-1, -1), alibi_slopes=None, softmax_scale):
        api = self.api()
        width = q.shape[-1]
        qp, kp, vp = self._pad(q, k, v)
        result = api.forward(
            qp, kp, vp, 0.0, softmax_scale, causal=causal, **self._window_args(api, window_size),
            softcap=0.0, alibi_slopes=alibi_slopes, return_softmax=False,
        )  # fmt: skip
        # >= 2.7: (out, lse, S_dmask, rng_state); 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        out, lse = (result[0], result[1]) if len(result) == 4 else (result[4], result[5])
        shift = self._causal_shift(causal, window_size, alibi_slopes, q.shape[1], k.shape[1], q.device)
        if shift is not None:
            lse = lse - shift  # +inf stays +inf
        return out[..., :width], lse

    def backward(
        self, dout, q, k, v, out, lse, *, causal=False, window_size=(-1, -1), alibi_slopes=None, softmax_scale
    ):
        api = self.api()
        width = q.shape[-1]
        shift = self._causal_shift(causal, window_size, alibi_slopes, q.shape[1], k.shape[1], q.device)
        if shift is not None:
            lse = lse + shift
        qp, kp, vp, outp, doutp = self._pad(q, k, v, out.to(q.dtype), dout.to(q.dtype))
        qp, kp, vp, outp, doutp = (t.contiguous() for t in (qp, kp, vp, outp, doutp))
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        api.backward(
            doutp, qp, kp, vp, outp, lse.float().contiguous(), dq, dk, dv, 0.0, softmax_scale,
            causal=causal, **self._window_args(api, window_size), softcap=0.0, alibi_slopes=alibi_slopes,
            deterministic=False, rng_state=None,
        )  # fmt: skip
        return dq[..., :width], dk[..., :width], dv[..., :width]

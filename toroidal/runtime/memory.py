"""Peak-memory estimates, so that a run too big for the device is refused before it starts.

The operating system's answer to a run that does not fit is to kill it, often minutes in and
with nothing saved. These estimates are deliberately simple formulas over the shapes of a run
(model width and depth, batch, sequence length, platters, backend, dtype), in bytes; the
tests hold them within a factor of 2 of measured peaks on small but real configurations.

- `attention_call`: one `toroidal_attention` call (a bench row; the core of a profile);
- `model_training` / `model_inference`: a host language model with toroidal layers;
- `available_bytes`: what the device has free now (`TOROIDAL_MEMORY_LIMIT_GB` overrides it);
- `nearest_fit`: the largest configuration that fits, halving the batch first, then the
  sequence length.

Shapes follow the design notes: B, H, N, e, D, and L = N*D platter-tokens of width w = e/D.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

MIB, GIB = 2**20, 2**30
LIMIT_VARIABLE = "TOROIDAL_MEMORY_LIMIT_GB"
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
# What a fresh computation touches besides its tensors: kernel code pages, thread pools, allocator
# slack. Measured as the peak-RSS growth of tiny bench rows on CPU (30-40 MiB).
RUNTIME_BYTES = 32 * MIB
BLOCKWISE_TILE = 256  # toroidal.kernels.blockwise.DEFAULT_TILE (not imported: bench workers stay lean)

# Floats kept per token and layer for backward by a host layer (norms, projections, rotary, MLP):
# about 12 per hidden unit and 3 per MLP unit in Llama-style layers (autograd's saved tensors,
# counted on tiny and small presets); a toroidal layer adds its platter copies and depth fusion.
SAVED_PER_HIDDEN, SAVED_PER_MLP, TOROIDAL_SAVED_PER_HIDDEN = 12, 3, 3.5
# Live while one layer runs without autograd: the MLP's intermediates and the residual stream.
LIVE_PER_HIDDEN, LIVE_PER_MLP = 6, 4
# Logits, log-softmax and their gradient per token and vocabulary entry (training; 3 in inference).
LOGITS_TRAINING, LOGITS_INFERENCE = 4, 3
# Backward of one layer and the optimizer's temporaries, as a share of what is saved.
BACKWARD_SHARE = 0.25
MIXED_PRECISION_SHARE = 0.6  # activations under bf16/fp16 autocast, relative to fp32


@dataclass(frozen=True)
class Estimate:
    """Estimated peak bytes, by part (parameters, activations, attention, ...)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'1.2 GiB (activations 800 MiB, attention 300 MiB, ...)', the largest parts first."""
        parts = sorted(((v, k) for k, v in self.parts.items() if v >= MIB), reverse=True)
        detail = ", ".join(f"{name} {format_bytes(value)}" for value, name in parts)
        return format_bytes(self.total) + (f" ({detail})" if detail else "")

    def to_dict(self) -> dict:
        return {"total_bytes": self.total, "parts_bytes": dict(self.parts)}


def format_bytes(count: float) -> str:
    if count >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / MIB:.0f} MiB"


# --- one attention call --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    """One `toroidal_attention` call: (B, H, N, e) queries, D platters, dtype, with or without backward."""

    batch: int
    heads: int
    seq_len: int
    depth: int
    head_dim: int
    dtype: str = "fp32"
    training: bool = False

    @property
    def platter_tokens(self) -> int:
        return self.seq_len * self.depth

    @property
    def pairs(self) -> int:
        return self.platter_tokens**2

    @property
    def tensor_bytes(self) -> int:
        """One (B, H, N, e) tensor such as q."""
        return self.batch * self.heads * self.seq_len * self.head_dim * ITEMSIZE[self.dtype]


def materialized_bytes(backend: str, shape: AttentionShape) -> int:
    """Rough peak bytes of the (L x L) tensors a backend materializes; 0 for the tiled kernels.

    reference: about four (B, H, L, L) float32 tensors live at once (scores, masked
    scores, exp, weights; more kept for backward), plus the (L, L) bias. sdpa: the cached
    (L, L) additive mask plus the int64 index grids and float32 bias it is built from.
    """
    if backend == "reference":
        live = 6 if shape.training else 4
        return shape.batch * shape.heads * shape.pairs * 4 * live + shape.pairs * 21
    if backend == "sdpa":
        return shape.pairs * (ITEMSIZE[shape.dtype] + 1 + 4 + 16)
    return 0


def workspace_bytes(backend: str, shape: AttentionShape) -> int:
    """Transient bytes of one call beyond its inputs, output and gradients."""
    materialized = materialized_bytes(backend, shape)
    if materialized:
        return materialized
    backward = 2 if shape.training else 1
    if backend == "blockwise":  # a few float32 (tile x tile) score tiles per (batch, head)
        tile = min(BLOCKWISE_TILE, shape.platter_tokens)
        return shape.batch * shape.heads * tile * tile * 4 * 6 * backward
    if backend == "decomposed":  # augmented copies, pieces' outputs
        return shape.tensor_bytes * 20 * backward
    if backend == "native" and shape.training:  # width-padded copies, dq shares, dk, dv
        return shape.tensor_bytes * 8
    return shape.tensor_bytes * 2 * backward  # native, flex, flash2: outputs and log-sum-exp in float32


def saved_attention_bytes(backend: str, shape: AttentionShape) -> int:
    """Bytes of one training call kept until backward (reference keeps three (B, H, L, L) tensors)."""
    if backend == "reference" and shape.training:
        return 3 * shape.batch * shape.heads * shape.pairs * 4
    return 0


def attention_call(backend: str, shape: AttentionShape) -> Estimate:
    """A bench row: q, k, v and the output (with their gradients in training), and the kernel's workspace."""
    tensors = 4 * shape.tensor_bytes * (2 if shape.training else 1)
    return Estimate(
        {"inputs": tensors, "attention": workspace_bytes(backend, shape), "runtime": RUNTIME_BYTES}
    )


def attention_module(backend: str, shape: AttentionShape, d_model: int) -> Estimate:
    """One ToroidalAttention module (a profile): the call plus projections, rotary and fusion."""
    call = attention_call(backend, shape)
    per_activation = shape.batch * shape.seq_len * d_model * ITEMSIZE[shape.dtype]
    training = 2 if shape.training else 1
    parts = dict(call.parts)
    parts["activations"] = per_activation * 8 * training
    parts["parameters"] = 4 * d_model * d_model * ITEMSIZE[shape.dtype] * training
    return Estimate(parts)


# --- a language model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a host model (read from its config, never from its weights)."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int
    parameters: int


@dataclass(frozen=True)
class ToroidalLayers:
    """The toroidal attention of a model: how many layers, their platters and chosen backend."""

    count: int
    depth: int
    backend: str


def _attention_shape(model: ModelShape, toroidal: ToroidalLayers, batch: int, seq_len: int, training: bool):
    return AttentionShape(batch, model.heads, seq_len, toroidal.depth, model.head_dim, "fp32", training)


def model_training(
    model: ModelShape,
    *,
    batch: int,
    seq_len: int,
    toroidal: ToroidalLayers | None,
    trainable: int | None = None,
    mixed_precision: bool = False,
    grad_checkpointing: bool = False,
) -> Estimate:
    """One AdamW step on a (batch, seq_len) micro-batch: weights, gradients, optimizer state, activations."""
    trainable = model.parameters if trainable is None else trainable
    tokens = batch * seq_len
    per_layer = SAVED_PER_HIDDEN * model.hidden + SAVED_PER_MLP * model.intermediate
    if grad_checkpointing:  # layer inputs, and one layer's activations while it is recomputed
        saved = tokens * (model.layers * model.hidden + per_layer) * 4
    else:
        saved = tokens * model.layers * per_layer * 4
    if toroidal is not None and not grad_checkpointing:
        saved += tokens * toroidal.count * TOROIDAL_SAVED_PER_HIDDEN * model.hidden * 4
    if mixed_precision:
        saved = int(saved * MIXED_PRECISION_SHARE)
    parts = {
        "parameters": model.parameters * 4,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,
        "activations": int(saved),
        "logits": tokens * model.vocab * LOGITS_TRAINING * 4,
        "runtime": RUNTIME_BYTES,
    }
    attention = 0
    if toroidal is not None and toroidal.count:
        shape = _attention_shape(model, toroidal, batch, seq_len, training=True)
        kept = 1 if grad_checkpointing else toroidal.count
        attention = kept * saved_attention_bytes(toroidal.backend, shape)
        attention += workspace_bytes(
            toroidal.backend, _attention_shape(model, toroidal, batch, seq_len, False)
        )
    parts["attention"] = attention
    parts["backward"] = int(BACKWARD_SHARE * (parts["activations"] + attention) + trainable * 4)
    return Estimate(parts)


def model_inference(
    model: ModelShape,
    *,
    batch: int,
    seq_len: int,
    toroidal: ToroidalLayers | None,
    mixed_precision: bool = False,
) -> Estimate:
    """A forward pass without autograd (evaluation): weights, one layer's live tensors, logits."""
    tokens = batch * seq_len
    live = tokens * (LIVE_PER_HIDDEN * model.hidden + LIVE_PER_MLP * model.intermediate) * 4
    if mixed_precision:
        live = int(live * MIXED_PRECISION_SHARE)
    attention = 0
    if toroidal is not None and toroidal.count:
        attention = workspace_bytes(
            toroidal.backend, _attention_shape(model, toroidal, batch, seq_len, training=False)
        )
    return Estimate(
        {
            "parameters": model.parameters * 4,
            "activations": live,
            "logits": tokens * model.vocab * LOGITS_INFERENCE * 4,
            "attention": attention,
            "runtime": RUNTIME_BYTES,
        }
    )


# --- what the device has, and what fits ---------------------------------------------------------------


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), which /proc/meminfo does not show."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit_file:
            limit = limit_file.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as current_file:
            return max(0, int(limit) - int(current_file.read().strip()))
    except (OSError, ValueError):
        return None


def limit_override() -> int | None:
    """`TOROIDAL_MEMORY_LIMIT_GB` in bytes (GiB, fractions allowed), or None when unset."""
    text = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{LIMIT_VARIABLE}={text!r} is not a number of GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{LIMIT_VARIABLE}={text!r} must be a positive number of GiB")
    return int(value * GIB)


def available_bytes(device) -> int | None:
    """Bytes free for a run on `device` now (None when unknown): the override, CUDA's free memory, or
    the smaller of MemAvailable and the cgroup's remaining limit on CPU."""
    override = limit_override()
    if override is not None:
        return override
    import torch  # here, not at import: the bench workers import this module before torch is warm

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    known = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(known) if known else None


def over_available(estimate: Estimate, device) -> str | None:
    """Why `estimate` cannot run on `device` ('estimated peak ... exceeds ...'), or None when it fits."""
    available = available_bytes(device)
    if available is None or estimate.total <= available:
        return None
    return exceeds(estimate, available, device)


def exceeds(estimate: Estimate, available: int, device) -> str:
    return (
        f"estimated peak memory {format_bytes(estimate.total)} exceeds "
        f"the {format_bytes(available)} available on {device}"
    )


def nearest_fit(
    estimate: Callable[[int, int], Estimate], batch: int, seq_len: int, available: int, min_seq_len: int = 16
) -> tuple[int, int, Estimate] | None:
    """The first (batch, seq_len) that fits in `available` bytes, halving the batch to 1, then seq_len."""
    while True:
        if batch > 1:
            batch = max(1, batch // 2)
        elif seq_len > min_seq_len:
            seq_len = max(min_seq_len, seq_len // 2)
        else:
            return None
        candidate = estimate(batch, seq_len)
        if candidate.total <= available:
            return batch, seq_len, candidate


@dataclass(frozen=True)
class Footprint:
    """The estimate of a run, the device it runs on, and the same estimate at another batch and length."""

    estimate: Estimate
    device: object  # a torch.device
    batch: int
    seq_len: int
    at: Callable[[int, int], Estimate]  # the same estimate at another (batch, seq_len), for nearest_fit

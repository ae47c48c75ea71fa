"""Streaming inside transformers models: every toroidal layer keeps a `LatentKV` instead of keys.

    with streaming_layers(model, latent_size=64, update="linear"):
        logits = stream_logits(model, ids)  # (B, T, vocab), the model fed one token at a time

The attacher's attention function runs a layer's stream (`STREAM_ATTR`) instead of its kernel:
`latent_attention_step` with the layer's torus, platter order, causal period and depth fusion.
Every attention layer must be toroidal (a standard layer would need the KV cache streaming
replaces). The update parameters are created here, untrained: `linear` starts as the running
mean of each slot, `gru` at random; `toroidal eval --streaming` measures what that costs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toroidal.integrations.transformers.attach import STREAM_ATTR, LayerState, layer_state
from toroidal.integrations.transformers.host import attention_modules
from toroidal.integrations.transformers.toroidal import toroidal_layers
from toroidal.streaming import LatentKV, LatentUpdate, latent_attention_step

__all__ = ["STREAM_ATTR", "check_streamable", "reset_streams", "stream_logits", "streaming_layers"]


@dataclass
class LayerStream:
    """The streaming state of one toroidal layer of a host model (a plain attribute, not a submodule)."""

    update: LatentUpdate
    latent_size: int
    state: LatentKV | None = None

    def step(self, module: nn.Module, layer: LayerState, query, key, value, scaling):
        """The attention interface's call for one token: (output (B, 1, H, e), no weights)."""
        cfg = layer.kernel.config
        if query.shape[2] != 1:
            raise ValueError(
                f"toroidal layer {layer.layer} is streaming: one token per call, got {query.shape[2]}"
            )
        query, key = layer.permute(query, key)
        if self.state is None:
            b, kv_heads, _, e = key.shape
            self.state = LatentKV.empty(b, kv_heads, self.latent_size, e, key.device, key.dtype)
        out, self.state = latent_attention_step(
            query,
            key,
            value,
            self.state,
            self.update,
            depth=cfg.depth,
            lambda_distance=cfg.lambda_distance,
            period=cfg.period_for(0, causal=True),
            window=cfg.window,
            scale=scaling,
        )
        out = layer.kernel.fusion(out)
        if layer.plug.dropout:
            out = F.dropout(out, layer.plug.dropout, training=module.training)
        return out.transpose(1, 2).contiguous(), None


def check_streamable(model: nn.Module) -> None:
    """Raise ValueError unless every attention layer of `model` runs toroidal attention."""
    plain = sorted(set(attention_modules(model)) - set(toroidal_layers(model)))
    if plain:
        raise ValueError(
            f"streaming needs toroidal attention in every layer; layer(s) {', '.join(map(str, plain))} "
            "are not toroidal and would need the KV cache that streaming replaces"
        )


def _kv_heads(model: nn.Module, heads: int) -> int:
    return getattr(model.config, "num_key_value_heads", None) or heads


@contextlib.contextmanager
def streaming_layers(model: nn.Module, latent_size: int = 64, update: str = "linear"):
    """Give every toroidal layer of `model` a streaming state (fresh update parameters) while inside."""
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(f"latent_size={latent_size!r} must be a positive integer")
    check_streamable(model)
    modules = attention_modules(model).values()
    for module in modules:
        layer = layer_state(module)
        depth = layer.kernel.config.depth
        rule = LatentUpdate(update, _kv_heads(model, layer.heads), depth, layer.head_dim // depth)
        reference = next(module.parameters())
        rule = rule.to(device=reference.device, dtype=reference.dtype)
        setattr(module, STREAM_ATTR, LayerStream(rule, latent_size))
    try:
        yield model
    finally:
        for module in modules:
            delattr(module, STREAM_ATTR)


def reset_streams(model: nn.Module) -> None:
    """Forget every layer's state: the next token is position 0 of new sequences."""
    for module in attention_modules(model).values():
        getattr(module, STREAM_ATTR).state = None


def stream_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of ids (B, T), one token per call from fresh states (in `streaming_layers`)."""
    reset_streams(model)
    batch, length = ids.shape
    logits = []
    for t in range(length):
        position = torch.full((batch, 1), t, dtype=torch.long, device=ids.device)
        out = model(input_ids=ids[:, t : t + 1], position_ids=position, use_cache=False)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)

"""Toroidal attention in a Hugging Face model ("kernel mode"): the `toroidal` kernel through the attacher.

    apply_toroidal(model, ToroidalConfig(depth=2, lambda_distance=0.1, rope="none"), layers=[0, 1])
    remove_toroidal(model)  # back to the model's own attention, fusion parameters removed

The host keeps its projections, rotary encoding and KV cache; the chosen layers run
`ToroidalKernel` (torus bias, window, platters, depth fusion) as `toroidal+<host's>`. Of the
config it uses the `TORUS_OPTIONS` and dropout (on the fused output, in training); `rope` must be
'none'; shapes, causality and the scale are the host's. Causal layers ring with a fixed period
(`period_for`), so prefill, decoding and recomputation agree. Fusion parameters are registered
as `toroidal_fusion` on each chosen module: they train and `save_pretrained` saves them;
`from_pretrained` drops them, so rebuild with `apply_toroidal` and call `load_toroidal_weights`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from toroidal.config import TORUS_OPTIONS, ToroidalConfig
from toroidal.integrations.transformers.attach import (
    Plug,
    attach,
    attached,
    attached_name,
    detach,
    load_attached_weights,
)
from toroidal.mechanisms import build_kernel

TOROIDAL = "toroidal"  # the mechanism's name, and the prefix of the implementation (`toroidal+sdpa`)
FUSION_ATTR = "toroidal_fusion"  # the depth fusion of each chosen attention module (saved weight names)


def toroidal_plug(config: ToroidalConfig) -> Plug:
    """The `toroidal` kernel with `config`'s torus, its fusion saved as `toroidal_fusion`."""
    options = {name: getattr(config, name) for name in TORUS_OPTIONS}
    return Plug(
        TOROIDAL,
        functools.partial(build_kernel, TOROIDAL, **options),
        depth=config.depth,
        weights_attr=FUSION_ATTR,
        part="fusion",
        dropout=config.dropout,
    )


def is_toroidal(model: nn.Module) -> bool:
    """Whether `apply_toroidal` is in effect on `model`."""
    return attached_name(model) == TOROIDAL


def toroidal_layers(model: nn.Module) -> list[int]:
    """Indices of the layers running toroidal attention."""
    return [layer for layer, state in attached(model).items() if state.name == TOROIDAL]


def apply_toroidal(model: nn.Module, config: ToroidalConfig, layers=None) -> nn.Module:
    """Run toroidal attention in `layers` (default: all) of a transformers model; returns the model.

    The model must be running 'sdpa' or 'eager' attention; the other layers keep it.
    Raises ValueError for a config or layer choice that cannot work with this model.
    """
    if not isinstance(config, ToroidalConfig):
        raise TypeError(f"config must be a ToroidalConfig, got {type(config).__name__}")
    if config.rope != "none":
        raise ValueError(
            f"ToroidalConfig.rope={config.rope!r}: in a transformers model the host keeps its own rotary "
            "encoding; use rope='none'"
        )
    if config.approximation is not None:
        raise ValueError(
            f"ToroidalConfig.approximation={config.approximation!r} applies to ToroidalAttention only; "
            "in a transformers model use apply_mechanism(model, 'fft')"
        )
    if is_toroidal(model):
        raise ValueError("toroidal attention is already applied to this model; call remove_toroidal first")
    return attach(model, toroidal_plug(config), layers, "apply_toroidal")


def remove_toroidal(model: nn.Module) -> nn.Module:
    """Undo `apply_toroidal`: the previous attention implementation, no fusion modules."""
    if not is_toroidal(model):
        raise ValueError("toroidal attention is not applied to this model")
    return detach(model)


def load_toroidal_weights(model: nn.Module, source) -> None:
    """Load the fusion parameters of a toroidal model saved with `save_pretrained`.

    `source`: a save directory, a .safetensors file or a state dict. Every fusion
    parameter of `model` must be found; extra fusion parameters are an error too.
    """
    fix = "apply_toroidal with the config and layers the model was saved with"
    load_attached_weights(model, source, FUSION_ATTR, "fusion", fix)


@contextmanager
def capture_attention(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Within the block, toroidal layer `layer` runs the reference backend and appends the weights of
    every call, (B, H, N_q*D, N_k*D) platter-token weights, to the yielded list."""
    state = attached(model).get(layer)
    if state is None or state.name != TOROIDAL:
        raise ValueError(f"layer {layer} is not a toroidal layer; toroidal layers: {toroidal_layers(model)}")
    state.kernel.captured = captured = []
    try:
        yield captured
    finally:
        state.kernel.captured = None

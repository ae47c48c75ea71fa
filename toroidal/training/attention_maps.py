"""Attention weights to draw: one head of a seeded random layer, of a trained run's toroidal layer, or of
toroidal attention put into one layer of a pretrained model (untrained: what the torus does to its
learned queries and keys)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from toroidal.attention import ToroidalAttention
from toroidal.config import ToroidalConfig
from toroidal.integrations.transformers import capture_attention
from toroidal.training.models import (
    add_toroidal,
    build_model,
    check_layers,
    make_toroidal_config,
    source_and_tokenizer,
)
from toroidal.training.runs import load_run


def attention_weights(
    seq_len: int,
    depth: int,
    *,
    lambda_distance: float = 0.1,
    window: int | None = None,
    causal: bool = False,
    period: int | None = None,
    head: int = 0,
    heads: int = 2,
    platter_width: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Attention weights (N*D, N*D) of one head of a seeded random `ToroidalAttention` (reference backend).

    The period defaults to N (the seam joins the last position to the first).
    Raises ValueError for an impossible configuration.
    """
    if not 0 <= head < heads:
        raise ValueError(f"head {head} is not one of the {heads} heads (0..{heads - 1})")
    d_model = heads * depth * platter_width
    config = ToroidalConfig(
        d_model=d_model,
        n_heads=heads,
        depth=depth,
        lambda_distance=lambda_distance,
        window=window,
        causal=causal,
        period=period if period is not None else seq_len,
        max_len=seq_len,
        backend="reference",
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = ToroidalAttention(config).eval()
    x = torch.randn(1, seq_len, d_model, generator=generator)
    with torch.no_grad():
        _, weights = module(x, return_attention=True)
    return weights[0, head].float()


@dataclass
class TrainedAttention:
    """One head's weights for a text through a trained run, and what to label the picture with."""

    weights: torch.Tensor  # (N*D, N*D) platter-token weights, float32
    depth: int
    period: int  # the ring period the layer used
    tokens: list[str]  # the text's tokens, decoded one by one
    layer: int
    layers: list[int]  # every toroidal layer of the run


def trained_attention_weights(
    run_dir: str | os.PathLike, text: str, *, layer: int | None = None, head: int = 0, max_tokens: int
) -> TrainedAttention:
    """Weights of one head of a trained run's toroidal layer (the first one by default) for `text`.

    The model runs the reference backend on that layer so the weights are materialized;
    the other layers run as trained. Raises ValueError for a text, layer or head that does
    not fit, and `CheckpointError` for a run folder that cannot be loaded.
    """
    run = load_run(run_dir)
    if run.toroidal is None:
        raise ValueError(f"{run_dir} is a {run.config.attention} run: it has no toroidal layer to draw")
    layers = sorted(run.layers)
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a toroidal layer of {run_dir}; its toroidal layers: {layers}")
    return _weights(run.model, run.tokenizer, run.toroidal, text, layer, layers, head, max_tokens)


def model_attention_weights(
    model: str,
    text: str,
    *,
    layer: int = 0,
    head: int = 0,
    torus: dict,
    max_tokens: int,
    tokenizer: str = "auto",
) -> TrainedAttention:
    """Weights of one head of toroidal attention put into `layer` of `model` (a preset, model folder,
    GGUF file or hub name), untrained, for `text`. `torus`: depth, lambda_distance, window, period.

    Raises ValueError for a text, layer or head that does not fit, `SetupError` for a model that
    cannot be loaded.
    """
    source, tokens = source_and_tokenizer(model, tokenizer)
    host = build_model(source, tokens, None, 0)
    (layer,) = check_layers(host, [layer])
    n = tokens.encode(text).numel()
    config = make_toroidal_config({"fusion": "low_rank", "backend": "auto", **torus}, max(n, 1))
    add_toroidal(host, config, [layer])
    return _weights(host.eval(), tokens, config, text, layer, [layer], head, max_tokens)


def _weights(
    model, tokenizer, config: ToroidalConfig, text, layer, layers, head, max_tokens
) -> TrainedAttention:
    ids = tokenizer.encode(text).reshape(-1)
    depth = config.depth
    if ids.numel() == 0:
        raise ValueError("the text has no tokens")
    if ids.numel() * depth > max_tokens:
        raise ValueError(
            f"the text has {ids.numel()} tokens, {ids.numel() * depth} platter tokens at D={depth}: "
            f"more than the {max_tokens} a heat map can show"
        )
    heads = model.config.num_attention_heads
    if not 0 <= head < heads:
        raise ValueError(f"head {head} is not one of the {heads} heads (0..{heads - 1})")
    with torch.no_grad(), capture_attention(model, layer) as captured:
        model(input_ids=ids[None])
    tokens = [tokenizer.decode([int(token)]) for token in ids]
    # Causal language models ring with a fixed period (see integrations.transformers).
    period = config.period_for(ids.numel(), causal=True)
    return TrainedAttention(captured[0][0, head].float(), depth, period, tokens, layer, layers)

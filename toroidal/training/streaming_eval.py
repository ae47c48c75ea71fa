"""`toroidal eval --streaming`: the same metrics with the model fed one token at a time on `LatentKV` states.

Every toroidal layer keeps a constant-size latent state instead of attending to all
earlier keys (`toroidal.integrations.transformers.streaming`); the samples, targets and metric
definitions are those of the normal evaluation, so the two sets of numbers compare
directly. The update parameters are fresh (seeded by the evaluation seed), not trained.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from toroidal.integrations.transformers.streaming import check_streamable, stream_logits, streaming_layers
from toroidal.streaming import UPDATES
from toroidal.training.errors import SetupError
from toroidal.training.metric_names import STREAMING_METRICS
from toroidal.training.metrics import evaluate_lm


class StreamingLM(nn.Module):
    """A host model seen through `stream_logits`: what `evaluate_lm` calls gets streaming logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        return SimpleNamespace(logits=stream_logits(self.model, input_ids))


def check_streaming_options(latent_size: int, update: str) -> None:
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise SetupError(f"--latent-size {latent_size}: must be >= 1")
    if update not in UPDATES:
        raise SetupError(f"--update {update}: must be one of {', '.join(UPDATES)}")


def check_streaming_model(model: nn.Module) -> None:
    """SetupError unless every attention layer is toroidal (checked before any evaluation runs)."""
    try:
        check_streamable(model)
    except ValueError as error:
        raise SetupError(
            str(error), "evaluate a model with toroidal attention in all layers, or drop --streaming"
        ) from None


def streaming_metrics(
    model: nn.Module, dataset, *, latent_size: int, update: str, seed: int, progress=None, **evaluate_options
) -> dict:
    """`streaming_<metric>` for STREAMING_METRICS; `evaluate_options` go to `evaluate_lm`."""
    with torch.random.fork_rng(devices=[]):  # update parameters from the seed; the caller's RNG is kept
        torch.manual_seed(seed)
        with streaming_layers(model, latent_size, update):
            measured = evaluate_lm(StreamingLM(model), dataset, progress=progress, **evaluate_options)
    return {f"streaming_{name}": measured[name] for name in STREAMING_METRICS if name in measured}

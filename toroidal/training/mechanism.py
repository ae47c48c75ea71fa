"""The attention mechanism of a run or evaluation: its name, its options, the layers it runs in.

`mechanism` names a registered mechanism (`toroidal.mechanisms`). `attention` is its old
name from before mechanisms existed (`toroidal` or `baseline`, baseline meaning `standard`):
saved runs and configs that only have it keep working, and after resolution both fields
agree (`attention` is `baseline` for standard, else the mechanism's name).

Options. `toroidal` takes the torus flags (depth, lambda, period, window, fusion, backend)
as before. Every other mechanism gets those of the torus flags it accepts, `max_len` (the
ring length of causal models: the training sequence length) when it accepts it, and then
its own options (`--mechanism-option NAME=VALUE`), which win.
"""

from __future__ import annotations

from torch import nn

from toroidal.integrations.transformers import (
    apply_mechanism,
    mechanism_layers,
    mechanism_metrics,
    reset_mechanism_metrics,
    summarize_metrics,
)
from toroidal.mechanisms import get_mechanism, mechanism_names
from toroidal.training.errors import SetupError

DEFAULT_MECHANISM = "toroidal"
OLD_NAMES = {"toroidal": "toroidal", "baseline": "standard"}  # --attention value -> mechanism


def attention_label(mechanism: str) -> str:
    """The `attention` field of a resolved config: baseline for standard, else the mechanism."""
    return "baseline" if mechanism == "standard" else mechanism


def resolve_mechanism(attention: str | None, mechanism: str | None, default: str = DEFAULT_MECHANISM) -> str:
    """The mechanism a config asks for through `mechanism` or its old name `attention`."""
    if mechanism is not None and mechanism not in mechanism_names():
        raise SetupError(
            f"--mechanism {mechanism}: not a registered mechanism", f"choose {', '.join(mechanism_names())}"
        )
    if attention is None:
        return mechanism if mechanism is not None else default
    from_attention = OLD_NAMES.get(attention)
    if from_attention is None and attention in mechanism_names():
        from_attention = attention  # a resolved config written back: attention holds the name
    if from_attention is None:
        raise SetupError(f"--attention {attention}: must be one of {', '.join(OLD_NAMES)}")
    if mechanism is not None and mechanism != from_attention:
        raise SetupError(
            f"--attention {attention} and --mechanism {mechanism} disagree",
            "drop --attention: it is the old name of --mechanism (baseline = standard)",
        )
    return from_attention


def check_mechanism_options(mechanism: str, options: dict) -> None:
    """Refuse options the mechanism does not take (toroidal takes its options as flags)."""
    if not options:
        return
    if mechanism == "toroidal":
        raise SetupError(
            f"--mechanism-option {next(iter(options))}: toroidal takes its options as flags",
            "use --depth, --lambda, --period, --window, --fusion, --fusion-rank and --backend",
        )
    accepted = get_mechanism(mechanism).accepts
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SetupError(
            f"--mechanism-option {unknown[0]}: mechanism {mechanism!r} takes "
            f"{', '.join(accepted) if accepted else 'no options'}",
            "drop it or pick another mechanism",
        )


def kernel_options(mechanism: str, torus: dict, options: dict, seq_len: int) -> dict:
    """The options a non-toroidal mechanism is built with (see the module doc)."""
    accepted = get_mechanism(mechanism).accepts
    built = {key: value for key, value in torus.items() if key in accepted}
    if "max_len" in accepted:
        built["max_len"] = seq_len
    return {**built, **options}


def add_mechanism(model: nn.Module, mechanism: str, options: dict, layers: list[int] | None) -> list[int]:
    """Mechanism `mechanism` (not toroidal, not standard) in `layers` (None: all); returns its layers."""
    try:
        apply_mechanism(model, mechanism, options, layers)
    except (ValueError, TypeError) as error:
        raise SetupError(f"mechanism {mechanism!r}: {error}", "change its options or --layers") from None
    return mechanism_layers(model)


def mechanism_record(model: nn.Module, mechanism: str, options: dict | None, layers: list[int]) -> dict:
    """What a result states about the mechanism: name, options, layers and its kernels' metrics."""
    per_layer = mechanism_metrics(model)
    return {
        "name": mechanism,
        "options": options,
        "layers": layers,
        "metrics": {str(layer): metrics for layer, metrics in per_layer.items()},
        "metrics_mean": summarize_metrics(per_layer),
    }


__all__ = [
    "add_mechanism",
    "attention_label",
    "check_mechanism_options",
    "kernel_options",
    "mechanism_record",
    "reset_mechanism_metrics",
    "resolve_mechanism",
]

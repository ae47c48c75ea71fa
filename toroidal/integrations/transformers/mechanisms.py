"""Any registered mechanism inside a Hugging Face transformers model.

    apply_mechanism(model, "tiled", {"tile": 64}, layers=[1])   # the mechanism's own options
    apply_mechanism(model, "toroidal", {"depth": 2})            # a ToroidalConfig or a dict
    mechanism_metrics(model)                                    # {layer: kernel.get_metrics()}
    remove_mechanism(model)                                     # the host's own attention again
    length_refusal(model, 4096)                                 # why it cannot score 4096 tokens, or None

Every mechanism plugs its kernel module in through the one attacher (`attach.py`), registered
as `<name>+<host's>` (e.g. `tiled+sdpa`); `toroidal` is `apply_toroidal`, `standard` is the
host's own attention (applying it removes whatever runs). A plugged kernel is registered as
`mechanism_kernel` on its attention module: its parameters train, `save_pretrained` saves them
and `load_mechanism_weights` restores them after `apply_mechanism` with the same arguments.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import fields

import torch
from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.geometry import TorusGeometry
from toroidal.integrations.transformers.attach import (
    KERNEL_ATTR,
    LayerState,
    Plug,
    attach,
    attached,
    attached_name,
    detach,
    load_attached_weights,
)
from toroidal.integrations.transformers.host import (
    attention_modules,
    chosen_layers,
    host_window,
    learned_positions,
    max_positions,
)
from toroidal.integrations.transformers.toroidal import (
    TOROIDAL,
    apply_toroidal,
    is_toroidal,
    load_toroidal_weights,
)
from toroidal.kernels import KernelRequest, get_backend
from toroidal.mechanisms import build_kernel, check_options, get_mechanism

_CONFIG_FIELDS = {f.name for f in fields(ToroidalConfig)}  # what a dict for `toroidal` may hold


def applied_mechanism(model: nn.Module) -> str:
    """The mechanism `model` runs: `toroidal`, a plugged mechanism's name, or `standard` (the host's)."""
    return attached_name(model) or "standard"


def mechanism_layers(model: nn.Module) -> list[int]:
    """Indices of the layers running the applied mechanism (none for `standard`)."""
    return list(attached(model))


def _plugged(model: nn.Module) -> dict[int, LayerState]:
    """The layers running a plugged kernel (toroidal layers measure nothing), by layer."""
    return {layer: state for layer, state in attached(model).items() if state.name != TOROIDAL}


def _toroidal_config(model: nn.Module, config) -> ToroidalConfig:
    """A ToroidalConfig as given, or kernel-mode defaults (rope none, P = the model's positions) + a dict."""
    if isinstance(config, ToroidalConfig):
        return config
    options = dict(config or {})
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(
            f"mechanism 'toroidal': unknown option(s) {', '.join(unknown)}; accepted: ToroidalConfig fields"
        )
    defaults = {"rope": "none"}
    positions = max_positions(model.config)
    if positions is not None:
        defaults["max_len"] = positions
    return ToroidalConfig(**{**defaults, **options})


def _refuse_if_applied(model: nn.Module) -> None:
    if applied_mechanism(model) != "standard":
        raise ValueError(
            f"mechanism {applied_mechanism(model)!r} is already applied to this model; "
            "call remove_mechanism first"
        )


def apply_mechanism(model: nn.Module, name: str, config=None, layers=None) -> nn.Module:
    """Run mechanism `name` in `layers` (None: all) of a transformers model; returns the model.

    `config`: for `toroidal` a ToroidalConfig or a dict of its fields (None: defaults with
    rope='none' and P = the model's positions); for the others a dict of the mechanism's
    options (None: its defaults; an accepted `max_len` defaults to the model's positions).
    `standard` restores the host's attention in every layer. Raises ValueError for an unknown
    mechanism or option, bad layers, or a model that already runs another mechanism.
    """
    mechanism = get_mechanism(name)
    if name == "standard":
        if config:
            raise ValueError("mechanism 'standard' takes no options (it is the host model's own attention)")
        chosen_layers(layers, sorted(attention_modules(model)))  # the same errors as the others
        return remove_mechanism(model)
    _refuse_if_applied(model)
    if name == TOROIDAL:
        return apply_toroidal(model, _toroidal_config(model, config), layers)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"options of mechanism {name!r} must be a dict, got {type(config).__name__}")
    options = dict(config or {})
    positions = max_positions(model.config)
    if "max_len" in mechanism.accepts and "max_len" not in options and positions is not None:
        options["max_len"] = positions
    return plug_mechanism(model, name, options, layers)


def plug_mechanism(model: nn.Module, name: str, options: dict | None = None, layers=None) -> nn.Module:
    """Run mechanism `name`'s kernel module in `layers`, its parameters as `mechanism_kernel`.

    The path `apply_mechanism` takes for every mechanism but `toroidal` (whose config, fusion
    weight names and dropout are `apply_toroidal`'s) and `standard` (nothing to plug);
    `standard` is accepted here, which runs plain SDPA through the same plumbing.
    """
    options = dict(options or {})
    check_options(name, options, get_mechanism(name).accepts)
    if name == TOROIDAL:
        raise ValueError("toroidal layers need apply_toroidal (or apply_mechanism), not a plugged kernel")
    _refuse_if_applied(model)
    plug = Plug(name, functools.partial(build_kernel, name, **options))
    return attach(model, plug, layers, f"mechanism {name!r}")


def remove_mechanism(model: nn.Module) -> nn.Module:
    """Back to the host's own attention: no kernel or fusion modules (nothing to do if none is applied)."""
    return detach(model)


def load_mechanism_weights(model: nn.Module, source) -> None:
    """Load the kernel parameters of a model saved with `save_pretrained` (see the module doc).

    `source`: a save directory, a .safetensors file or a state dict. A toroidal model
    loads its fusion parameters; a standard model has nothing to load.
    """
    if is_toroidal(model):
        load_toroidal_weights(model, source)
        return
    fix = "apply_mechanism with the name, options and layers the model was saved with"
    load_attached_weights(model, source, KERNEL_ATTR, "mechanism kernel", fix)


# --- lengths -------------------------------------------------------------------------------------------


def length_refusal(
    model: nn.Module, length: int, device_type: str = "cpu", dtype: torch.dtype = torch.float32
) -> str | None:
    """Why `model` cannot score a window of `length` tokens in one pass, or None when it can.

    Past `max_position_embeddings` is allowed wherever the positions are computed: rotary hosts
    (RoPE takes any position), hosts without position encoding (NoPE), ALiBi, and every torus
    mechanism (a causal layer's ring of period P = the training length wraps: that is its point).
    Refused: a learned absolute position table (GPT-2's `wpe`) past its last row, a kernel that
    cannot keep the host's sliding window once the length brings it into effect (`adaptive`), and
    a kernel pinned to a backend that cannot take the length (`decomposed` needs P >= N); `auto`
    moves on.
    """
    table = learned_positions(model)
    if table is not None and length > table[1]:
        name, rows = table
        return (
            f"{type(model).__name__} has {rows} positions, fewer than {length}: its learned absolute "
            f"positions ({name}) have no row past {rows}"
        )
    modules = attention_modules(model)
    for layer, state in attached(model).items():
        window = host_window(modules[layer])
        serves_window = state.takes_sliding_window and getattr(state.kernel, "serves_sliding_window", True)
        if window is not None and length > window and not serves_window:
            return (
                f"layer {layer} runs {state.name}, which cannot keep the host's sliding window "
                f"({window} keys) that N={length} brings into effect"
            )
        config = getattr(state.kernel, "config", None)
        if not isinstance(config, ToroidalConfig) or config.backend == "auto":
            continue
        causal = bool(getattr(modules[layer], "is_causal", True))
        geometry = TorusGeometry(
            depth=config.depth,
            period=config.period_for(length, causal),
            lambda_distance=float(config.lambda_distance),
            causal=causal,
            window=config.window,
        )
        request = KernelRequest(device_type, dtype, False, False, geometry, length, length, False)
        reason = get_backend(config.backend).unavailable_reason(request)
        if reason is not None:
            return f"layer {layer} runs backend {config.backend!r}, which cannot take N={length}: {reason}"
    return None


# --- metrics -------------------------------------------------------------------------------------------


def mechanism_metrics(model: nn.Module) -> dict[int, dict]:
    """`get_metrics()` of every plugged kernel, by layer (empty for toroidal and standard models)."""
    return {layer: state.kernel.get_metrics() for layer, state in _plugged(model).items()}


def reset_mechanism_metrics(model: nn.Module) -> None:
    for state in _plugged(model).values():
        state.kernel.reset_metrics()


def summarize_metrics(per_layer: dict[int, dict]) -> dict:
    """The mean over layers of every numeric metric all layers report (counts and rates alike)."""
    if not per_layer:
        return {}
    reports = list(per_layer.values())
    shared = set(reports[0]).intersection(*reports[1:])
    means = {}
    for key in sorted(shared):
        values = [report[key] for report in reports]
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            means[key] = float(sum(values)) / len(values)
    return means

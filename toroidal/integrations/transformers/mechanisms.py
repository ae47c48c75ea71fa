"""Any registered mechanism inside a Hugging Face transformers model.

    from toroidal.mechanisms import apply_mechanism, mechanism_metrics, remove_mechanism

    apply_mechanism(model, "tiled", {"tile": 64}, layers=[1])   # the mechanism's own options
    apply_mechanism(model, "toroidal", {"depth": 2})            # a ToroidalConfig or a dict
    mechanism_metrics(model)                                    # {layer: kernel.get_metrics()}
    remove_mechanism(model)                                     # the host's own attention again

`toroidal` is `apply_toroidal` (the rotary-pair platter layout and depth fusion of kernel
mode; see `toroidal.integrations.transformers`). `standard` is the host's own attention:
applying it removes whatever mechanism runs. Every other mechanism plugs its kernel module
into the chosen layers through transformers' attention interface, exactly the way toroidal
layers do: `<name>+<previous>` (e.g. `tiled+sdpa`) is registered as an attention function
that runs the kernel on the chosen modules and the previous implementation on the others,
and as a mask function that attaches key padding, the first query's position and the
mask's causal-ness to the previous mask (`_mask_function` of the toroidal integration).

The kernel gets the host's projected, rotated q, k, v (keys and values repeated to the
query heads when the host groups them), the host's `scaling`, its causal flag, the key
padding and `q_offset`; its output goes back to the host's output projection. Kernels of
platter mechanisms (a `config.depth` > 1: tiled, adaptive, fft) get q and k permuted over
the head dimension so that each platter holds whole rotary pairs (`platter_order`, as in
toroidal layers; the same permutation for q and k leaves every q.k unchanged). The host's
attention-probability dropout does not apply to kernel layers. A host mask that is not
plain causal or bidirectional attention over padded keys (a sliding window that bites,
packed sequences) is refused, as in toroidal layers.

Each kernel module is registered as `mechanism_kernel` on its attention module, so its
parameters train, are saved by `save_pretrained` and restored by `load_mechanism_weights`
after `apply_mechanism` with the same name, options and layers.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.integrations.transformers.host import (
    _chosen_layers,
    _fallback_function,
    _head_shape,
    _mask_function,
    apply_toroidal,
    attention_modules,
    host_keys,
    host_layers,
    is_toroidal,
    load_attached_weights,
    platter_order,
    remove_toroidal,
    toroidal_layers,
)

KERNEL_ATTR = "mechanism_kernel"  # the kernel module on each chosen attention module
STATE_ATTR = "mechanism"  # the per-layer call-time state (a KernelLayer)
_TOROIDAL_FIELDS = {f.name for f in fields(ToroidalConfig)}


@dataclass
class KernelLayer:
    """What a kernel layer needs at call time (stored as `module.mechanism`)."""

    name: str
    layer: int
    heads: int
    head_dim: int
    order: list[int] | None = None  # head-dim permutation of q and k (None: identity)
    _orders: dict = field(default_factory=dict, repr=False)  # the order as an index, per device

    def order_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._orders:  # built once: no host-to-device copy per call
            self._orders[device] = torch.tensor(self.order, device=device)
        return self._orders[device]


# --- the attention function ----------------------------------------------------------------------------


def _kernel_forward(module, query, key, value, attention_mask, scaling=None, is_causal=None, **kwargs):
    state: KernelLayer = getattr(module, STATE_ATTR)
    n_q, n_k = query.shape[2], key.shape[2]
    if query.shape[1] != state.heads or query.shape[-1] != state.head_dim:
        raise ValueError(
            f"{state.name} layer {state.layer} was set up for {state.heads} heads of {state.head_dim} dims, "
            f"got queries {tuple(query.shape)} (B, H, N, e)"
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    keys = host_keys(f"{state.name} layer {state.layer}", attention_mask, n_q, n_k, causal)
    if state.order is not None:
        order = state.order_on(query.device)
        query, key = query.index_select(-1, order), key.index_select(-1, order)
    if key.shape[1] != state.heads:  # grouped queries: the kernel contract has one key head per query head
        groups = state.heads // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    kernel = getattr(module, KERNEL_ATTR)
    out = kernel(
        query, key, value, causal=causal, key_padding_mask=keys.padding, scale=scaling, q_offset=keys.q_offset
    )
    # The interface returns (B, N, H, e) and the attention weights (not materialized here).
    return out.transpose(1, 2).contiguous(), None


def _attention_function(fallback: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if getattr(module, STATE_ATTR, None) is None:
            return _fallback_function(fallback, module)(
                module, query, key, value, attention_mask, *args, **kwargs
            )
        return _kernel_forward(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _register(name: str, fallback: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    implementation = f"{name}+{fallback}"
    AttentionInterface.register(implementation, _attention_function(fallback))
    AttentionMaskInterface.register(implementation, _mask_function(fallback))
    return implementation


# --- which mechanism runs ------------------------------------------------------------------------------


def _kernel_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Attention modules running a plugged kernel, by layer."""
    return {i: m for i, m in attention_modules(model).items() if getattr(m, STATE_ATTR, None) is not None}


def applied_mechanism(model: nn.Module) -> str:
    """The mechanism `model` runs: `toroidal`, a plugged mechanism's name, or `standard` (the host's)."""
    if is_toroidal(model):
        return "toroidal"
    plugged = {m.mechanism.name for m in _kernel_modules(model).values()}
    return plugged.pop() if plugged else "standard"


def mechanism_layers(model: nn.Module) -> list[int]:
    """Indices of the layers running the applied mechanism (none for `standard`)."""
    return toroidal_layers(model) if is_toroidal(model) else sorted(_kernel_modules(model))


# --- public API ----------------------------------------------------------------------------------------


def _toroidal_config(model: nn.Module, config) -> ToroidalConfig:
    """A ToroidalConfig as given, or kernel-mode defaults (rope none, P = the model's positions) + a dict."""
    if isinstance(config, ToroidalConfig):
        return config
    options = dict(config or {})
    unknown = sorted(set(options) - _TOROIDAL_FIELDS)
    if unknown:
        raise ValueError(
            f"mechanism 'toroidal': unknown option(s) {', '.join(unknown)}; accepted: ToroidalConfig fields"
        )
    defaults = {"rope": "none"}
    positions = _max_positions(model)
    if positions is not None:
        defaults["max_len"] = positions
    return ToroidalConfig(**{**defaults, **options})


def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def apply_mechanism(model: nn.Module, name: str, config=None, layers=None) -> nn.Module:
    """Run mechanism `name` in `layers` (None: all) of a transformers model; returns the model.

    `config`: for `toroidal` a ToroidalConfig or a dict of its fields (None: defaults with
    rope='none' and P = the model's positions); for the others a dict of the mechanism's
    options (None: its defaults; an accepted `max_len` defaults to the model's positions).
    `standard` restores the host's attention in every layer. Raises ValueError for an unknown
    mechanism or option, bad layers, or a model that already runs another mechanism.
    """
    from toroidal.mechanisms import get_mechanism

    mechanism = get_mechanism(name)
    if name == "standard":
        if config:
            raise ValueError("mechanism 'standard' takes no options (it is the host model's own attention)")
        _chosen_layers(layers, sorted(attention_modules(model)))  # the same errors as the others
        return remove_mechanism(model)
    if applied_mechanism(model) != "standard":
        raise ValueError(
            f"mechanism {applied_mechanism(model)!r} is already applied to this model; "
            "call remove_mechanism first"
        )
    if name == "toroidal":
        return apply_toroidal(model, _toroidal_config(model, config), layers)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"options of mechanism {name!r} must be a dict, got {type(config).__name__}")
    options = dict(config or {})
    positions = _max_positions(model)
    if "max_len" in mechanism.accepts and "max_len" not in options and positions is not None:
        options["max_len"] = positions
    return plug_mechanism(model, name, options, layers)


def plug_mechanism(model: nn.Module, name: str, options: dict | None = None, layers=None) -> nn.Module:
    """Run mechanism `name`'s kernel module in `layers` through the attention interface.

    The path `apply_mechanism` takes for every mechanism but `toroidal` (whose platters need
    the rotary-pair layout of `apply_toroidal`) and `standard` (nothing to plug); `standard`
    is accepted here, which runs plain SDPA through the same plumbing.
    """
    from toroidal.mechanisms import build_kernel, check_options, get_mechanism

    check_options(name, options or {}, get_mechanism(name).accepts)
    if name == "toroidal":
        raise ValueError("toroidal layers need apply_toroidal (or apply_mechanism), not a plugged kernel")
    previous = model.config._attn_implementation
    if applied_mechanism(model) != "standard":
        raise ValueError(
            f"mechanism {applied_mechanism(model)!r} is already applied to this model; "
            "call remove_mechanism first"
        )
    modules, chosen, rotary_dim = host_layers(model, layers, f"mechanism {name!r}")
    # Build every kernel before changing anything: a bad option leaves the model as it was.
    plans = []
    for layer in chosen:
        heads, head_dim = _head_shape(modules[layer], model.config)
        kernel = build_kernel(name, heads, head_dim, **(options or {}))
        depth = getattr(getattr(kernel, "config", None), "depth", 1)
        order = platter_order(head_dim, depth, min(rotary_dim, head_dim)) if depth > 1 else None
        plans.append((layer, heads, head_dim, kernel, order))

    implementation = _register(name, previous)
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
    for layer, heads, head_dim, kernel, order in plans:
        module = modules[layer]
        reference = next(module.parameters())
        module.add_module(KERNEL_ATTR, kernel.to(device=reference.device, dtype=reference.dtype))
        setattr(module, STATE_ATTR, KernelLayer(name, layer, heads, head_dim, order))
    return model


def remove_mechanism(model: nn.Module) -> nn.Module:
    """Back to the host's own attention: no kernel or fusion modules (nothing to do if none is applied)."""
    if is_toroidal(model):
        return remove_toroidal(model)
    plugged = _kernel_modules(model)
    if not plugged:
        return model
    for module in plugged.values():
        delattr(module, STATE_ATTR)
        delattr(module, KERNEL_ATTR)
    implementation = str(model.config._attn_implementation)
    model.set_attn_implementation(implementation.split("+", 1)[1])
    return model


def load_mechanism_weights(model: nn.Module, source) -> None:
    """Load the kernel parameters of a model saved with `save_pretrained` (see the module doc).

    `source`: a save directory, a .safetensors file or a state dict. A toroidal model
    loads its fusion parameters; a standard model has nothing to load.
    """
    from toroidal.integrations.transformers.host import load_toroidal_weights

    if is_toroidal(model):
        load_toroidal_weights(model, source)
        return
    fix = "apply_mechanism with the name, options and layers the model was saved with"
    load_attached_weights(model, source, KERNEL_ATTR, "mechanism kernel", fix)


# --- metrics -------------------------------------------------------------------------------------------


def mechanism_metrics(model: nn.Module) -> dict[int, dict]:
    """`get_metrics()` of every plugged kernel, by layer (empty for toroidal and standard models)."""
    return {i: getattr(m, KERNEL_ATTR).get_metrics() for i, m in sorted(_kernel_modules(model).items())}


def reset_mechanism_metrics(model: nn.Module) -> None:
    for module in _kernel_modules(model).values():
        getattr(module, KERNEL_ATTR).reset_metrics()


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


__all__ = [
    "KERNEL_ATTR",
    "applied_mechanism",
    "apply_mechanism",
    "load_mechanism_weights",
    "mechanism_layers",
    "mechanism_metrics",
    "plug_mechanism",
    "remove_mechanism",
    "reset_mechanism_metrics",
    "summarize_metrics",
]

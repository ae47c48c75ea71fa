"""The one attacher: a mechanism's kernel module in chosen layers of a Hugging Face model.

Every mechanism, toroidal included, plugs in here. `attach` registers `<name>+<host's>` (e.g.
`toroidal+sdpa`, `tiled+sdpa`) with transformers' attention interface and switches the model
to it. Its attention function runs the kernel on attention modules that carry a `LayerState`
and the host's own function on every other module, so those compute exactly what they did. The
kernel gets the host's projected, rotated q, k, v (q and k permuted so that each platter holds
whole rotary pairs, keys and values repeated to the query heads), the host's scale and causal
flag, and the key padding, first-query position and sliding window (where one is in effect)
read from the host mask (`host.host_keys`); its output goes back to the host's output projection.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toroidal.integrations.transformers.host import (
    attention_modules,
    fallback_function,
    head_shape,
    host_keys,
    host_layers,
    platter_order,
    register_implementation,
)

KERNEL_ATTR = "mechanism_kernel"  # where a kernel's parameters live by default (see `Plug.weights_attr`)
STATE_ATTR = "mechanism"  # the per-layer call-time state (a LayerState) on each chosen attention module
STREAM_ATTR = "toroidal_stream"  # a streaming state (`streaming.py`): runs instead of the kernel


@dataclass(frozen=True)
class Plug:
    """How one mechanism's kernels sit in the chosen layers of a host model."""

    name: str  # the mechanism: names the implementation `<name>+<host's>` and the layers in errors
    build: Callable[[int, int], nn.Module]  # (heads, head_dim) -> a fresh kernel module for one layer
    # Platters per head when known before building (a split rotary pair is refused before any
    # kernel is built); None: the built kernel's `config.depth`, else 1.
    depth: int | None = None
    weights_attr: str = KERNEL_ATTR  # the attention module's attribute holding the kernel's parameters
    part: str | None = None  # the kernel's submodule registered there (None: the whole kernel)
    dropout: float = 0.0  # on the kernel's output, in training (the host's attention dropout never applies)


@dataclass
class LayerState:
    """What a chosen layer needs at call time (stored as `module.mechanism`)."""

    plug: Plug
    layer: int
    heads: int
    head_dim: int
    kernel: nn.Module
    order: list[int] | None  # head-dim permutation of q and k (None: identity)
    _orders: dict = field(default_factory=dict, repr=False)  # the order as an index, per device
    takes_sliding_window: bool = True  # whether the kernel's forward has the `sliding_window` keyword

    @property
    def name(self) -> str:
        return self.plug.name

    def permute(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k in platter order (the same permutation for both leaves every q.k unchanged)."""
        if self.order is None:
            return query, key
        if query.device not in self._orders:  # built once: no host-to-device copy per call
            self._orders[query.device] = torch.tensor(self.order, device=query.device)
        order = self._orders[query.device]
        return query.index_select(-1, order), key.index_select(-1, order)


def layer_state(module: nn.Module) -> LayerState | None:
    return getattr(module, STATE_ATTR, None)


def attached(model: nn.Module) -> dict[int, LayerState]:
    """The states of the layers running an attached kernel, by layer."""
    states = {layer: layer_state(module) for layer, module in attention_modules(model).items()}
    return {layer: state for layer, state in sorted(states.items()) if state is not None}


def attached_name(model: nn.Module) -> str | None:
    """The mechanism attached to `model`, or None."""
    names = {state.name for state in attached(model).values()}
    return names.pop() if names else None


# --- the attention function ------------------------------------------------------------------------


def _takes_sliding_window(kernel: nn.Module) -> bool:
    parameters = inspect.signature(kernel.forward).parameters.values()
    return any(p.name == "sliding_window" or p.kind is p.VAR_KEYWORD for p in parameters)


def run_layer(module, query, key, value, attention_mask, scaling=None, is_causal=None, **kwargs):
    """The attention interface's call on a chosen layer: (output (B, N, H, e), no weights)."""
    state = layer_state(module)
    label = f"{state.name} layer {state.layer}"
    n_q, n_k = query.shape[2], key.shape[2]
    if query.shape[1] != state.heads or query.shape[-1] != state.head_dim:
        raise ValueError(
            f"{label} was set up for {state.heads} heads of {state.head_dim} dims, "
            f"got queries {tuple(query.shape)} (B, H, N, e)"
        )
    if kwargs.get("softcap") is not None:  # Gemma 2: tanh-capped scores, which no kernel here computes
        raise ValueError(f"{label}: the host caps its attention scores (softcap={kwargs['softcap']})")
    stream = getattr(module, STREAM_ATTR, None)
    if stream is not None:  # streaming: a latent state instead of keys
        return stream.step(module, state, query, key, value, scaling)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    keys = host_keys(label, attention_mask, n_q, n_k, causal, kwargs.get("sliding_window"))
    query, key = state.permute(query, key)
    if key.shape[1] != state.heads:  # grouped queries: the kernel contract has one key head per query head
        groups = state.heads // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    window = {}
    if keys.sliding_window is not None:  # passed only where in effect: older kernels serve the rest
        if not state.takes_sliding_window:
            raise ValueError(
                f"{label}: the host's sliding window ({keys.sliding_window} keys) is in effect and this "
                "kernel's forward takes no sliding_window"
            )
        window["sliding_window"] = keys.sliding_window
    out = state.kernel(
        query, key, value, causal=causal, key_padding_mask=keys.padding, scale=scaling,
        q_offset=keys.q_offset, **window,
    )  # fmt: skip
    if state.plug.dropout:
        out = F.dropout(out, state.plug.dropout, training=module.training)
    # The interface returns (B, N, H, e) and the attention weights (never materialized here).
    return out.transpose(1, 2).contiguous(), None


def attention_function(fallback: str):
    """Chosen layers run their kernel, every other layer the `fallback` implementation."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        run = fallback_function(fallback, module) if layer_state(module) is None else run_layer
        return run(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


# --- attach, detach, weights -----------------------------------------------------------------------


def attach(model: nn.Module, plug: Plug, layers, what: str) -> nn.Module:
    """Run `plug`'s kernels in `layers` (None: all) of a model running sdpa or eager; returns the model.

    Every kernel is built before anything changes: an error leaves the model as it was.
    `what` names the caller in the error about the host's attention implementation.
    """
    modules, chosen, rotary = host_layers(model, layers, what)
    plans = []
    for layer in chosen:
        module = modules[layer]
        heads, head_dim = head_shape(module, model.config)
        if plug.depth is not None:
            order = platter_order(head_dim, plug.depth, min(rotary, head_dim))
        kernel = plug.build(heads, head_dim)
        if plug.depth is None:
            depth = getattr(getattr(kernel, "config", None), "depth", 1)
            order = platter_order(head_dim, depth, min(rotary, head_dim))
        state = LayerState(plug, layer, heads, head_dim, kernel, order)
        state.takes_sliding_window = _takes_sliding_window(kernel)
        plans.append((module, state))

    previous = model.config._attn_implementation
    implementation = register_implementation(plug.name, previous, attention_function(previous))
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
    for module, state in plans:
        reference = next(module.parameters())
        state.kernel.to(device=reference.device, dtype=reference.dtype)
        weights = state.kernel if plug.part is None else getattr(state.kernel, plug.part)
        module.add_module(plug.weights_attr, weights)
        setattr(module, STATE_ATTR, state)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Back to the host's own attention: no layer states, no kernel parameters (no-op if none)."""
    states = attached(model)
    if not states:
        return model
    modules = attention_modules(model)
    for layer, state in states.items():
        delattr(modules[layer], STATE_ATTR)
        delattr(modules[layer], state.plug.weights_attr)
    model.set_attn_implementation(str(model.config._attn_implementation).split("+", 1)[1])
    return model


def load_attached_weights(model: nn.Module, source, attr: str, what: str, fix: str) -> None:
    """Load the tensors under the attached submodules named `attr` (saved by `save_pretrained`).

    `source`: a save directory, a .safetensors file or a state dict. Every such tensor of
    `model` must be found and no other: ValueError naming `what` and the `fix` otherwise.
    """
    from safetensors import safe_open

    wanted = {k for k in model.state_dict() if f".{attr}." in k}
    if isinstance(source, dict):
        found = {k: v for k, v in source.items() if f".{attr}." in k}
    else:
        path = Path(source)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no .safetensors file at {path}")
        found = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:  # reads only the attached tensors
                names = [k for k in f.keys() if f".{attr}." in k]  # noqa: SIM118 (not a dict)
                found.update({k: f.get_tensor(k) for k in names})
    missing, extra = sorted(wanted - set(found)), sorted(set(found) - wanted)
    if missing or extra:
        raise ValueError(
            f"{what} parameters do not match: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}; {fix}"
        )
    model.load_state_dict(found, strict=False)

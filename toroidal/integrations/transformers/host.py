"""Host plumbing: what a Hugging Face transformers model offers a kernel and how to register with it.

Attention modules by layer, their head shapes, the rotary-pair platter order, the host mask
read back as key padding + first-query position + causal-ness + sliding window, and the
registration of `<name>+<fallback>` attention and mask functions. `attach.py` builds the one
attacher on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

# Flash attention shares neither masks nor padding handling with the others: not a fallback.
SUPPORTED_FALLBACKS = ("sdpa", "eager")


@dataclass(frozen=True)
class KeyInfo:
    """The host mask read back: the rules it follows, for a causal and for a bidirectional layer."""

    padding: torch.Tensor | None  # (B, N_k), True for real keys; None: no padding
    q_offset: int  # position of the first query, counted from the first key
    plain_causal: bool  # host mask == causal rule & padding (& |i - j| < causal_window)
    plain_bidirectional: bool  # host mask == padding (& |i - j| < bidirectional_window)
    causal_window: int | None = None  # the sliding window W the causal mask cuts with (None: none cuts)
    bidirectional_window: int | None = None
    kv_offset: int = 0  # position of the first key (> 0: a sliding-window cache dropped those before)


@dataclass(frozen=True)
class CallKeys:
    """What a kernel takes of the host mask in one call."""

    padding: torch.Tensor | None  # (B, N_k), True for real keys; None: no padding
    q_offset: int  # position of the first query, counted from the first key
    sliding_window: int | None  # the host's key window |i - j| < W where it is in effect, else None


# --- head layout -------------------------------------------------------------------


def platter_order(head_dim: int, depth: int, rotary_dim: int) -> list[int] | None:
    """Head-dim order of q and k giving each of `depth` platters whole rotate_half pairs.

    Pair j is (j, j + rotary_dim/2). Platter k gets pairs k, k + D, ... (strided: every
    platter sees fast and slow frequencies) then a contiguous share of the pass-through dims.
    The same order for q and k leaves q.k unchanged. Returns None when it is the identity.
    """
    half, passthrough = rotary_dim // 2, head_dim - rotary_dim
    if head_dim % depth or half % depth or passthrough % depth:
        raise ValueError(
            f"depth={depth} cannot split the host head (head_dim={head_dim}: {half} rotary pairs and "
            f"{passthrough} pass-through dims) into {depth} platters of whole rotary pairs; "
            f"depth must divide {head_dim}, {half} and {passthrough}"
        )
    share = passthrough // depth
    order: list[int] = []
    for k in range(depth):
        pairs = list(range(k, half, depth))
        order += pairs + [j + half for j in pairs]
        order += list(range(rotary_dim + k * share, rotary_dim + (k + 1) * share))
    return None if order == list(range(head_dim)) else order


def rotary_dim(model: nn.Module) -> int:
    """Dims the host rotates: 2 * len(inv_freq) of its rotary embedding (0 without one)."""
    # `inv_freq`, or one per layer type (Gemma 3: `sliding_attention_inv_freq`); not the `original_` copies.
    sizes = {
        buf.numel()
        for name, buf in model.named_buffers()
        if (last := name.rsplit(".", 1)[-1]) == "inv_freq"
        or (last.endswith("_inv_freq") and not last.endswith("original_inv_freq"))
    }
    if len(sizes) > 1:
        raise ValueError(f"the model has rotary embeddings of several sizes {sorted(sizes)}; unsupported")
    return 2 * sizes.pop() if sizes else 0


def head_shape(module: nn.Module, model_config) -> tuple[int, int]:
    """(query heads, head dim) of a host attention module."""
    heads = model_config.num_attention_heads
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "head_size", None)
        or getattr(module, "attention_head_size", None)
        or model_config.hidden_size // heads
    )
    return heads, head_dim


def max_positions(model_config) -> int | None:
    """The positions a host model config states (None if it states none)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    return positions or getattr(model_config, "n_positions", None)


# The names a learned absolute position table goes by: GPT-2's `wpe`, OPT's and BART's
# `embed_positions`, BERT-style `position_embeddings`.
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def learned_positions(model: nn.Module) -> tuple[str, int] | None:
    """(module name, positions) of the host's learned absolute position table, None without one.

    Such a table has a row per position and nothing past its last row. Rotary hosts compute
    any position from it (RoPE), as do hosts without position encoding and ALiBi's bias.
    """
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        table = name.rsplit(".", 1)[-1] in _POSITION_TABLES
        if table and isinstance(module, nn.Embedding) and module is not inputs:
            return name, module.num_embeddings - int(getattr(module, "offset", 0))  # OPT keeps 2 spare rows
    return None


# --- finding the layers ------------------------------------------------------------


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Self-attention modules that call the attention interface, by layer index."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int) or not hasattr(module, "scaling") or not hasattr(module, "is_causal"):
            continue
        if getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
            continue
        if layer in found:
            raise ValueError(f"two self-attention modules claim layer {layer}: unsupported model layout")
        found[layer] = module
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention modules using transformers' attention interface"
        )
    return found


def chosen_layers(layers, available: list[int]) -> list[int]:
    """`layers` checked against the `available` layer indices (None: all of them), sorted."""
    if layers is None:
        return available
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; pass None for all layers or a list of layer indices")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in available:
            raise ValueError(
                f"layer index {layer!r} does not exist: the model has attention layers "
                f"{available[0]}..{available[-1]}"
            )
    return sorted(set(layers))


def host_layers(model: nn.Module, layers, what: str) -> tuple[dict[int, nn.Module], list[int], int]:
    """(attention modules by layer, the chosen layers, rotary dims) of a host `what` can plug into.

    Raises ValueError for a host attention other than sdpa/eager, a bad layer choice, or a
    model whose other layers would have no attention function to keep.
    """
    previous = model.config._attn_implementation
    if previous not in SUPPORTED_FALLBACKS:
        raise ValueError(
            f"{what} needs a model running one of {', '.join(SUPPORTED_FALLBACKS)} attention, "
            f"got {previous!r}; call model.set_attn_implementation('sdpa') first"
        )
    modules = attention_modules(model)
    chosen = chosen_layers(layers, sorted(modules))
    if any(fallback_function(previous, m) is None for m in modules.values()):
        raise ValueError(f"{type(model).__name__} has no eager attention function to keep in other layers")
    return modules, chosen, rotary_dim(model)


# --- masks -------------------------------------------------------------------------


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) bool from a 4D host mask (bool, or additive with 0 where allowed)."""
    mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


def _fit(allowed: torch.Tensor, rule: torch.Tensor, distance: torch.Tensor) -> tuple[bool, int | None]:
    """Whether the mask `allowed` is `rule`, or `rule` & |i - j| < W for some W >= 1, and that W."""
    if bool((allowed == rule).all()):
        return True, None
    cut = rule & ~allowed
    if not bool(cut.any()):
        return False, None
    window = int(distance.expand_as(cut)[cut].min())  # the nearest pair the window cuts
    return window >= 1 and bool((allowed == (rule & (distance < window))).all()), window


def _key_info(allowed: torch.Tensor, q_offset: int, padding: torch.Tensor | None, kv_offset=0) -> KeyInfo:
    """Compare a (B, Q, K) host mask with the causal and bidirectional rules over `padding`, each
    alone or cut by a sliding window (read off the mask: the nearest pair it cuts)."""
    b, n_q, n_k = allowed.shape
    if padding is None:  # a key that some query may see is a real key
        padding = allowed.any(dim=1)
    padding = padding.to(device=allowed.device, dtype=torch.bool).expand(b, n_k)
    i = q_offset + torch.arange(n_q, device=allowed.device)[:, None]
    j = torch.arange(n_k, device=allowed.device)[None, :]
    real = padding[:, None, :]
    distance = (i - j).abs()
    causal, causal_window = _fit(allowed, real & (j <= i), distance)
    bidirectional, bidirectional_window = _fit(allowed, real, distance)
    return KeyInfo(
        None if bool(padding.all()) else padding, q_offset, causal, bidirectional,
        causal_window, bidirectional_window, kv_offset,
    )  # fmt: skip


def _keys_for_call(mask, n_q: int, n_k: int) -> KeyInfo:
    info = getattr(mask, "toroidal_keys", None)  # attached by `mask_function`
    if info is not None:
        return info
    if mask is None:  # SDPA's "use is_causal" / "no mask": no padding
        return KeyInfo(None, 0 if n_q > 1 else n_k - 1, True, True)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # a 4D mask given by the caller
        return _key_info(_allowed(mask), n_k - n_q, None)
    raise TypeError(f"toroidal layers cannot read a host attention mask of type {type(mask).__name__}")


def host_window(module: nn.Module) -> int | None:
    """The key window W (|i - j| < W) a host attention module declares, or None: Gemma- and Qwen2-style
    modules carry their own (None in full-attention layers), Mistral-style ones read their config's."""
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        window = getattr(getattr(module, "config", None), "sliding_window", None)
    return int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def host_keys(label: str, mask, n_q: int, n_k: int, causal: bool, sliding_window=None) -> CallKeys:
    """The kernel's view of the host mask; refuses a mask that is not causal (or bidirectional)
    attention with padding, alone or cut by a sliding window.

    When the mask is None (SDPA without padding) there is no padding and the first query
    sits at 0 (prefill) or at N_k - 1 (decoding one token). The sliding window in effect is
    the one the mask cuts with, else `sliding_window` (the window the host layer declares to
    its attention function) where a sliding-window cache dropped the keys before the window.
    """
    keys = _keys_for_call(mask, n_q, n_k)
    if causal:
        fits, window = keys.plain_causal, keys.causal_window
    else:
        fits, window = keys.plain_bidirectional, keys.bidirectional_window
    if not fits:
        kind = "causal" if causal else "bidirectional"
        raise ValueError(
            f"{label}: the host attention mask is not {kind} attention with padding, alone or cut by a "
            "sliding window (packed sequences, chunked attention or a custom mask); these layers take "
            "only key padding, causality, a sliding window and their own window"
        )
    if window is None and causal and keys.kv_offset > 0:
        window = sliding_window
    return CallKeys(keys.padding, keys.q_offset, window)


def mask_function(fallback: str):
    """The `fallback` mask function, with the kernel's view of the keys (`KeyInfo`) attached to its mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, prepare_padding_mask

    def build(**kwargs):
        mask = ALL_MASK_ATTENTION_FUNCTIONS[fallback](**kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kv_length, kv_offset = kwargs["kv_length"], int(kwargs.get("kv_offset", 0))
            padding = prepare_padding_mask(kwargs.get("attention_mask"), kv_length, kv_offset)
            if padding is not None:
                padding = padding[:, kv_offset : kv_offset + kv_length]
            q_offset = int(kwargs.get("q_offset", 0)) - kv_offset
            mask.toroidal_keys = _key_info(_allowed(mask), q_offset, padding, kv_offset)
        return mask

    return build


# --- attention functions -------------------------------------------------------------


def fallback_function(fallback: str, module: nn.Module):
    """The function the host would call for `fallback` (eager is each family's own)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(fallback, eager)


def register_implementation(name: str, fallback: str, attention) -> str:
    """Register `<name>+<fallback>` (e.g. `toroidal+sdpa`): `attention` as its attention function
    and the fallback's mask function with key info attached as its mask function. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    implementation = f"{name}+{fallback}"
    AttentionInterface.register(implementation, attention)
    AttentionMaskInterface.register(implementation, mask_function(fallback))
    return implementation

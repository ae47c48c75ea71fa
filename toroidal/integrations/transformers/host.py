"""Toroidal attention inside Hugging Face transformers models ("kernel mode").

    from toroidal import ToroidalConfig
    from toroidal.integrations.transformers.host import apply_toroidal, remove_toroidal

    apply_toroidal(model, ToroidalConfig(depth=2, lambda_distance=0.1, rope="none"), layers=[0, 1])
    ...
    remove_toroidal(model)  # back to the model's own attention, fusion parameters removed

The host model keeps its own q/k/v projections, rotary encoding, output projection and
KV cache; toroidal attention replaces only the attention kernel of the chosen layers and
adds the torus bias, circular window, platters and depth fusion. Tested with the Llama,
Mistral, Qwen2, Phi (Phi-2), Phi-3, GPT-NeoX, GPT-2 and BERT families.

How it plugs in. transformers picks the attention function of every layer by the name in
`config._attn_implementation` (`AttentionInterface`) and builds the attention mask with the
mask function registered under the same name (`AttentionMaskInterface`). `apply_toroidal`
registers `toroidal+<previous>` (e.g. `toroidal+sdpa`) in both and switches the model to it:

- the attention function runs toroidal attention on modules that carry a `toroidal`
  attribute (the per-layer state) and calls the previous implementation's function on
  every other module, so the other layers compute exactly what they computed before;
- the mask function returns the previous implementation's mask unchanged (what the other
  layers need) and attaches to it what the kernel needs: key padding (B, N_k) from the 2D
  attention mask, the position of the first query (the number of cached positions, as the
  cache reports it) and whether the host mask is plain causal or plain bidirectional
  attention over those keys. A toroidal layer refuses a host mask that is neither (a
  sliding window that bites, packed sequences, a custom mask): the kernel takes only key
  padding, a causal flag and its own window. When the host mask is None (SDPA without
  padding) there is no padding and the first query sits at 0 (prefill) or at N_k - 1
  (decoding one token). A 4D mask given by the caller is read back the same way.

Positions on the ring are key indices: key j sits at j, query i at q_offset + i. Left
padding shifts every position of a row by the same amount, and the torus bias, window
and causal rule depend only on i - j (mod P), so padding changes nothing. Causal layers
use a fixed period P = config.period or config.max_len, so prefill, KV-cache decoding and
recomputing the full sequence compute the same function; bidirectional layers use
P = config.period or the (padded) key length, so set `period` for results that do not
depend on how much a batch is padded.

Platters take whole rotary pairs. The listed families rotate with `rotate_half`: dim j
pairs with dim j + r/2 over the first r dims (r = head_dim, or r < head_dim for partial
rotary, Phi and GPT-NeoX), the others pass through. A contiguous platter slice would split
pairs and make scores depend on absolute positions, so q and k are permuted over the head
dimension (the same permutation for both, which leaves q.k unchanged): platter k gets
pairs k, k + D, k + 2D, ... (strided, so every platter sees fast and slow frequencies) and
a contiguous share of the pass-through dims. GPT-2 and BERT have no rotary: no
permutation. D must divide the number of pairs and of pass-through dims.

Values keep the host layout: value platter l is the contiguous slice l of v, the kernel
writes output platter k into slice k, and depth fusion mixes those slices, so the output
comes back in the host layout for the output projection. With D=1, lambda=0, no window
and 'concat' fusion this is exactly the host's attention.

Of `ToroidalConfig`, kernel mode uses depth, lambda_distance, period, window, fusion,
fusion_rank, backend, max_len and dropout (on the fused output, in training; the host's
attention-probability dropout does not apply to toroidal layers). `rope` must be 'none':
the host keeps its own rotary encoding. d_model, n_heads and causal are ignored: shapes
and causality come from the host. The scale is the host's `scaling`.

Fusion parameters live in a `DepthFusion` registered as `toroidal_fusion` on each chosen
attention module, so they train, and appear in `state_dict()` and `save_pretrained`.
`from_pretrained` drops them as unexpected keys: rebuild with `apply_toroidal` and reload
them with `load_toroidal_weights(model, path)`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.functional import toroidal_attention
from toroidal.fusion import DepthFusion

PREFIX = "toroidal+"
# Flash attention shares neither masks nor padding handling with the others: not a fallback.
SUPPORTED_FALLBACKS = ("sdpa", "eager")
FUSION_ATTR = "toroidal_fusion"


@dataclass
class LayerState:
    """What a toroidal layer needs at call time (stored as `module.toroidal`)."""

    config: ToroidalConfig
    layer: int
    heads: int
    head_dim: int
    order: list[int] | None  # head-dim permutation of q and k (None: identity)
    _orders: dict = field(default_factory=dict, repr=False)  # the order as an index, per device
    # Set by `capture_attention`: the next calls run the reference backend and keep their weights.
    captured: list | None = field(default=None, repr=False)

    def order_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._orders:  # built once: no host-to-device copy per call
            self._orders[device] = torch.tensor(self.order, device=device)
        return self._orders[device]


@dataclass(frozen=True)
class KeyInfo:
    """The host mask as the kernel needs it."""

    padding: torch.Tensor | None  # (B, N_k), True for real keys; None: no padding
    q_offset: int  # position of the first query, counted from the first key
    plain_causal: bool  # host mask == causal rule & padding
    plain_bidirectional: bool  # host mask == padding


# --- head layout -------------------------------------------------------------------


def platter_order(head_dim: int, depth: int, rotary_dim: int) -> list[int] | None:
    """Head-dim order of q and k giving each of `depth` platters whole rotate_half pairs.

    Pair j is (j, j + rotary_dim/2). Platter k gets pairs k, k + D, ... then a contiguous
    share of the pass-through dims. Returns None when the order is the identity.
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


def _rotary_dim(model: nn.Module) -> int:
    """Dims the host rotates: 2 * len(inv_freq) of its rotary embedding (0 without one)."""
    sizes = {buf.numel() for name, buf in model.named_buffers() if name.rsplit(".", 1)[-1] == "inv_freq"}
    if len(sizes) > 1:
        raise ValueError(f"the model has rotary embeddings of several sizes {sorted(sizes)}; unsupported")
    return 2 * sizes.pop() if sizes else 0


def _head_shape(module: nn.Module, model_config) -> tuple[int, int]:
    """(query heads, head dim) of a host attention module."""
    heads = model_config.num_attention_heads
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "head_size", None)
        or getattr(module, "attention_head_size", None)
        or model_config.hidden_size // heads
    )
    return heads, head_dim


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


def _chosen_layers(layers, available: list[int]) -> list[int]:
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


# --- masks -------------------------------------------------------------------------


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) bool from a 4D host mask (bool, or additive with 0 where allowed)."""
    mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


def _key_info(allowed: torch.Tensor, q_offset: int, padding: torch.Tensor | None) -> KeyInfo:
    """Compare a (B, Q, K) host mask with the causal and bidirectional rules over `padding`."""
    b, n_q, n_k = allowed.shape
    if padding is None:  # a key that some query may see is a real key
        padding = allowed.any(dim=1)
    padding = padding.to(device=allowed.device, dtype=torch.bool).expand(b, n_k)
    i = q_offset + torch.arange(n_q, device=allowed.device)[:, None]
    j = torch.arange(n_k, device=allowed.device)[None, :]
    real = padding[:, None, :]
    plain_causal = bool((allowed == (real & (j <= i))).all())
    plain_bidirectional = bool((allowed == real).all())
    return KeyInfo(None if bool(padding.all()) else padding, q_offset, plain_causal, plain_bidirectional)


def _keys_for_call(mask, n_q: int, n_k: int) -> KeyInfo:
    info = getattr(mask, "toroidal_keys", None)
    if info is not None:
        return info
    if mask is None:  # SDPA's "use is_causal" / "no mask": no padding
        return KeyInfo(None, 0 if n_q > 1 else n_k - 1, True, True)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # a 4D mask given by the caller
        return _key_info(_allowed(mask), n_k - n_q, None)
    raise TypeError(f"toroidal layers cannot read a host attention mask of type {type(mask).__name__}")


def host_keys(label: str, mask, n_q: int, n_k: int, causal: bool) -> KeyInfo:
    """The kernel's view of the host mask; refuses a mask that is not plain causal or bidirectional."""
    keys = _keys_for_call(mask, n_q, n_k)
    if not (keys.plain_causal if causal else keys.plain_bidirectional):
        kind = "causal" if causal else "bidirectional"
        raise ValueError(
            f"{label}: the host attention mask is not plain {kind} attention with "
            "padding (a sliding window that bites, packed sequences or a custom mask); these layers "
            "take only key padding, causality and their own window"
        )
    return keys


def _mask_function(fallback: str):
    """The previous mask function, with the kernel's view of the keys attached to its mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, prepare_padding_mask

    def build(**kwargs):
        mask = ALL_MASK_ATTENTION_FUNCTIONS[fallback](**kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kv_length, kv_offset = kwargs["kv_length"], int(kwargs.get("kv_offset", 0))
            padding = prepare_padding_mask(kwargs.get("attention_mask"), kv_length, kv_offset)
            if padding is not None:
                padding = padding[:, kv_offset : kv_offset + kv_length]
            q_offset = int(kwargs.get("q_offset", 0)) - kv_offset
            mask.toroidal_keys = _key_info(_allowed(mask), q_offset, padding)
        return mask

    return build


# --- attention ---------------------------------------------------------------------


def _fallback_function(fallback: str, module: nn.Module):
    """The function the host would call for `fallback` (eager is each family's own)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(fallback, eager)


def _toroidal_forward(module, query, key, value, attention_mask, scaling=None, is_causal=None, **kwargs):
    state: LayerState = module.toroidal
    cfg = state.config
    n_q, n_k = query.shape[2], key.shape[2]
    if query.shape[1] != state.heads or query.shape[-1] != state.head_dim:
        raise ValueError(
            f"toroidal layer {state.layer} was set up for {state.heads} heads of {state.head_dim} dims, "
            f"got queries {tuple(query.shape)} (B, H, N, e)"
        )
    stream = getattr(module, "toroidal_stream", None)
    if stream is not None:  # streaming (.streaming): a latent state instead of keys
        return stream.step(module, query, key, value, scaling)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    keys = host_keys(f"toroidal layer {state.layer}", attention_mask, n_q, n_k, causal)
    if state.order is not None:
        order = state.order_on(query.device)
        query, key = query.index_select(-1, order), key.index_select(-1, order)
    period = cfg.period if cfg.period is not None else (cfg.max_len if causal else n_k)
    capturing = state.captured is not None
    out, weights = toroidal_attention(
        query,
        key,
        value,
        depth=cfg.depth,
        lambda_distance=cfg.lambda_distance,
        period=period,
        causal=causal,
        window=cfg.window,
        key_padding_mask=keys.padding,
        scale=scaling,
        backend="reference" if capturing else cfg.backend,
        q_offset=keys.q_offset,
        return_weights=capturing,
        always_tuple=True,
    )
    if capturing:
        state.captured.append(weights.detach())
    out = getattr(module, FUSION_ATTR)(out)
    out = F.dropout(out, cfg.dropout, training=module.training)
    # The interface returns (B, N, H, e) and the attention weights (never materialized here).
    return out.transpose(1, 2).contiguous(), None


def _attention_function(fallback: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if getattr(module, "toroidal", None) is None:
            return _fallback_function(fallback, module)(
                module, query, key, value, attention_mask, *args, **kwargs
            )
        return _toroidal_forward(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _register(fallback: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = PREFIX + fallback
    AttentionInterface.register(name, _attention_function(fallback))
    AttentionMaskInterface.register(name, _mask_function(fallback))
    return name


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
    chosen = _chosen_layers(layers, sorted(modules))
    if any(_fallback_function(previous, m) is None for m in modules.values()):
        raise ValueError(f"{type(model).__name__} has no eager attention function to keep in other layers")
    return modules, chosen, _rotary_dim(model)


# --- public API --------------------------------------------------------------------


@contextmanager
def capture_attention(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Within the block, toroidal layer `layer` runs the reference backend and appends the weights of
    every call, (B, H, N_q*D, N_k*D) platter-token weights, to the yielded list."""
    state = getattr(attention_modules(model).get(layer), "toroidal", None)
    if state is None:
        raise ValueError(f"layer {layer} is not a toroidal layer; toroidal layers: {toroidal_layers(model)}")
    state.captured = captured = []
    try:
        yield captured
    finally:
        state.captured = None


def is_toroidal(model: nn.Module) -> bool:
    """Whether `apply_toroidal` is in effect on `model`."""
    return str(model.config._attn_implementation).startswith(PREFIX)


def toroidal_layers(model: nn.Module) -> list[int]:
    """Indices of the layers running toroidal attention."""
    return sorted(i for i, m in attention_modules(model).items() if getattr(m, "toroidal", None) is not None)


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
    previous = model.config._attn_implementation
    if is_toroidal(model):
        raise ValueError("toroidal attention is already applied to this model; call remove_toroidal first")
    modules, chosen, rotary_dim = host_layers(model, layers, "apply_toroidal")
    # Check every layer before changing any.
    plans = []
    for layer in chosen:
        module = modules[layer]
        heads, head_dim = _head_shape(module, model.config)
        order = platter_order(head_dim, config.depth, min(rotary_dim, head_dim))
        plans.append((layer, module, heads, head_dim, order))

    name = _register(previous)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
    for layer, module, heads, head_dim, order in plans:
        reference = next(module.parameters())
        fusion = DepthFusion(config.fusion, heads, config.depth, config.fusion_rank)
        module.add_module(FUSION_ATTR, fusion.to(device=reference.device, dtype=reference.dtype))
        module.toroidal = LayerState(config, layer, heads, head_dim, order)
    return model


def remove_toroidal(model: nn.Module) -> nn.Module:
    """Undo `apply_toroidal`: the previous attention implementation, no fusion modules."""
    if not is_toroidal(model):
        raise ValueError("toroidal attention is not applied to this model")
    for module in attention_modules(model).values():
        if getattr(module, "toroidal", None) is not None:
            del module.toroidal
            delattr(module, FUSION_ATTR)
    model.set_attn_implementation(model.config._attn_implementation.removeprefix(PREFIX))
    return model


def load_toroidal_weights(model: nn.Module, source) -> None:
    """Load the fusion parameters of a toroidal model saved with `save_pretrained`.

    `source`: a save directory, a .safetensors file or a state dict. Every fusion
    parameter of `model` must be found; extra fusion parameters are an error too.
    """
    fix = "apply_toroidal with the config and layers the model was saved with"
    load_attached_weights(model, source, FUSION_ATTR, "fusion", fix)


def load_attached_weights(model: nn.Module, source, attr: str, what: str, fix: str) -> None:
    """Load the tensors of the submodules named `attr` that an integration attached (see above)."""
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

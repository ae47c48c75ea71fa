"""Any mechanism, toroidal attention included, inside a Hugging Face transformers model.

    from toroidal.integrations.transformers import apply_mechanism, apply_toroidal, remove_mechanism

`host.py` is the host plumbing, `attach.py` the one attacher every mechanism plugs in through,
`toroidal.py` and `mechanisms.py` the public ways in, `streaming.py` latent-state decoding.
"""

from toroidal.integrations.transformers.attach import KERNEL_ATTR
from toroidal.integrations.transformers.host import (
    attention_modules,
    host_keys,
    host_layers,
    learned_positions,
    max_positions,
    platter_order,
)
from toroidal.integrations.transformers.mechanisms import (
    applied_mechanism,
    apply_mechanism,
    length_refusal,
    load_mechanism_weights,
    mechanism_layers,
    mechanism_metrics,
    plug_mechanism,
    remove_mechanism,
    reset_mechanism_metrics,
    summarize_metrics,
)
from toroidal.integrations.transformers.streaming import (
    check_streamable,
    reset_streams,
    stream_logits,
    streaming_layers,
)
from toroidal.integrations.transformers.toroidal import (
    FUSION_ATTR,
    apply_toroidal,
    capture_attention,
    is_toroidal,
    load_toroidal_weights,
    remove_toroidal,
    toroidal_layers,
)

__all__ = [
    "FUSION_ATTR",
    "KERNEL_ATTR",
    "applied_mechanism",
    "apply_mechanism",
    "apply_toroidal",
    "attention_modules",
    "capture_attention",
    "check_streamable",
    "host_keys",
    "host_layers",
    "is_toroidal",
    "learned_positions",
    "length_refusal",
    "load_mechanism_weights",
    "load_toroidal_weights",
    "max_positions",
    "mechanism_layers",
    "mechanism_metrics",
    "platter_order",
    "plug_mechanism",
    "remove_mechanism",
    "remove_toroidal",
    "reset_mechanism_metrics",
    "reset_streams",
    "stream_logits",
    "streaming_layers",
    "summarize_metrics",
    "toroidal_layers",
]

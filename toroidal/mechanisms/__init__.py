"""Attention mechanisms compared side by side: `standard`, `toroidal`, and the others registered here.

A mechanism is a way to turn per-head q, k, v into per-head outputs. Each one builds a
*kernel module* with this contract:

    kernel = get_mechanism(name).build_kernel(heads, head_dim, **options)
    out = kernel(q, k, v, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None)
    # q: (B, H, N_q, e); k, v: (B, H, N_k, e); key_padding_mask: (B, N_k), True for real keys;
    # scale None: e ** -0.5 (or the mechanism's own); q_offset: position of the first query;
    # sliding_window W: a host's key window, |i - j| < W. out: (B, H, N_q, e), same dtype as q.
    kernel.get_metrics()   # plain dict of what the mechanism measured since reset_metrics()
    kernel.reset_metrics()

Learned parameters of a mechanism (depth fusion, curvature, gates) live in its kernel
module, so the same kernel serves the standalone layer (`build_attention`), a Hugging Face
model (`toroidal.integrations.transformers.apply_mechanism`) and `toroidal bench`. `options`
are the mechanism's own keywords; unknown ones raise ValueError naming the accepted ones.
"""

from toroidal.mechanisms.base import KernelModule, Mechanism, MechanismAttention, check_options
from toroidal.mechanisms.registry import (
    build_attention,
    build_kernel,
    get_mechanism,
    mechanism_names,
    register_mechanism,
)

__all__ = [
    "KernelModule",
    "Mechanism",
    "MechanismAttention",
    "build_attention",
    "build_kernel",
    "check_options",
    "get_mechanism",
    "mechanism_names",
    "register_mechanism",
]

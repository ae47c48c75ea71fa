"""`KVCache`: the rotated keys and values of the positions a causal `ToroidalAttention` has seen.

    cache = KVCache()
    for x_t in tokens:  # (B, 1, d_model) each, or chunks (B, n, d_model)
        y_t, _ = attention(x_t, cache=cache)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """keys, values: (B, H, N_cached, e), or None before the first call."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Positions cached so far: the position of the next token."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys and values of new positions; returns all of them (cached first).

        Concatenation (not a preallocated buffer) keeps earlier steps' tensors intact,
        so gradients flow through a decoded sequence.
        """
        if self.keys is not None:
            if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
                raise ValueError(
                    f"new keys {tuple(keys.shape)} do not match the cached {tuple(self.keys.shape)} "
                    "(B, H, N, e); use one cache per sequence batch"
                )
            keys, values = torch.cat((self.keys, keys), dim=2), torch.cat((self.values, values), dim=2)
        self.keys, self.values = keys, values
        return keys, values

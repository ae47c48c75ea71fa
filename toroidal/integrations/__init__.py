"""Integrations of toroidal attention with other libraries.

- `toroidal.integrations.transformers`: toroidal attention inside Hugging Face transformers
  models through their attention interface (`apply_toroidal`, `remove_toroidal`).

Each integration imports its library lazily: importing `toroidal` never requires them.
"""

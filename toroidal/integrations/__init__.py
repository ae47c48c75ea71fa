"""Integrations of toroidal attention with other libraries.

- `toroidal.integrations.transformers`: toroidal attention inside Hugging Face transformers
  models through their attention interface (`apply_toroidal`, `remove_toroidal`).
- `toroidal.integrations.lm_eval`: the `toroidal` model of lm-evaluation-harness (an HFLM
  subclass); `python -m toroidal.integrations.lm_eval` runs lm-eval's command line with it.

Each integration imports its library lazily: importing `toroidal` never requires them.
"""

"""Integrations of toroidal attention with other libraries.

- `toroidal.integrations.transformers`: any mechanism, toroidal attention included, inside
  Hugging Face transformers models through their attention interface.
- `toroidal.integrations.lm_eval`: the `toroidal` model of lm-evaluation-harness (an HFLM
  subclass); `python -m toroidal.integrations.lm_eval` runs lm-eval's command line with it.

Each integration imports its library lazily: importing `toroidal` never requires them.
"""

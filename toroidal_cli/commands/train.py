"""`toroidal train`: train a model with toroidal attention (not implemented yet)."""

from toroidal_cli.errors import STUB_SETTINGS, not_implemented

HELP = "Train a language model with toroidal attention from a YAML config or flags (not implemented yet)."
CONTEXT_SETTINGS = STUB_SETTINGS


def command() -> None:
    not_implemented()

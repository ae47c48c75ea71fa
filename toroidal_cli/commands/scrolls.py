"""`toroidal scrolls`: run SCROLLS long-document tasks (not implemented yet)."""

from toroidal_cli.errors import STUB_SETTINGS, not_implemented

HELP = "Run SCROLLS long-document tasks on a checkpoint (not implemented yet)."
CONTEXT_SETTINGS = STUB_SETTINGS


def command() -> None:
    not_implemented()

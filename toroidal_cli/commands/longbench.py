"""`toroidal longbench`: run LongBench long-context tasks (not implemented yet)."""

from toroidal_cli.errors import STUB_SETTINGS, not_implemented

HELP = "Run LongBench long-context tasks on a checkpoint (not implemented yet)."
CONTEXT_SETTINGS = STUB_SETTINGS


def command() -> None:
    not_implemented()

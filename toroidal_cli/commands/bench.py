"""`toroidal bench`: benchmark backends and toroidal vs standard attention (not implemented yet)."""

from toroidal_cli.errors import STUB_SETTINGS, not_implemented

HELP = "Benchmark speed and memory of the backends and of standard attention (not implemented yet)."
CONTEXT_SETTINGS = STUB_SETTINGS


def command() -> None:
    not_implemented()

"""`toroidal profile`: profile one forward/backward pass (not implemented yet)."""

from toroidal_cli.errors import STUB_SETTINGS, not_implemented

HELP = "Profile one forward and backward pass: time and memory per operation (not implemented yet)."
CONTEXT_SETTINGS = STUB_SETTINGS


def command() -> None:
    not_implemented()

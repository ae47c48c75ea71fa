"""`toroidal eval`: evaluate a checkpoint (perplexity, lm-eval tasks) (not implemented yet)."""

from toroidal_cli.errors import STUB_SETTINGS, not_implemented

HELP = "Evaluate a checkpoint: perplexity and lm-evaluation-harness tasks (not implemented yet)."
CONTEXT_SETTINGS = STUB_SETTINGS


def command() -> None:
    not_implemented()

"""Errors of training and evaluation setup that the user can fix (bad option, missing or corrupt file)."""

from __future__ import annotations


class SetupError(ValueError):
    """A run cannot start as configured. `message` names the problem, `fix` (optional) what to do.

    The CLI turns it into its one-line user error; library callers get a ValueError.
    """

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message if not fix else f"{message}; {fix}")
        self.message, self.fix = message, fix


class CheckpointError(SetupError):
    """A checkpoint or run folder is missing, incomplete, corrupt or of another model."""

"""Errors a user can cause: one red line naming the problem and the fix, no traceback.

Commands raise `UserError`; `user_errors` (wrapped around every command by the app)
prints it and exits with its code. A missing optional package (transformers without the
`eval` extra, ...) is one line too, naming the extra to install. Typer's own usage errors
(unknown option, bad value type) keep Typer's formatting and exit code 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.text import Text

from toroidal.runtime.install import missing_module_message
from toroidal_cli.render import err_console


class UserError(Exception):
    """A problem the user can fix: `message` names it, `fix` (optional) says what to do."""

    def __init__(self, message: str, fix: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message, self.fix, self.exit_code = message, fix, exit_code

    def line(self) -> str:
        text = self.message if not self.fix else f"{self.message}; {self.fix}"
        return " ".join(text.split())  # one line, whatever the message contained

    def __str__(self) -> str:
        return self.line()


def print_user_error(error: UserError, prefix: str = "toroidal") -> None:
    # soft_wrap: never break the line at the terminal width; Text: no markup parsing of user input.
    err_console.print(Text(f"{prefix}: {error.line()}", style="bold red"), soft_wrap=True)


@contextmanager
def as_user_error(fix: str) -> Iterator[None]:
    """Turn a ValueError from validating user input (e.g. `ToroidalConfig(...)`) into a UserError."""
    try:
        yield
    except ValueError as error:
        raise UserError(str(error), fix) from None


def missing_extra(error: ModuleNotFoundError) -> UserError | None:
    """`needs transformers, from the eval extra: pip install ...` when `error` is an optional package's."""
    message = missing_module_message(error.name)
    return None if message is None else UserError(message)


def user_errors(name: str) -> Callable[[Callable], Callable]:
    """Decorator for a command callback: UserError (or a missing optional package) -> red line prefixed
    `toroidal <name>:` and exit code."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)  # keeps the signature Typer reads the options from
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except UserError as error:
                print_user_error(error, prefix=f"toroidal {name}")
                raise typer.Exit(error.exit_code) from None
            except ModuleNotFoundError as error:
                missing = missing_extra(error)
                if missing is None:
                    raise
                print_user_error(missing, prefix=f"toroidal {name}")
                raise typer.Exit(missing.exit_code) from None
            except KeyboardInterrupt:
                err_console.print(Text(f"toroidal {name}: interrupted", style="bold red"), soft_wrap=True)
                raise typer.Exit(130) from None

        return wrapper

    return decorate

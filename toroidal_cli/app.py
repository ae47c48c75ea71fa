"""The `toroidal` command: eight subcommands, one module each, registered here in help order.

Building the app imports no torch (`import toroidal` is lazy; command modules import the library
when they run), so `--help`, `--version` and mistakes in options answer at once.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

import toroidal
from toroidal_cli.errors import UserError, missing_extra, print_user_error, user_errors
from toroidal_cli.help import Command, Group

# Help order. Each name is a module in toroidal_cli/commands (see its __init__ for the contract).
COMMAND_NAMES = ("train", "eval", "bench", "longbench", "scrolls", "profile", "validate", "plot")
COMMANDS = {name: importlib.import_module(f"toroidal_cli.commands.{name}") for name in COMMAND_NAMES}

app = typer.Typer(
    name="toroidal",
    help="Train, benchmark, evaluate and validate toroidal attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    cls=Group,
)

for _name, _module in COMMANDS.items():
    if hasattr(_module, "app"):  # a command with subcommands (e.g. `toroidal plot bench`): a Typer sub-app
        app.add_typer(_module.app, name=_name, help=_module.HELP)
        continue
    app.command(
        _name, cls=Command, help=_module.HELP, context_settings=getattr(_module, "CONTEXT_SETTINGS", None)
    )(user_errors(_name)(_module.command))


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"toroidal {toroidal.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Train, benchmark, evaluate and validate toroidal attention."""


def main() -> None:
    try:
        app(prog_name="toroidal")
    except UserError as error:  # raised outside a command (commands handle their own)
        print_user_error(error)
        sys.exit(error.exit_code)
    except ModuleNotFoundError as error:  # an optional package, needed outside a command
        missing = missing_extra(error)
        if missing is None:
            raise
        print_user_error(missing)
        sys.exit(missing.exit_code)

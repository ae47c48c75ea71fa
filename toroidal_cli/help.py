"""How options read in `--help`: a flag as its name alone (`--freeze-base`, `--causal / --no-causal`),
a value as INT, FLOAT, TEXT or PATH, instead of the Python types Typer shows (`<bool>`, `<str>`,
`<list[str]>`).

Every command and group of the app is built with `Command` or `Group` (`toroidal_cli.app`, and
the sub-app of `toroidal plot`); they name the value of each option that has no metavar of its
own (`typer.Option(metavar=...)` wins). Only the help changes: parsing and error messages do not
read an option's metavar.
"""

from __future__ import annotations

import typing
from pathlib import Path

from typer.core import TyperArgument, TyperCommand, TyperGroup

_NAMES = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def value_name(annotation) -> str:
    """INT, FLOAT, TEXT or PATH for a parameter's annotation (a list: its items' name)."""
    if typing.get_origin(annotation) in (list, tuple):
        (annotation, *_) = typing.get_args(annotation) or (str,)
    if isinstance(annotation, type):
        for kind, name in _NAMES.items():
            if issubclass(annotation, kind):
                return name
        return annotation.__name__.upper()
    return "TEXT"


class _Argument(TyperArgument):
    """An argument whose type column reads PATH... rather than `<list[Path]>` (usage line unchanged)."""

    def display_type_rich(self, ctx) -> str:
        name = value_name(self.type_descriptor.annotation)
        return f"{name}..." if self.nargs != 1 else name


def _name_values(params: list) -> list:
    for param in params:
        if param.param_type_name == "argument" and type(param) is TyperArgument:
            param.__class__ = _Argument  # adds one help method, no state
        elif param.param_type_name == "option" and param.metavar is None:
            flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
            param.metavar = "" if flag else value_name(param.type_descriptor.annotation)
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _name_values(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx):
        return _name_values(super().get_params(ctx))

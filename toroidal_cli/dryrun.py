"""`--dry-run` for every command: the resolved configuration, where each value came from, the
memory estimate; then exit 0 having run and written nothing.

A value's source is `flag` (given on the command line), the config file or preset that set it,
a run folder's own options (`eval --checkpoint`), or `default`. Commands collect their resolved
values as `Setting`s with `settings(...)` and hand them to `show(...)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.text import Text

from toroidal.runtime import memory
from toroidal_cli import render
from toroidal_cli.memory_check import verdict
from toroidal_cli.resolve import from_command_line

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the resolved configuration, each value's source and the memory estimate; run nothing.",
    ),
]
FLAG, DEFAULT = "flag", "default"


@dataclass(frozen=True)
class Setting:
    key: str
    value: object
    source: str


def settings(
    ctx: typer.Context,
    values: Mapping[str, object],
    *,
    from_file: Iterable[str] = (),
    file_label: str | None = None,
    params: Mapping[str, str] | None = None,
    fallback: str = DEFAULT,
) -> list[Setting]:
    """One Setting per value: `flag` if its option was given, `file_label` if the file set it, else
    `fallback`. `params` maps a value's key to its option's parameter name where they differ."""
    params = params or {}
    from_file = set(from_file)
    out = []
    for key, value in values.items():
        param = params.get(key, key)
        if param in ctx.params and from_command_line(ctx, param):
            source = FLAG
        elif key in from_file or param in from_file:
            source = file_label or "config file"
        else:
            source = fallback
        out.append(Setting(key, value, source))
    return out


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


_SOURCE_STYLES = {FLAG: "bold", DEFAULT: "dim"}


def show(
    command: str,
    resolved: list[Setting],
    footprint: memory.Footprint | None = None,
    memory_line: str | None = None,
    notes: Iterable[str] = (),
    **fit_flags: str,
) -> None:
    """Print the settings table, the memory verdict of `footprint` (or `memory_line`) and the notes."""
    columns = [
        render.Column("key", "setting", no_wrap=True),
        render.Column("value", "value", format=lambda v: Text(_text(v))),
        render.Column("source", "source", format=lambda s: Text(s, style=_SOURCE_STYLES.get(s, "cyan"))),
    ]
    rows = [{"key": s.key, "value": s.value, "source": s.source} for s in resolved]
    table = render.table(rows, columns, title=f"toroidal {command} --dry-run")
    for column in table.columns[1:]:
        column.overflow = "fold"  # a resolved path or list is shown whole, never cut with an ellipsis
    render.console.print(table)
    if footprint is not None:
        result = verdict(footprint, **fit_flags)
        line = result.summary if result.fits else f"would be refused: {result.summary}; {result.fix}"
        render.console.print(Text(f"memory: {line}", style="" if result.fits else "bold red"), soft_wrap=True)
    elif memory_line is not None:
        render.console.print(Text(f"memory: {memory_line}"), soft_wrap=True)
    for note in notes:
        render.console.print(Text(f"note: {note}", style="dim"), soft_wrap=True)
    render.console.print(Text("dry run: nothing was run or written", style="dim"))

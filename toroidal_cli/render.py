"""Rich output for every command: consoles, tables from dict rows, status colours, number formats
(progress: `toroidal_cli.progress`).

The library never prints; commands print through the consoles here (results on
stdout, errors on stderr).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Piped or logged output (no terminal, no COLUMNS) gets room for wide tables instead of Rich's 80.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140
console = Console(width=_WIDTH)
err_console = Console(stderr=True)

STATUS_STYLES = {"pass": "bold green", "fail": "bold red", "skip": "yellow"}


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its header, and how a value becomes text."""

    key: str
    header: str | None = None
    format: Callable[[object], str | Text] | None = None
    justify: str = "left"
    style: str | None = None
    no_wrap: bool = False


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def format_number(value, digits: int = 3) -> str:
    """Compact numbers: '-' for missing, scientific notation for very small or large magnitudes."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.{digits}g}"  # 1e-05, 5.96e-08
    return f"{value:.{digits + 1}g}"  # 1000, 0.05991


def format_tokens_per_s(value) -> str:
    """tokens/s, written the same by every command: whole tokens with thousands separators
    ('83,012'), three significant digits below 100 ('12.3'); '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cell(column: Column, row: dict) -> Text:
    value = row.get(column.key)
    if column.format is not None:
        cell = column.format(value)
    elif column.key == "status" and isinstance(value, str):
        cell = status_text(value)
    else:
        cell = format_number(value)
    # Text, not str: values such as 'pip install "toroidal-attention[gpu]"' are not Rich markup.
    return cell if isinstance(cell, Text) else Text(cell)


def table(rows: Sequence[dict], columns: Sequence[Column], title: str | None = None) -> Table:
    """A Rich table with one line per row dict and one column per spec."""
    out = Table(title=title, header_style="bold")
    for column in columns:
        out.add_column(
            column.header or column.key, justify=column.justify, style=column.style, no_wrap=column.no_wrap
        )
    for row in rows:
        out.add_row(*(_cell(column, row) for column in columns))
    return out

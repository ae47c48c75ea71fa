"""Progress of a long command (bench rows, train steps, eval batches, validate checks), on stderr.

On a terminal it is a Rich progress bar, gone when the command ends. Piped into a log or CI
(stdout or stderr not a terminal), a bar would draw nothing until the end, so each step becomes a
plain line instead, `bench: row 3/12 sdpa N=1024 D=2 fwd 12.3 ms`, at most `per_second` lines a
second: the first and the last always, the ones between as time allows. Results stay on stdout.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from toroidal_cli import render

PER_SECOND = 2.0
# What a plain progress line looks like (errors start with `toroidal <command>:` instead).
LINE = re.compile(r"^[a-z]+: [a-z]+ \d+(/\d+)?\b")


def default_columns() -> list[ProgressColumn]:
    """The bar's columns: spinner, what runs now, bar, done/total, time so far."""
    return [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()] + [
        TimeElapsedColumn()
    ]


def on_terminal() -> bool:
    """Whether a bar can be seen: stdout (the results) and stderr (the bar) both on a terminal."""
    return sys.stdout.isatty() and render.err_console.is_terminal


class Progress:
    """`with Progress("bench", "row", total=12) as progress:` then `progress.advance(text)` per row
    done (or `progress.update(done, total=..., text=...)`), `progress.running(text)` for what is
    being worked on (the bar's label; no line), `progress.note(text)` for a line of its own."""

    def __init__(
        self,
        command: str,
        unit: str,
        total: int | None = None,
        *,
        columns: Sequence[ProgressColumn] | None = None,
        label: str | None = None,
        plain: bool | None = None,
        per_second: float = PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.command, self.unit, self.total, self.done = command, unit, total, 0
        self.plain = not on_terminal() if plain is None else plain
        self.interval, self.clock = 1.0 / per_second, clock
        self.last_shown: float | None = None  # when the last line was printed
        self.pending: str | None = None  # the newest line not printed (rate-limited)
        self.bar = None
        if not self.plain:
            columns = columns or default_columns()
            self.bar = RichProgress(*columns, console=render.err_console, transient=True)
            self.task = self.bar.add_task(command if label is None else label, total=total)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.pending is not None:  # the last state is always shown, however the command ended
            self._print(self.pending)

    def start(self, total: int | None, done: int = 0) -> None:
        """The total becomes known (and, resuming, what was done before): no line of its own."""
        self.total, self.done = total, done
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

    def running(self, text: str) -> None:
        """What is being worked on now: the bar's label (no plain line: one comes when it is done)."""
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, text: str = "", steps: int = 1) -> None:
        self.update(self.done + steps, text=text)

    def update(self, done: int | None = None, *, total: int | None = None, text: str | None = None) -> None:
        """`done` of `total` (None: unchanged) are finished; `text` says what (bar label, line end)."""
        self.done = self.done if done is None else done
        self.total = self.total if total is None else total
        if self.bar is not None:
            fields = {} if text is None else {"description": text}
            self.bar.update(self.task, completed=self.done, total=self.total, **fields)
            return
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        line = f"{self.command}: {self.unit} {count}" + (f" {text}" if text else "")
        now = self.clock()
        last = self.total is not None and self.done >= self.total
        if self.last_shown is None or last or now - self.last_shown >= self.interval:
            self._print(line)
        else:
            self.pending = line

    def note(self, text: str | Text) -> None:
        """A line of its own on stderr (above the bar on a terminal), e.g. an evaluation's result."""
        render.err_console.print(text, soft_wrap=True, highlight=False)

    def _print(self, line: str) -> None:
        render.err_console.print(Text(line), soft_wrap=True, highlight=False)
        self.last_shown, self.pending = self.clock(), None

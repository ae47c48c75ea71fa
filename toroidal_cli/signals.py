"""Ctrl-C (SIGINT) and SIGTERM during long commands: stop at the next safe point, or now.

The first signal sets a flag that the library polls between units of work (training steps,
bench rows), so the command can save what it has (a checkpoint, the rows so far) and exit
with 130 (SIGINT) or 143 (SIGTERM), the shell's codes for those signals. A second signal
leaves at once: every file is written under a temporary name and renamed when complete,
so leaving mid-write corrupts nothing already on disk.

    with StopSignals("the current step") as stop:
        result = train(config, out, should_stop=stop)
    if stop.received:
        raise typer.Exit(stop.exit_code)
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """A context that turns the first SIGINT/SIGTERM into a stop request; calling it asks for one."""

    def __init__(self, safe_point: str):
        self.safe_point = safe_point  # "the current step": said when the first signal arrives
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1)

    @property
    def name(self) -> str | None:
        return self.received.name if self.received is not None else None

    def _handle(self, number: int, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number)
            again = "Ctrl-C" if number == signal.SIGINT else "the signal"
            # os.write: safe inside a signal handler, unlike print or Rich
            os.write(
                2, f"\n{self.name}: stopping after {self.safe_point} ({again} again to quit now)\n".encode()
            )
            return
        if number == signal.SIGINT:
            raise KeyboardInterrupt  # the command wrapper exits 130 without a traceback
        raise SystemExit(EXIT_CODES[signal.Signals(number)])

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for number in EXIT_CODES:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

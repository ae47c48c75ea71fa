"""CPU isolation for the bench: a helper interpreter that has imported torch but never computes,
and each job run in a fresh fork of it, so that a row's peak resident-set growth is its own.

Forking the benchmarking process itself would hang: GNU OpenMP, which torch's CPU kernels use,
deadlocks in a forked child once the parent has run a parallel region. Jobs and replies cross
the pipe as length-framed pickles; this is the one module of the bench that unpickles.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Importing `toroidal.bench` loads torch and every measuring function once, in the worker,
# before any fork: a fork then counts only what its job allocates.
WORKER_COMMAND = "from toroidal.bench.worker import serve; serve()"


class WorkerDied(RuntimeError):
    """The forked measurement ended without a result (killed, e.g. by the kernel's OOM killer)."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number


def _write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_frame(stream) -> bytes | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    return data if len(data) == size else None


def _execute(payload: bytes) -> bytes:
    """Run a pickled (function, kwargs) and pickle ("ok", value) or ("error", exception)."""
    try:
        func, kwargs = pickle.loads(payload)
        reply = ("ok", func(**kwargs))
    except BaseException as error:  # the parent decides what an exception means
        reply = ("error", error)
    try:
        return pickle.dumps(reply)
    except Exception:
        error = reply[1]
        return pickle.dumps(("error", RuntimeError(f"{type(error).__name__}: {error}")))


def _describe_exit(status: int) -> tuple[str, int | None]:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        hint = " (likely the kernel's out-of-memory killer)" if number == signal.SIGKILL else ""
        return f"measurement process killed by {name}{hint}", number
    return f"measurement process exited with code {os.WEXITSTATUS(status)} and no result", None


def _run_forked(payload: bytes) -> bytes:
    """One job in a fresh fork of this (never computing) worker, so its memory is its own."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, reply, and leave without running any cleanup of the worker
        code = 1
        try:
            os.close(read_end)
            reply = _execute(payload)
            with os.fdopen(write_end, "wb") as out:
                out.write(reply)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        reply = inp.read()
    _, status = os.waitpid(pid, 0)
    if reply:
        return reply
    message, number = _describe_exit(status)
    return pickle.dumps(("died", (message, number)))


def serve() -> None:
    """The worker's loop: framed pickled jobs on stdin, framed pickled replies on the original stdout."""
    # Ctrl-C reaches the whole process group: the parent decides whether a sweep stops, and it
    # stops between rows, so the row in flight here finishes (a second Ctrl-C ends the parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the reply stream
    while (payload := _read_frame(requests)) is not None:
        _write_frame(replies, _run_forked(payload))


def can_isolate() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


class ForkWorker:
    """A helper interpreter that imports torch and never computes; each job runs in a new fork of it.

    Started lazily by the first `call`; use as a context manager to stop it.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])  # the folder that holds the `toroidal` package
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (kept open for the worker's life)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        return self._proc

    def _last_error_line(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def call(self, func: Callable, **kwargs):
        """`func(**kwargs)` in a fresh fork of the worker; its exception is raised here."""
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        try:
            _write_frame(proc.stdin, pickle.dumps((func, kwargs)))
            data = _read_frame(proc.stdout)
        except BrokenPipeError:
            data = None
        if data is None:
            raise WorkerDied(f"the benchmark worker stopped: {self._last_error_line() or 'no message'}")
        status, value = pickle.loads(data)
        if status == "ok":
            return value
        if status == "error":
            raise value
        raise WorkerDied(*value)

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> ForkWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def runner(isolate: bool) -> Iterator[Callable]:
    """A `run(func, **kwargs)`: in a fresh fork of a clean worker, or in this process."""
    if not isolate:
        yield lambda func, **kwargs: func(**kwargs)
        return
    with ForkWorker() as worker:
        yield worker.call

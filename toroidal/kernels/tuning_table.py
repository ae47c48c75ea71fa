"""Tuning tables: the measured fastest backend (and tile size) per device, dtype and shape bucket.

`toroidal bench --tune` (`toroidal.bench.tune`) measures them; `auto` (`toroidal.kernels.select`)
consults the table first: an entry for the call's bucket whose backend can serve the call
decides, otherwise the built-in defaults apply. The table is read once per process, on the
first `auto` call (`reload()` forgets it, so the next call reads the file again).

A bucket is (device, dtype, query and key platter-tokens each rounded to the nearest
power of two, causal, training). The device is `cpu`, or `cuda:<GPU name>`.

Where the table lives: `$TOROIDAL_TUNING_FILE` if set (`off`, `none` or empty: no table),
else `$XDG_CACHE_HOME/toroidal/tuning.json` (`~/.cache/...` without XDG_CACHE_HOME).
A table that cannot be read or fails validation is ignored by `auto`, with one
`TuningTableWarning` naming the file and the problem (never an exception mid-run);
`read_table` raises `TuningTableError` for the same problems.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from toroidal.kernels.base import Backend, KernelRequest, backend_names, get_backend
from toroidal.runtime.devices import DTYPES

SCHEMA = {"name": "toroidal.kernels.tuning_table", "version": 1}
ENV_VAR = "TOROIDAL_TUNING_FILE"
_OFF = ("", "off", "none")
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # the bucket names of dtypes


class TuningTableError(ValueError):
    """A tuning table that cannot be read or does not follow the format."""


class TuningTableWarning(UserWarning):
    """`auto` ignored a tuning table (the message says which and why)."""


def default_path() -> Path | None:
    """Where `auto` looks for the table; None when `$TOROIDAL_TUNING_FILE` turns tables off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "toroidal" / "tuning.json"


def nearest_power_of_two(n: int) -> int:
    """2 ** round(log2 n), for n >= 1."""
    return 2 ** round(math.log2(max(n, 1)))


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_label(device_type: str) -> str:
    """`cpu`, or `cuda:<name of the current GPU>` (tables from one GPU model do not steer another)."""
    if device_type == "cuda" and torch.cuda.is_available():
        return f"cuda:{_cuda_name(torch.cuda.current_device())}"
    return device_type


@dataclass(frozen=True)
class Bucket:
    """The shape class an entry answers for."""

    device: str
    dtype: str
    queries: int  # query platter-tokens, nearest power of two
    keys: int  # key platter-tokens, nearest power of two
    causal: bool
    training: bool

    @classmethod
    def for_request(cls, request: KernelRequest) -> Bucket:
        depth = request.geometry.depth
        return cls(
            device=device_label(request.device_type),
            dtype=DTYPE_NAMES.get(request.dtype, str(request.dtype)),
            queries=nearest_power_of_two(request.n_queries * depth),
            keys=nearest_power_of_two(request.n_keys * depth),
            causal=request.geometry.causal,
            training=request.requires_grad,
        )


@dataclass(frozen=True)
class TunedEntry:
    """The winner of one bucket and what every candidate measured (median ms; None: could not run)."""

    bucket: Bucket
    backend: str
    tile: int | None  # blockwise tile size; None for backends without one
    median_ms: float
    measured: dict[str, float | None] = field(default_factory=dict)  # "sdpa", "blockwise/tile=128"
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it did not run

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data.pop("bucket"), **data}


@dataclass
class TuningTable:
    entries: dict[Bucket, TunedEntry] = field(default_factory=dict)

    def lookup(self, bucket: Bucket) -> TunedEntry | None:
        return self.entries.get(bucket)

    def merged(self, newer: TuningTable) -> TuningTable:
        """This table with `newer`'s entries added or replacing those of the same bucket."""
        return TuningTable({**self.entries, **newer.entries})

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "entries": [entry.to_dict() for entry in self.entries.values()],
        }

    @classmethod
    def from_dict(cls, data) -> TuningTable:
        """Validate and load; raises TuningTableError naming the first problem."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise TuningTableError(f"schema is {found!r}, expected {SCHEMA}")
        if not isinstance(data.get("entries"), list):
            raise TuningTableError("'entries' must be a list")
        table = cls()
        for number, item in enumerate(data["entries"]):
            entry = _entry_from_dict(item, number)
            table.entries[entry.bucket] = entry
        return table


_BUCKET_TYPES = {"device": str, "dtype": str, "queries": int, "keys": int, "causal": bool, "training": bool}


def _entry_from_dict(item, number: int) -> TunedEntry:
    where = f"entry {number}"
    if not isinstance(item, dict):
        raise TuningTableError(f"{where} is not an object")
    for name, kind in {**_BUCKET_TYPES, "backend": str, "median_ms": (int, float)}.items():
        value = item.get(name)
        # bool is an int subclass: an int field must not accept true/false.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = getattr(kind, "__name__", "a number")
            raise TuningTableError(f"{where}: '{name}' is missing or not {expected}")
    tile = item.get("tile")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise TuningTableError(f"{where}: 'tile' must be null or a positive integer, got {tile!r}")
    measured, skipped = item.get("measured", {}), item.get("skipped", {})
    if not isinstance(measured, dict) or not isinstance(skipped, dict):
        raise TuningTableError(f"{where}: 'measured' and 'skipped' must be objects")
    bucket = Bucket(**{name: item[name] for name in _BUCKET_TYPES})
    return TunedEntry(bucket, item["backend"], tile, float(item["median_ms"]), measured, skipped)


def read_table(path: str | os.PathLike) -> TuningTable:
    """The table at `path`; TuningTableError (naming the file) if it is unreadable or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TuningTableError(f"tuning table {path}: cannot read it ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TuningTableError(f"tuning table {path}: not valid JSON ({error})") from None
    try:
        return TuningTable.from_dict(data)
    except TuningTableError as error:
        raise TuningTableError(f"tuning table {path}: {error}") from None


def write_table(table: TuningTable, path: str | os.PathLike) -> Path:
    """Write `table` as JSON atomically (a temp file beside it, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(table.to_dict(), out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- what `auto` reads --------------------------------------------------------------------------------

_UNREAD = object()
_active = _UNREAD  # the process's table: unread, None (no table) or a TuningTable
_generation = 0  # counts reloads, so that `auto`'s cached decisions know when to forget


def reload() -> None:
    """Forget the loaded table: the next `auto` call reads `default_path()` again."""
    global _active, _generation
    _active, _generation = _UNREAD, _generation + 1


def generation() -> int:
    """A number that changes whenever the table `auto` consults may have changed."""
    return _generation


def active_table() -> TuningTable | None:
    """The table at `default_path()`, read once per process; None if absent, off or invalid."""
    global _active
    if _active is _UNREAD:
        _active = _read_default()
    return _active


def _read_default() -> TuningTable | None:
    path = default_path()
    if path is None or not path.exists():
        return None  # no table: the built-in defaults apply
    try:
        return read_table(path)
    except TuningTableError as error:
        # A bad cache file must not stop a training run, nor go unnoticed.
        warnings.warn(
            f"{error}; ignoring it (rerun `toroidal bench --tune` or delete the file)",
            TuningTableWarning,
            stacklevel=3,
        )
        return None


def tuned_backend(request: KernelRequest) -> Backend | None:
    """The table's fastest backend for this call's bucket, configured with its tile, if it can serve it."""
    table = active_table()
    entry = table.lookup(Bucket.for_request(request)) if table is not None else None
    if entry is None or entry.backend not in backend_names():
        return None
    backend = get_backend(entry.backend)
    if backend.unavailable_reason(request) is not None:
        return None
    with_tile = getattr(backend, "with_tile", None)
    return with_tile(entry.tile) if entry.tile is not None and with_tile is not None else backend

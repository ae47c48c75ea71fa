"""The one JSON result format of every command: build, write atomically, read (`compare` compares).

A record is a JSON object:

    schema            {"name": "toroidal.<command>", "version": 1}
    command           {"name": <command>, "argv": [...]}  (argv reproduces the run)
    created           ISO-8601 UTC time
    toroidal_version  the library version that measured it
    env               see `capture_env`
    config            the command's resolved configuration
    ...               the measured payload (e.g. "rows" or "checks", and "summary")
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import toroidal
from toroidal_cli.errors import UserError

if TYPE_CHECKING:
    import torch

SCHEMA_PREFIX = "toroidal."
SCHEMA_VERSION = 1
HEADER_KEYS = ("schema", "command", "created", "toroidal_version", "env", "config")
# What may differ between two runs of the same command with the same seed on the same machine: when
# it ran and how fast (peak RSS included). Everything else in a record is reproducible.
VOLATILE_KEYS = frozenset({"created", "timing", "seconds", "wall_time_s", "tokens_per_s", "peak_memory_mb"})


def without_volatile(value):
    """A record (or any part of one) without its VOLATILE_KEYS, at every depth."""
    if isinstance(value, dict):
        return {key: without_volatile(item) for key, item in value.items() if key not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [without_volatile(item) for item in value]
    return value


# --- environment ---------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str | None:
    try:
        import pynvml  # from nvidia-ml-py, the `gpu` extra

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        return driver.decode() if isinstance(driver, bytes) else str(driver)
    except Exception:  # not installed, or no driver: fall back to nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def capture_env(device: str | torch.device = "cpu") -> dict:
    """Where a result was measured: interpreter, torch, device, CUDA and driver, CPU threads."""
    import torch

    device = torch.device(device)
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": _cpu_name(),
        "cuda": torch.version.cuda,
        "driver": None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
        env["driver"] = _nvidia_driver()
    return env


# --- records -------------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_record(
    command: str,
    config: dict,
    payload: dict,
    *,
    argv: list[str] | None = None,
    env: dict | None = None,
) -> dict:
    """A result record for `command`; `payload` keys sit beside the header keys."""
    clash = sorted(set(payload) & set(HEADER_KEYS))
    if clash:
        raise ValueError(f"payload keys {clash} collide with the record header")
    record = {
        "schema": {"name": SCHEMA_PREFIX + command, "version": SCHEMA_VERSION},
        "command": {"name": command, "argv": list(argv) if argv is not None else ["toroidal", command]},
        "created": utc_now(),
        "toroidal_version": toroidal.__version__,
        "env": env if env is not None else capture_env(),
        "config": dict(config),
    }
    record.update(payload)
    return record


def _to_json(value):
    """json.dumps `default`: the few non-JSON types results contain; anything else is a bug."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    torch = sys.modules.get("torch")  # a torch value exists only once torch is imported
    if torch is not None and isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        raise TypeError(f"cannot write a tensor of shape {tuple(value.shape)} to a result file")
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a result file")


def _finite(value):
    """NaN and infinity are not JSON: write them as null (the status fields carry the verdict)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def dumps(record: dict) -> str:
    # Round-trip through `default` first so non-finite floats inside converted objects are caught too.
    plain = json.loads(json.dumps(record, default=_to_json))
    return json.dumps(_finite(plain), indent=2, allow_nan=False) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_result(path: str | os.PathLike, record: dict) -> Path:
    """Write `record` as JSON to `path` atomically: a temp file beside it, then os.replace.

    Serialization happens before any file is touched, so a failure leaves an existing
    file as it was and no temp file behind.
    """
    path = Path(path)
    text = dumps(record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create folder {path.parent}: {error.strerror}", "choose another --out"
        ) from None
    if path.is_dir():
        raise UserError(f"{path} is a folder", "give --out a file name such as results/run.json")
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}", "check the path and permissions") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    return path


def read_result(path: str | os.PathLike, command: str | None = None) -> dict:
    """Load a result record, checking its schema (and that it is from `command`, if given)."""
    path = Path(path)
    fix = "pass a JSON file written by a toroidal command's --out"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"result file {path} does not exist", fix) from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a result file", fix) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read result file {path}: {error}", fix) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})", fix
        ) from None
    schema = record.get("schema") if isinstance(record, dict) else None
    name = schema.get("name") if isinstance(schema, dict) else None
    version = schema.get("version") if isinstance(schema, dict) else None
    if not isinstance(name, str) or not name.startswith(SCHEMA_PREFIX) or not isinstance(version, int):
        raise UserError(f"{path} is not a toroidal result (missing or malformed 'schema')", fix)
    if command is not None and name != SCHEMA_PREFIX + command:
        raise UserError(
            f"{path} is a {name!r} result, expected '{SCHEMA_PREFIX}{command}'",
            f"pass a file written by `toroidal {command} --out`",
        )
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path} has result schema version {version}, this toroidal reads up to {SCHEMA_VERSION}",
            "upgrade toroidal",
        )
    return record

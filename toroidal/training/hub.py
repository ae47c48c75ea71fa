"""The Hugging Face hub, asked only when the user names a hub model or dataset.

Offline, transformers and datasets retry for about 25 seconds before failing with a long
message; one quick connection probe lets a run fail at once with one clear line instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

from toroidal.training.errors import SetupError

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the hub answers a TCP connection, else why not (offline mode or network)."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"cannot connect to {host}: {error.strerror or error}"


def require_hub(what: str, offline_fix: str) -> None:
    """Raise a SetupError naming `what` needed the hub, and the offline alternative, when it is down."""
    reason = hub_unreachable_reason()
    if reason is not None:
        raise SetupError(f"{what} needs the Hugging Face hub, which is not reachable ({reason})", offline_fix)


# Python code shipped with a hub model runs only when the user asked for it (--trust-remote-code).
_REMOTE_CODE = contextvars.ContextVar("toroidal_trust_remote_code", default=False)


def trust_remote_code() -> bool:
    """Whether transformers may run code from a model's repository (off unless `remote_code_trusted`)."""
    return _REMOTE_CODE.get()


@contextlib.contextmanager
def remote_code_trusted(allowed: bool = True) -> Iterator[None]:
    """Within the block, models and tokenizers load with `trust_remote_code=allowed`."""
    token = _REMOTE_CODE.set(bool(allowed))
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)

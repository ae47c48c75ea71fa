"""Local GGUF model files: finding one, reading its architecture, checking transformers can load it.

A GGUF file holds a whole model (config, tokenizer, weights, often quantized). transformers reads it
with `from_pretrained(folder, gguf_file=name)` through the `gguf` package and dequantizes the
weights; `toroidal.training.models` does the loading. Here only the header is read (a few bytes,
not the gguf package's full parse of every token), so a wrong or cut file fails at once.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

from toroidal.runtime.install import missing_module_message
from toroidal.training.errors import SetupError

SUFFIX = ".gguf"
_MAGIC = b"GGUF"
# GGUF value types: scalars by struct format; 8 is a string (u64 length + UTF-8), 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9
_MAX_KEY = 1 << 16  # a longer key is a corrupt header, not a key


def gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == SUFFIX and p.is_file())


class _Header:
    """Sequential reads of a GGUF header; any short read or nonsense raises ValueError."""

    def __init__(self, file):
        self.file = file

    def take(self, size: int) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return data

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int | None = None) -> str:
        size = self.scalar("<Q")
        if limit is not None and size > limit:
            raise ValueError(f"a key of {size} bytes")
        return self.take(size).decode("utf-8")

    def skip_value(self, kind: int) -> None:
        if kind in _SCALARS:
            self.file.seek(struct.calcsize(_SCALARS[kind]), 1)
        elif kind == _STRING:
            self.file.seek(self.scalar("<Q"), 1)
        elif kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:
                self.file.seek(count * struct.calcsize(_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown value type {kind}")


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (llama, qwen2, ...); SetupError for a file that is not one."""
    try:
        with open(path, "rb") as file:
            header = _Header(file)
            if header.take(4) != _MAGIC:
                raise ValueError("no GGUF magic number at its start")
            version = header.scalar("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            header.scalar("<Q")  # tensor count
            for _ in range(header.scalar("<Q")):  # key/value pairs
                key, kind = header.string(_MAX_KEY), header.scalar("<I")
                if key == "general.architecture":
                    if kind != _STRING:
                        raise ValueError("general.architecture is not a string")
                    return header.string(_MAX_KEY)
                header.skip_value(kind)
            raise ValueError("it states no general.architecture")
    except OSError as error:
        raise SetupError(f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as error:
        raise SetupError(f"{path} is not a readable GGUF file ({error})", "check the file") from None


def _loadable_architectures() -> set[str] | None:
    """The GGUF architectures this transformers reads (spelled without - and _), or None if unknown."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        return None
    try:  # newer releases load some architectures through a second path
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return {_plain(name) for name in names} - {"general", "tokenizer"}


def _plain(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def check_gguf(path: Path) -> str:
    """Raise a one-line SetupError unless transformers can load the GGUF file at `path`; its architecture."""
    architecture = gguf_architecture(path)
    for module in ("gguf", "accelerate"):  # transformers needs both to read a GGUF file
        if importlib.util.find_spec(module) is None:
            raise SetupError(f"loading {path.name} {missing_module_message(module)}")
    loadable = _loadable_architectures()
    if loadable is not None and _plain(architecture) not in loadable:
        raise SetupError(
            f"{path.name}: transformers cannot load GGUF architecture {architecture!r}",
            "use a GGUF of an architecture it reads (llama, mistral, qwen2, qwen3, phi3, gemma2, ...)",
        )
    return architecture

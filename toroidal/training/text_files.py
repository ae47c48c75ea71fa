"""Text from local files: a text file (`--dataset text:PATH`) with its held-out last tenth, and the
source files of a repository (`--dataset code:DIR[:EXT,EXT]`), split by a hash of each path so
that the split is the same on every machine."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from toroidal.training.errors import SetupError

DEFAULT_EXTENSIONS = (
    "py", "pyi", "c", "h", "cc", "cpp", "hpp", "cu", "rs", "go", "js", "jsx", "ts", "tsx", "java", "kt",
    "scala", "swift", "rb", "php", "cs", "lua", "jl", "sh", "md", "rst",
)  # fmt: skip
# Vendored dependencies and build outputs: not the repository's own code (hidden folders are skipped too).
SKIPPED_FOLDERS = frozenset((
    "node_modules", "vendor", "third_party", "build", "dist", "target", "__pycache__", "venv",
    "site-packages",
))  # fmt: skip
MAX_FILE_BYTES = 1_000_000  # larger files are generated or data, not code someone wrote
VALIDATION_FRACTION = 0.1
_SNIFF_BYTES = 8192


def parse_extensions(text: str) -> tuple[str, ...]:
    """'py,rs' or '.py, .rs' -> ('py', 'rs'); raises SetupError for an empty or odd list."""
    items = [item.strip().lstrip(".").lower() for item in text.split(",")]
    if not items or not all(item and item.replace("_", "").replace("+", "").isalnum() for item in items):
        raise SetupError(
            f"code dataset extensions {text!r} are not a comma list", "write e.g. --dataset code:DIR:py,rs"
        )
    return tuple(dict.fromkeys(items))


def parse_code_spec(rest: str) -> tuple[str, tuple[str, ...] | None]:
    """'DIR' or 'DIR:py,rs' (what follows `code:`) -> (DIR, extensions or None for the defaults).

    The part after the last ':' is an extension list when it has no path separator, so a
    folder name with a colon still works when the extensions are given.
    """
    folder, sep, tail = rest.rpartition(":")
    if sep and folder and "/" not in tail and "\\" not in tail:
        return folder, parse_extensions(tail)
    return rest, None


def _is_binary(path: Path) -> bool:
    with path.open("rb") as file:
        return b"\0" in file.read(_SNIFF_BYTES)


def _code_folder(folder: str | Path) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise SetupError(f"code folder {folder} {what}", "pass --dataset code:DIR with a source folder")
    return root


def _text_file(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise SetupError(f"text file {path} {what}", "pass --dataset text:PATH with an existing text file")
    return file


def check_local_dataset(spec: str) -> None:
    """Raise the SetupError reading would raise when a `text:PATH` or `code:DIR[:EXT,...]` dataset
    names a missing file or folder; reads nothing (the CLI checks its options with it before the
    library is imported). Other specs pass."""
    kind, _, rest = spec.strip().partition(":")
    if kind.lower() == "text" and rest:
        _text_file(rest)
    elif kind.lower() == "code" and rest:
        _code_folder(parse_code_spec(rest)[0])


def code_files(folder: str | Path, extensions: tuple[str, ...] | None = None) -> list[Path]:
    """Source files under `folder` with one of `extensions`, sorted by relative path."""
    root = _code_folder(folder)
    wanted = set(extensions or DEFAULT_EXTENSIONS)
    found = []
    for current, folders, files in os.walk(root):  # symbolic links to folders are not followed
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in SKIPPED_FOLDERS)
        for name in sorted(files):
            path = Path(current) / name
            if name.startswith(".") or path.suffix.lstrip(".").lower() not in wanted or path.is_symlink():
                continue
            try:
                if path.stat().st_size > MAX_FILE_BYTES or _is_binary(path):
                    continue
            except OSError:  # vanished or unreadable while walking: not part of the dataset
                continue
            found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        listed = ", ".join(f".{ext}" for ext in sorted(wanted))
        raise SetupError(
            f"code folder {folder} has no source files ({listed}) outside hidden and vendored folders",
            "pick the extensions with --dataset code:DIR:EXT,EXT",
        )
    return found


def in_validation(relative: str) -> bool:
    """Whether the file at `relative` (a POSIX path under DIR) belongs to the validation split."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 >= 1 - VALIDATION_FRACTION


def _join(texts: list[str]) -> str:
    return "\n".join(text if text.endswith("\n") else text + "\n" for text in texts if text)


def split_files(folder: str | Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train files, validation files) by path hash; with no hashed validation file, the last file."""
    root = Path(folder).expanduser()
    validation = [f for f in files if in_validation(f.relative_to(root).as_posix())]
    if not validation and len(files) > 1:  # small repositories: still hold one file out
        validation = [files[-1]]
    held = set(validation)
    return [f for f in files if f not in held], validation


def read_code(files: list[Path]) -> str:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as error:
            raise SetupError(f"cannot read {path}: {error.strerror}", "check its permissions") from None
    return _join(texts)


def load_code_texts(folder: str, extensions: tuple[str, ...] | None) -> dict[str, str]:
    """{'train': ..., 'validation': ...}: the source files of `folder`, split by file.

    A folder with a single file splits that file like a text file (last 10% for validation).
    """
    files = code_files(folder, extensions)
    if len(files) == 1:
        train, validation = split_text(read_code(files), VALIDATION_FRACTION)
        return {"train": train, "validation": validation}
    train, validation = split_files(folder, files)
    return {"train": read_code(train), "validation": read_code(validation)}


def read_text_file(path: str) -> str:
    file = _text_file(path)
    try:
        return file.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise SetupError(f"cannot read text file {path}: {error.strerror}", "check the path") from None


def split_text(text: str, fraction: float = VALIDATION_FRACTION) -> tuple[str, str]:
    """(first part, last `fraction`), cut at a line start so no line is split."""
    cut = int(len(text) * (1 - fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if newline != -1 else cut
    return text[:cut], text[cut:]

"""How this copy of toroidal was installed: the command that adds an extra, the one-line error for a
missing optional package, and where the shipped configs (presets, task templates) lie.

Code run from a source checkout, or an editable install (PEP 610: `dir_info.editable` in the
distribution's direct_url.json), is told `pip install -e ".[EXTRA]"`; a wheel install
`pip install "toroidal-attention[EXTRA]"`.
"""

from __future__ import annotations

import functools
from pathlib import Path

DISTRIBUTION = "toroidal-attention"  # the name on PyPI; `toroidal` there is an unrelated project
# An optional module -> (the package pip installs, the extra that brings it).
OPTIONAL_MODULES = {
    "transformers": ("transformers", "eval"),
    "lm_eval": ("lm-eval", "eval"),
    "datasets": ("datasets", "eval"),
    "gguf": ("gguf", "eval"),  # local GGUF model files: transformers reads them with gguf and accelerate
    "accelerate": ("accelerate", "eval"),
    "matplotlib": ("matplotlib", "plot"),
    "geoopt": ("geoopt", "hyperbolic"),
    "flash_attn": ("flash-attn", "gpu"),
    "pynvml": ("nvidia-ml-py", "gpu"),
    "tensorboard": ("tensorboard", "log"),
    "wandb": ("wandb", "log"),
}
_PACKAGE = Path(__file__).resolve().parents[1]  # the `toroidal` package folder


def _in_source_checkout() -> bool:
    return (_PACKAGE.parent / "pyproject.toml").is_file() and (_PACKAGE.parent / "configs").is_dir()


@functools.cache
def editable_install() -> bool:
    """Whether toroidal runs from a source checkout: installed editable, or not installed at all."""
    if _in_source_checkout():  # the files that run are a checkout's (an editable install's are too)
        return True
    import json  # imported here: only an error message needs them
    from importlib import metadata

    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
        return bool(json.loads(text or "{}").get("dir_info", {}).get("editable", False))
    except (metadata.PackageNotFoundError, ValueError, AttributeError):  # not installed, or not PEP 610
        return False


def install_command(extra: str | None = None) -> str:
    """`pip install -e ".[eval]"` in a checkout, `pip install "toroidal-attention[eval]"` otherwise."""
    suffix = f"[{extra}]" if extra else ""
    return f'pip install -e ".{suffix}"' if editable_install() else f'pip install "{DISTRIBUTION}{suffix}"'


def missing_module_message(module: str | None) -> str | None:
    """`needs transformers, from the eval extra: pip install ...` for an optional module (or a module
    inside one, e.g. `transformers.models`); None for any other module."""
    root = (module or "").split(".")[0]
    if root not in OPTIONAL_MODULES:
        return None
    package, extra = OPTIONAL_MODULES[root]
    return f"needs {package}, from the {extra} extra: {install_command(extra)}"


def configs_folder() -> Path:
    """The shipped configs (bench, train and model presets, lm-eval task templates): `configs/` at
    the top of a source checkout, installed as the data package `toroidal/configs` by a wheel."""
    installed, checkout = _PACKAGE / "configs", _PACKAGE.parent / "configs"
    return checkout if not installed.is_dir() and _in_source_checkout() else installed


def config_folders(kind: str) -> tuple[Path, Path]:
    """Where presets of `kind` (bench, train, models, tasks) are looked up, first wins: ./configs/KIND
    in the working directory, then the shipped ones."""
    return Path("configs") / kind, configs_folder() / kind

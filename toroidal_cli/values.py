"""One option value, from a flag's text or a YAML value, parsed and checked.

Every parser takes `(value, where)`, `where` naming the flag or the config key the value came
from, and returns the library value or raises a one-line UserError naming `where`.
"""

from __future__ import annotations

import re

from toroidal_cli.errors import UserError

_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
# The kernel backends `toroidal.kernels` registers, in its order (tests/cli/test_startup.py checks
# that they agree): backend options are checked against them before torch is imported, so a typo
# fails at once.
BACKENDS = ("blockwise", "decomposed", "flash2", "flex", "native", "reference", "sdpa")


def split_items(value) -> list:
    """A flag's comma list ('256, 1024'), a YAML list, or one YAML scalar, as a list of items."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))


def parse_int(value, where: str, minimum: int = 1, none_ok: bool = False) -> int | None:
    """An integer >= `minimum` from a flag string or a YAML value; 'none' too if `none_ok`."""
    if none_ok and _is_none(value):
        return None
    wanted = f"an integer >= {minimum}" + (" or 'none'" if none_ok else "")
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not {wanted}")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise UserError(f"{where}: {value!r} is not {wanted}") from None
    if not isinstance(number, int) or number < minimum:
        raise UserError(f"{where}: {value!r} is not {wanted}")
    return number


def parse_float(value, where: str, minimum: float = 0.0) -> float:
    """A finite number >= `minimum` from a flag string or a YAML value."""
    try:
        number = float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        number = None
    valid = isinstance(number, (int, float)) and not isinstance(number, bool)
    if not valid or not minimum <= number < float("inf"):
        raise UserError(f"{where}: {value!r} is not a number >= {minimum:g}")
    return float(number)


def parse_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise UserError(f"{where}: {value!r} is not true or false")


def parse_count(value, where: str) -> int | None:
    """An integer >= 1 or 'none', with an optional k/M/G suffix ('2M' = 2000000)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGbB])\s*", value)
        if match:
            return int(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])
    return parse_int(value, where, none_ok=True)


def parse_layers(value, where: str = "--layers") -> list[int] | None:
    """'all' (or none) -> None; '0,2' or a YAML list -> [0, 2]."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "none", "")):
        return None
    return [parse_int(item, where, minimum=0) for item in split_items(value)]


def choice(choices: tuple[str, ...]):
    """A parser of one of `choices` (case-insensitive)."""

    def parse(value, where: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def parse_text(value, where: str) -> str:
    """A name: a non-empty string (or a number written as one)."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise UserError(f"{where}: {value!r} is not a name")
    return str(value).strip()


def parse_optional_text(value, where: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        return None
    return parse_text(value, where)


def parse_backend(value, where: str) -> str:
    """A kernel backend name, or auto."""
    name = parse_text(value, where)
    if name != "auto" and name not in BACKENDS:
        raise UserError(f"{where}: unknown backend {value!r}", f"choose auto or {', '.join(BACKENDS)}")
    return name


def parse_mechanism(value, where: str) -> str:
    """A registered mechanism name."""
    from toroidal.mechanisms import mechanism_names  # the registry imports torch: only when given

    name = str(value).strip().lower()
    if name not in mechanism_names():
        raise UserError(f"{where}: unknown mechanism {value!r}", f"choose {', '.join(mechanism_names())}")
    return name


def _option_value(item):
    """A mechanism option value from text or YAML: none, bool, int, float, else the string."""
    if not isinstance(item, str):
        return item
    text = item.strip()
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false", "yes", "no"):
        return lowered in ("true", "yes")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_mechanism_options(value, where: str) -> dict[str, list]:
    """`--option NAME=V1,V2` flags (a list of strings) or a YAML mapping {name: [values]}."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        pairs = []
        for item in value:
            name, sep, values = item.partition("=")
            if not sep or not name.strip():
                raise UserError(f"{where}: {item!r} is not NAME=VALUES", "write e.g. --option budget=2,4")
            pairs.append((name.strip(), values))
    else:
        raise UserError(
            f"{where}: expected NAME=VALUES items or a mapping", "write e.g. options: {budget: [2, 4]}"
        )
    options: dict[str, list] = {}
    for name, values in pairs:
        items = [_option_value(item) for item in split_items(values)]
        if not items:
            raise UserError(f"{where}: option {name!r} has no value", "give at least one value")
        options[str(name)] = list(dict.fromkeys(items))
    return options


def parse_one_value_options(value, where: str) -> dict:
    """`--mechanism-option NAME=VALUE` flags or a YAML mapping: one value per option."""
    options = parse_mechanism_options(value, where)
    several = [name for name, values in options.items() if len(values) != 1]
    if several:
        raise UserError(f"{where}: option {several[0]!r} has several values", "give one value per option")
    return {name: values[0] for name, values in options.items()}

"""The options of `bench` and `profile`: sweep axes and settings, from flags and a YAML config.

Every axis takes a comma list (`--seq-len 512,1024`; `profile` takes one value each). Options and
`--config` YAML keys are the same (`seq-len` = `seq_len`); flags override the file. `read_options`
gives the values some source set; the command fills in the rest.
"""

from __future__ import annotations

from typing import Annotated

import typer

from toroidal_cli.errors import UserError
from toroidal_cli.options import dtype_name, parse_device, parse_dtype
from toroidal_cli.resolve import config_path, load_config
from toroidal_cli.values import (
    BACKENDS,
    parse_bool,
    parse_float,
    parse_int,
    parse_mechanism,
    parse_mechanism_options,
    split_items,
)

AXES = (
    "backend",
    "seq_len",
    "depth",
    "batch",
    "heads",
    "d_model",
    "head_dim",
    "dtype",
    "mode",
    "causal",
    "window",
    "lambda",
    "period",
    "mechanism",
    "options",
    "ring_world_size",
)
SETTINGS = (
    "device",
    "warmup",
    "repeats",
    "threads",
    "memory_budget_gb",
    "isolate",
    "paired",
    "baselines",
    "max_time",
    "noisy",
)
CONFIG_KEYS = AXES + SETTINGS
# Sweep keys whose option parameter is named otherwise (for --dry-run's sources and `flags`).
DRY_RUN_PARAMS = {"lambda": "lambda_", "options": "option"}

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="A preset name (configs/bench/NAME.yaml) or a YAML file of options."),
]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", "-b", help="Backend(s): a registered name, auto, or all.")
]
SeqLenOpt = Annotated[str | None, typer.Option("--seq-len", "-n", help="Sequence length(s) N.")]
DepthOpt = Annotated[str | None, typer.Option("--depth", "-d", help="Depth(s) D (platters per head).")]
BatchOpt = Annotated[str | None, typer.Option("--batch", help="Batch size(s) B.")]
HeadsOpt = Annotated[str | None, typer.Option("--heads", help="Number(s) of heads H.")]
DModelOpt = Annotated[str | None, typer.Option("--d-model", help="Model width(s); head dim = d_model / H.")]
HeadDimOpt = Annotated[str | None, typer.Option("--head-dim", help="Head dim(s) e (instead of --d-model).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="fp32, fp16 or bf16.")]
ModeOpt = Annotated[
    str | None,
    typer.Option("--mode", help="fwd (inference), fwd+bwd (training step) or stream (one decoding step)."),
]
CausalOpt = Annotated[bool | None, typer.Option("--causal/--no-causal", help="Causal masking.")]
WindowOpt = Annotated[str | None, typer.Option("--window", help="Circular window(s) (int) or none.")]
LambdaOpt = Annotated[str | None, typer.Option("--lambda", help="Distance penalty lambda(s).")]
PeriodOpt = Annotated[str | None, typer.Option("--period", help="Ring period(s) P, or none for P = N.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N.")]
WarmupOpt = Annotated[str | None, typer.Option("--warmup", help="Untimed runs before timing.")]
RepeatsOpt = Annotated[str | None, typer.Option("--repeats", help="The fewest timed runs per row.")]
MaxTimeOpt = Annotated[
    str | None,
    typer.Option(
        "--max-time",
        help="Seconds of timed runs per row: repeat until the spread is under --noisy, "
        "at most this long (0: exactly --repeats runs).",
    ),
]
NoisyOpt = Annotated[
    str | None,
    typer.Option(
        "--noisy",
        help="Spread (IQR / median of a row's runs) that timing repeats to get under; "
        "rows above it are marked noisy (0.1 = 10%).",
    ),
]
ThreadsOpt = Annotated[str | None, typer.Option("--threads", help="torch.set_num_threads (default: as is).")]
MechanismOpt = Annotated[
    str | None,
    typer.Option("--mechanism", "-m", help="Mechanism(s), e.g. standard,toroidal (toroidal uses --backend)."),
]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        help="A mechanism option swept like an axis: NAME=V1,V2 (repeatable), e.g. --option budget=2,4.",
    ),
]

_MODE_ALIASES = {
    "fwd": "fwd",
    "forward": "fwd",
    "fwd+bwd": "fwd+bwd",
    "fwd_bwd": "fwd+bwd",
    "train": "fwd+bwd",
    "stream": "stream",
}


def _backends(item, where: str) -> list[str]:
    name = str(item).strip().lower()
    if name == "all":
        return list(BACKENDS)
    if name != "auto" and name not in BACKENDS:
        raise UserError(f"{where}: unknown backend {item!r}", f"choose auto, all or {', '.join(BACKENDS)}")
    return [name]


def _dtype(item, where: str) -> list[str]:
    try:
        return [dtype_name(parse_dtype(str(item)))]
    except UserError as error:
        raise UserError(f"{where}: {error.message}", error.fix) from None


def _mode(item, where: str) -> list[str]:
    mode = _MODE_ALIASES.get(str(item).strip().lower())
    if mode is None:
        raise UserError(f"{where}: unknown mode {item!r}", "use fwd, fwd+bwd or stream")
    return [mode]


# How one item of each axis is parsed (a list: `all` expands to several backends).
_ITEM_PARSERS = {
    "backend": _backends,
    "seq_len": lambda item, where: [parse_int(item, where)],
    "depth": lambda item, where: [parse_int(item, where)],
    "batch": lambda item, where: [parse_int(item, where)],
    "heads": lambda item, where: [parse_int(item, where)],
    "d_model": lambda item, where: [parse_int(item, where)],
    "head_dim": lambda item, where: [parse_int(item, where)],
    "dtype": _dtype,
    "mode": _mode,
    "causal": lambda item, where: [parse_bool(item, where)],
    "window": lambda item, where: [parse_int(item, where, minimum=0, none_ok=True)],
    "lambda": lambda item, where: [parse_float(item, where)],
    "period": lambda item, where: [parse_int(item, where, none_ok=True)],
    "mechanism": lambda item, where: [parse_mechanism(item, where)],
    "ring_world_size": lambda item, where: [parse_int(item, where, minimum=1)],
}


def _parse_setting(key: str, value, where: str):
    if key == "device":
        try:
            return str(parse_device(str(value)))
        except UserError as error:
            raise UserError(f"{where}: {error.message}", error.fix) from None
    if key == "warmup":
        return parse_int(value, where, minimum=0)
    if key == "repeats":
        return parse_int(value, where)
    if key == "threads":
        return parse_int(value, where, none_ok=True)
    if key in ("max_time", "noisy"):
        return parse_float(value, where)
    if key == "memory_budget_gb":
        return None if str(value).strip().lower() == "none" else parse_float(value, where)
    return parse_bool(value, where)  # isolate, paired, baselines


# The order in which given flags are checked (the first bad one is the error shown).
_FLAG_ORDER = (*AXES[:13], "mechanism", "options", *SETTINGS, "ring_world_size")


def flags(params: dict) -> dict:
    """The raw sweep flags among a command's parameters (`ctx.params`), by sweep key (None = not given)."""
    found = {}
    for key in _FLAG_ORDER:
        param = DRY_RUN_PARAMS.get(key, key)
        if param in params:
            found[key] = (params[param] or None) if key == "options" else params[param]
    return found


def read_options(config: str | None, flags: dict, default_config: str | None, kind: str = "bench") -> dict:
    """Flags over the YAML config over nothing: axes as de-duplicated lists, settings as values.

    `flags` maps CONFIG_KEYS to the raw option values (None = not given). Returns only
    the keys some source gave, plus `config_file` (the YAML path used, or None).
    """
    spec = config if config is not None else default_config
    path = config_path(spec, kind) if spec is not None else None
    from_file = load_config(path, CONFIG_KEYS) if path is not None else {}
    given = {key: value for key, value in flags.items() if value is not None}
    if "d_model" in given and "head_dim" in given:
        raise UserError("--d-model and --head-dim are mutually exclusive", "give one of them")
    if "d_model" in from_file and "head_dim" in from_file:
        raise UserError(f"config {path}: d_model and head_dim are mutually exclusive", "keep one of them")
    for one, other in (("d_model", "head_dim"), ("head_dim", "d_model")):
        if one in given:
            from_file.pop(other, None)  # a flag for the width replaces the file's, whichever it was

    values: dict = {"config_file": str(path) if path is not None else None}
    for key, value in {**from_file, **given}.items():
        where = f"--{key.replace('_', '-')}" if key in given else f"{key} in {path}"
        if key in SETTINGS:
            values[key] = _parse_setting(key, value, where)
            continue
        if key == "options":
            values[key] = parse_mechanism_options(value, where.replace("--options", "--option"))
            continue
        items = split_items(value)
        if not items:
            raise UserError(f"{where}: no value given", "give at least one value")
        parsed = [out for item in items for out in _ITEM_PARSERS[key](item, where)]
        values[key] = list(dict.fromkeys(parsed))  # keep order, drop repeats
    return values

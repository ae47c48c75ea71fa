"""The model and data options shared by `train`, `eval` and `longbench`/`scrolls`.

One parser per option name (`PARSERS`), resolution of flags over a YAML file's keys over the
defaults into library fields (`resolve_options`), and the command line that reproduces a run
from its resolved values (`resolved_argv`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toroidal.training.errors import SetupError
from toroidal.training.text_files import check_local_dataset
from toroidal_cli.errors import UserError
from toroidal_cli.resolve import config_path, flag_name, from_command_line, load_config
from toroidal_cli.values import (
    choice,
    parse_backend,
    parse_bool,
    parse_count,
    parse_float,
    parse_int,
    parse_layers,
    parse_mechanism,
    parse_one_value_options,
    parse_optional_text,
    parse_text,
)

# Typer parameter name -> library field, where they differ (`lambda` is a Python keyword).
FIELD_OF = {"lambda_": "lambda_distance", "mechanism_option": "mechanism_options"}
# YAML spellings -> parameter name.
YAML_ALIASES = {"lambda": "lambda_", "lambda_distance": "lambda_", "mechanism_options": "mechanism_option"}

PARSERS = {
    "model": parse_text,
    "position": choice(("rope", "none")),
    "attention": choice(("toroidal", "baseline")),
    "mechanism": parse_mechanism,
    "mechanism_option": parse_one_value_options,
    "adaptive_depth": parse_bool,
    "min_depth": lambda v, w: parse_int(v, w, none_ok=True),
    "depth": lambda v, w: parse_int(v, w),
    "lambda_": lambda v, w: parse_float(v, w),
    "period": lambda v, w: parse_int(v, w, none_ok=True),
    "window": lambda v, w: parse_int(v, w, minimum=0, none_ok=True),
    "fusion": choice(("low_rank", "attention", "mean", "concat")),
    "fusion_rank": lambda v, w: parse_int(v, w, none_ok=True),
    "backend": parse_backend,
    "layers": parse_layers,
    "freeze_base": parse_bool,
    "grad_checkpointing": parse_bool,
    "dataset": lambda v, w: parse_dataset(v, w),
    "data_period": lambda v, w: parse_int(v, w),
    "data_vocab": lambda v, w: parse_int(v, w, minimum=2),
    "passkey_digits": lambda v, w: parse_int(v, w),
    "tokenizer": parse_text,
    "seq_len": lambda v, w: parse_int(v, w),
    "batch_size": lambda v, w: parse_int(v, w),
    "steps": parse_count,
    "tokens": parse_count,
    "lr": lambda v, w: parse_float(v, w),
    "min_lr_ratio": lambda v, w: parse_float(v, w),
    "warmup_steps": lambda v, w: parse_int(v, w, minimum=0),
    "weight_decay": lambda v, w: parse_float(v, w),
    "grad_accum": lambda v, w: parse_int(v, w),
    "clip": lambda v, w: parse_float(v, w),
    "precision": choice(("fp32", "bf16", "fp16")),
    "seed": lambda v, w: parse_int(v, w, minimum=0),
    "eval_every": lambda v, w: parse_int(v, w, minimum=0),
    "eval_batches": lambda v, w: parse_int(v, w),
    "save_every": lambda v, w: parse_int(v, w, minimum=0),
    "log": lambda v, w: (
        None if parse_optional_text(v, w) is None else choice(("csv", "tensorboard", "wandb"))(v, w)
    ),
    "device": parse_text,
    "max_batches": lambda v, w: parse_int(v, w, none_ok=True),
    "max_tokens": parse_count,  # eval
    "split": lambda v, w: parse_text(v, w).lower(),  # eval; EvalConfig checks the name
}

TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let a hub model run the Python code in its repository (off: only transformers' own code runs).",
    ),
]


def resolve_options(ctx: typer.Context, names: list[str], file_values: dict, where: str = "") -> dict:
    """Library fields from flags over `file_values` over defaults, each parsed and checked."""
    values = {}
    for name in names:
        given_in_file = name in file_values and not from_command_line(ctx, name)
        raw = file_values[name] if given_in_file else ctx.params[name]
        label = f"{where}: {name.rstrip('_')}" if given_in_file and where else flag_name(name)
        # A YAML null is parsed too: 'none' where the option allows it, a one-line error where not.
        parsed = raw is not None or given_in_file
        values[FIELD_OF.get(name, name)] = PARSERS[name](raw, label) if parsed else None
    return values


def read_yaml_options(spec: str, names: list[str], extra: tuple[str, ...] = ()) -> tuple[dict, Path]:
    """A train config's keys (spelled as parameter names) and its path; `extra`: other known keys."""
    path = config_path(spec, "train")
    known = tuple(name.rstrip("_") for name in names) + tuple(YAML_ALIASES) + extra
    data = load_config(path, tuple(dict.fromkeys(known)))
    return {YAML_ALIASES.get(key, key): value for key, value in data.items()}, path


def resolved_argv(command: str, names: list[str], values: dict, extra: list[str]) -> list[str]:
    """A command line that reproduces the run from resolved values (no --config: it is folded in)."""
    argv = ["toroidal", command]
    for name in names:
        value = values[FIELD_OF.get(name, name)]
        if isinstance(value, bool):
            argv += [flag_name(name)] if value else []
        elif isinstance(value, dict):
            argv += [part for key, item in value.items() for part in (flag_name(name), f"{key}={item}")]
        elif isinstance(value, list):
            argv += [flag_name(name), ",".join(map(str, value))]
        else:
            argv += [flag_name(name), "none" if value is None else str(value)]
    return argv + extra


def parse_dataset(value, where: str) -> str:
    """A `--dataset` spec; a text file or code folder it names must exist (checked at once: the
    library, and torch, are imported later)."""
    spec = parse_text(value, where)
    try:
        check_local_dataset(spec)
    except SetupError as error:
        raise setup_error(error) from None
    return spec


def setup_error(error: SetupError) -> UserError:
    """A library SetupError (a missing file, a model that cannot load) as the user's one-line error."""
    return UserError(error.message, error.fix)

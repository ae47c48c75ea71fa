"""`toroidal bench`: sweep backends and shapes, time them against plain SDPA, show a table, write JSON.

Options and `--config` YAML keys are the same (`seq-len` = `seq_len`); flags override the
file, and the file overrides the library defaults. With no `--config`, the `quick` preset
is the base. `toroidal profile` reuses the option declarations and parsing defined here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from toroidal.bench import tune as tuning_run
from toroidal.bench.core import KEY_FIELDS, BenchSweep, can_isolate, run_sweep
from toroidal.kernels import backend_names
from toroidal.kernels import tuning_table as tuning
from toroidal.mechanisms import mechanism_names
from toroidal_cli import dryrun, render
from toroidal_cli.commands import plot as plot_command
from toroidal_cli.errors import UserError, as_user_error
from toroidal_cli.memory_check import available, sweep_memory_line
from toroidal_cli.options import (
    check_out_path,
    config_path,
    dtype_name,
    invocation_argv,
    load_config,
    parse_bool,
    parse_device,
    parse_dtype,
    parse_float,
    parse_int,
    split_items,
)
from toroidal_cli.results import capture_env, compare_rows, make_record, read_result, write_result
from toroidal_cli.signals import StopSignals

HELP = (
    "Benchmark the backends: time, tokens/s, TFLOP/s and peak memory, against plain SDPA.\n\n"
    "Every option takes a comma list (--seq-len 512,1024,2048); rows are the cartesian product. "
    "With no options it runs the `quick` preset on the CPU (under two minutes). "
    "--config takes a preset (quick, cpu-scaling, gpu) or a YAML file with the same keys."
)
DEFAULT_PRESET = "quick"

# --- options shared with `toroidal profile` ----------------------------------------------------------

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
SETTINGS = ("device", "warmup", "repeats", "threads", "memory_budget_gb", "isolate", "paired", "baselines")
CONFIG_KEYS = AXES + SETTINGS

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
RepeatsOpt = Annotated[str | None, typer.Option("--repeats", help="Timed runs per row.")]
ThreadsOpt = Annotated[str | None, typer.Option("--threads", help="torch.set_num_threads (default: as is).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Also write the result JSON to this file.")]
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
        return backend_names()
    if name != "auto" and name not in backend_names():
        raise UserError(
            f"{where}: unknown backend {item!r}", f"choose auto, all or {', '.join(backend_names())}"
        )
    return [name]


def _mechanism(item, where: str) -> list[str]:
    name = str(item).strip().lower()
    if name not in mechanism_names():
        raise UserError(f"{where}: unknown mechanism {item!r}", f"choose {', '.join(mechanism_names())}")
    return [name]


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
    "mechanism": _mechanism,
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
    if key == "memory_budget_gb":
        return None if str(value).strip().lower() == "none" else parse_float(value, where)
    return parse_bool(value, where)  # isolate, paired, baselines


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


def build_sweep(values: dict) -> BenchSweep:
    """A library sweep from `read_options` values (keys it lacks take the library defaults)."""
    kwargs = {key: value for key, value in values.items() if key in CONFIG_KEYS}
    if "lambda" in kwargs:
        kwargs["lambda_distance"] = kwargs.pop("lambda")
    if kwargs.get("isolate") and not can_isolate():
        raise UserError("--isolate needs Linux (fork and /proc)", "drop --isolate")
    with as_user_error("fix the option or the config file"):
        sweep = BenchSweep(**kwargs)
    problems = [case.problem() for case in sweep.cases()]
    if all(problems):
        raise UserError(
            problems[0], "choose --depth dividing the head dim, and --d-model divisible by --heads"
        )
    return sweep


# --- the table ---------------------------------------------------------------------------------------

_AXIS_COLUMNS = (
    ("device", "device"),
    ("dtype", "dtype"),
    ("mode", "mode"),
    ("causal", "causal"),
    ("window", "window"),
    ("lambda", "λ"),
    ("period", "P"),
    ("batch", "B"),
    ("heads", "H"),
    ("d_model", "d_model"),
    ("head_dim", "e"),
    ("depth", "D"),
    ("seq_len", "N"),
)


def _fixed(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _backend_label(row: dict) -> Text:
    mechanism = row.get("mechanism") or "toroidal"
    label = Text(f"{mechanism} " if mechanism != "toroidal" else "")
    if mechanism != "toroidal" and row["backend"] == "-":
        label = Text(mechanism)
    elif row["backend"] == "auto" and row.get("chosen"):
        label.append_text(Text.assemble("auto", ("→" + row["chosen"], "dim")))
    else:
        label.append(row["backend"])
    if row.get("options"):
        label.append(f" {row['options']}", style="dim")
    if row.get("ring_world_size"):  # sequence-parallel rows: world size and layout
        label = Text.assemble(f"ring W={row['ring_world_size']}", (f" {row.get('chosen') or ''}", "dim"))
    return label


def _axis_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _axis_text(key: str, value) -> str:
    return "N" if key == "period" and value is None else _axis_value(value)  # period none means P = N


def varying_axes(rows: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """The axis columns whose values differ between rows, and 'name=value' for those that do not."""
    varying, fixed = [], []
    for key, header in _AXIS_COLUMNS:
        values = {_axis_text(key, row.get(key)) for row in rows}
        if len(values) > 1:
            varying.append((key, header))
        elif values:
            fixed.append(f"{header}={values.pop()}")
    return varying, fixed


def _axis_column(key: str, header: str) -> render.Column:
    return render.Column(key, header, format=lambda value: _axis_text(key, value), justify="right")


# --mode stream rows: median ms is the streaming step; these give the KV-cache step and memory.
def _kib(value) -> str:
    return _fixed(None if value is None else value / 1024, ",.1f")


STREAM_COLUMNS = [
    render.Column("kv_cache_ms", "KV-cache ms", format=lambda v: _fixed(v, ".3f"), justify="right"),
    render.Column("stream_vs_kv_cache", "× KV", format=lambda v: _fixed(v, ".2f"), justify="right"),
    render.Column("state_bytes", "state KiB", format=_kib, justify="right"),
    render.Column("kv_cache_bytes", "KV KiB", format=_kib, justify="right"),
    render.Column(
        "kv_cache_peak_memory_mb",
        "KV peak MiB",
        format=lambda v: _fixed(v, ",.1f"),
        justify="right",
    ),
]


def bench_columns(rows: list[dict]) -> tuple[list[render.Column], str]:
    varying, fixed = varying_axes(rows)
    columns = [render.Column("backend_label", "backend", format=lambda v: v, no_wrap=True)]
    columns += [_axis_column(key, header) for key, header in varying]
    columns += [
        render.Column("status", "status"),
        render.Column("median_ms", "median ms", format=lambda v: _fixed(v, ".3f"), justify="right"),
        render.Column("spread", "p10–p90 ms", justify="right", no_wrap=True),
        render.Column("tokens_per_s", "tokens/s", format=lambda v: _fixed(v, ",.0f"), justify="right"),
        render.Column("tflops", "TFLOP/s", format=lambda v: _fixed(v, ".3g"), justify="right"),
        render.Column("peak_memory_mb", "peak MiB", format=lambda v: _fixed(v, ",.1f"), justify="right"),
        render.Column("overhead", "× SDPA(L)", format=lambda v: _fixed(v, ".2f"), justify="right"),
        render.Column("vs_standard", "× SDPA(N)", format=lambda v: _fixed(v, ".2f"), justify="right"),
    ]
    if any(row.get("mode") == "stream" for row in rows):
        columns += STREAM_COLUMNS
    if all(row.get("mode") == "stream" for row in rows):  # a decoding step has no FLOPs or SDPA baselines
        columns = [c for c in columns if c.key not in ("tflops", "overhead", "vs_standard")]
    if any(row.get("error") is not None for row in rows):
        error_format = lambda v: _fixed(v, ".2e")  # noqa: E731
        columns.append(render.Column("error", "rel. error", format=error_format, justify="right"))
    if any(row.get("gpu_util_pct") is not None for row in rows):
        columns += [
            render.Column("gpu_util_pct", "GPU %", format=lambda v: _fixed(v, ".0f"), justify="right"),
            render.Column("gpu_power_w", "W", format=lambda v: _fixed(v, ".0f"), justify="right"),
        ]
    if any(row.get("reason") for row in rows):
        columns.append(render.Column("reason", "reason", format=_short_reason, style="dim"))
    return columns, " · ".join(fixed)


def _short_reason(reason: str | None) -> str:
    """The reason without the "backend 'x' unavailable: " prefix the backend column already says."""
    if not reason:
        return ""
    head, sep, tail = reason.partition(" unavailable: ")
    return tail if sep and head.startswith("backend ") else reason


def _display_rows(rows: list[dict]) -> list[dict]:
    """Rows plus the cells computed from several fields: what auto chose, the p10-p90 spread."""
    shown = []
    for row in rows:
        spread = "-" if row.get("p10_ms") is None else f"{row['p10_ms']:.3f}–{row['p90_ms']:.3f}"
        shown.append({**row, "spread": spread, "backend_label": _backend_label(row)})
    return shown


def bench_table(rows: list[dict], title: str):
    columns, caption = bench_columns(rows)
    table = render.table(_display_rows(rows), columns, title=title)
    table.caption = caption
    return table


# --- comparison ----------------------------------------------------------------------------------------

COMPARE_METRICS = ["median_ms", "peak_memory_mb"]


def _pct_text(pct: float | None, threshold: float | None) -> Text:
    if pct is None:
        return Text("-")
    style = "red" if pct > (threshold if threshold is not None else 0.0) else "green" if pct < 0 else ""
    return Text(f"{pct:+.1f}%", style=style)


def read_old_rows(old_path: Path) -> list[dict]:
    """The rows of an earlier bench result, checked before the sweep runs and again when comparing."""
    old = read_result(old_path, command="bench")
    rows = old.get("rows")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        fix = "pass a JSON file written by `toroidal bench --out`"
        raise UserError(f"{old_path} has no list of 'rows'", fix)
    for row in rows:  # results from before mechanisms existed timed toroidal attention
        row.setdefault("mechanism", "toroidal")
        row.setdefault("options", None)
    return rows


def compare_with(old_path: Path, rows: list[dict], threshold: float | None):
    """Print per-row deltas against an older result; return the rows slower than `threshold` percent."""
    old_rows = read_old_rows(old_path)
    with as_user_error(f"{old_path} cannot be compared row by row"):
        compared = compare_rows(old_rows, rows, KEY_FIELDS, COMPARE_METRICS)
    both = [row for row in compared if row["match"] == "both"]
    flat = []
    for row in both:
        time, memory = row["metrics"]["median_ms"], row["metrics"]["peak_memory_mb"]
        flat.append({**row, "old_ms": time["old"], "new_ms": time["new"], "ms_pct": time["pct"]})
        flat[-1].update(old_mb=memory["old"], new_mb=memory["new"], mb_pct=memory["pct"])
    varying, fixed = varying_axes(flat) if flat else ([], [])
    columns = [render.Column("backend", "backend", no_wrap=True)]
    columns += [_axis_column(key, header) for key, header in varying]
    columns += [
        render.Column("old_ms", "old ms", format=lambda v: _fixed(v, ".3f"), justify="right"),
        render.Column("new_ms", "new ms", format=lambda v: _fixed(v, ".3f"), justify="right"),
        render.Column("ms_pct", "Δ time", format=lambda v: _pct_text(v, threshold), justify="right"),
        render.Column("old_mb", "old MiB", format=lambda v: _fixed(v, ",.1f"), justify="right"),
        render.Column("new_mb", "new MiB", format=lambda v: _fixed(v, ",.1f"), justify="right"),
        render.Column("mb_pct", "Δ memory", format=lambda v: _pct_text(v, None), justify="right"),
    ]
    table = render.table(flat, columns, title=f"compared with {old_path}")
    table.caption = " · ".join(fixed)
    render.console.print(table)
    unmatched = len(compared) - len(both)
    if unmatched:
        only_old = sum(row["match"] == "old_only" for row in compared)
        render.console.print(
            f"[dim]{only_old} row(s) only in the old result, {unmatched - only_old} only in the new one[/]"
        )
    if threshold is None:
        return []
    return [row for row in flat if row["ms_pct"] is not None and row["ms_pct"] > threshold]


# --- the command -----------------------------------------------------------------------------------


# Sweep keys whose option parameter is named otherwise (for --dry-run's sources).
DRY_RUN_PARAMS = {"lambda": "lambda_", "options": "option"}


def _progress_label(case) -> str:
    return f"{case.mechanism} {case.backend} N={case.seq_len} D={case.depth} {case.dtype} {case.mode}"


# The columns of the --tune table: (row key, header, format).
TUNING_COLUMNS = (
    ("dtype", "dtype", None), ("queries", "Lq", None), ("keys", "Lk", None),
    ("causal", "causal", _axis_value), ("training", "training", _axis_value), ("backend", "fastest", None),
    ("tile", "tile", lambda v: _fixed(v, "d")), ("median_ms", "median ms", lambda v: _fixed(v, ".3f")),
    ("runner_up", "next (× time)", None), ("tried", "tried", None),
)  # fmt: skip


def run_tuning(sweep: BenchSweep, path: Path | None, others: dict) -> None:
    """`--tune`: measure the sweep's shape buckets, merge them into the tuning table, show the winners."""
    given = [name for name, value in others.items() if value]
    if given:
        raise UserError(f"--tune cannot be combined with {', '.join(given)}", "run the tuning separately")
    path = path or tuning.default_path()
    if path is None:
        raise UserError(f"${tuning.ENV_VAR} turns tuning tables off", "pass --tune-out FILE")
    check_out_path(path, "--tune-out")
    with render.progress() as bar:
        task = bar.add_task("tune", total=None)
        measured = tuning_run.tune(sweep, on_case=lambda label: bar.update(task, description=f"tune {label}"))
    if not measured.entries:
        raise UserError("no backend could run any shape of the sweep", "check --device, --dtype, the shapes")
    try:
        table = tuning.read_table(path).merged(measured) if path.exists() else measured
    except tuning.TuningTableError as error:
        render.console.print(Text(f"note: {error}; replacing it", style="dim"))
        table = measured
    rows = []
    for entry in measured.entries.values():
        ranked = sorted((ms, label) for label, ms in entry.measured.items() if ms is not None)
        runner_up = f"{ranked[1][1]} ×{ranked[1][0] / ranked[0][0]:.2f}" if len(ranked) > 1 else "-"
        rows.append({**entry.to_dict(), "runner_up": runner_up, "tried": len(ranked)})
    columns = [render.Column(key, header, format=fmt, justify="right") for key, header, fmt in TUNING_COLUMNS]
    title = f"fastest backend per shape bucket on {sweep.device}"
    render.console.print(render.table(rows, columns, title=title))
    written = tuning.write_table(table, path)
    tuning.reload()  # later calls in this process follow the new table
    render.console.print(f"wrote {written} ({len(table.entries)} buckets; backend=auto reads it)")


def command(
    ctx: typer.Context,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    seq_len: SeqLenOpt = None,
    depth: DepthOpt = None,
    batch: BatchOpt = None,
    heads: HeadsOpt = None,
    d_model: DModelOpt = None,
    head_dim: HeadDimOpt = None,
    dtype: DtypeOpt = None,
    mode: ModeOpt = None,
    causal: CausalOpt = None,
    window: WindowOpt = None,
    lambda_: LambdaOpt = None,
    period: PeriodOpt = None,
    device: DeviceOpt = None,
    warmup: WarmupOpt = None,
    repeats: RepeatsOpt = None,
    threads: ThreadsOpt = None,
    mechanism: MechanismOpt = None,
    option: OptionOpt = None,
    memory_budget_gb: Annotated[
        str | None,
        typer.Option("--memory-budget-gb", help="Skip rows whose materialized (L x L) scores exceed it."),
    ] = None,
    isolate: Annotated[
        bool | None,
        typer.Option("--isolate/--no-isolate", help="CPU rows in fresh worker forks (measures peak memory)."),
    ] = None,
    ring_world_size: Annotated[
        str | None,
        typer.Option("--ring-world-size", help="Add ring-attention rows on W local processes (W list)."),
    ] = None,
    paired: Annotated[
        bool | None,
        typer.Option(
            "--paired/--no-paired",
            help="Time each row's SDPA baselines alternating with it (default), or once per shape.",
        ),
    ] = None,
    baselines: Annotated[
        bool | None,
        typer.Option(
            "--baselines/--no-baselines",
            help="Time the plain-SDPA baselines and ratios (default), or only the rows (long scaling runs).",
        ),
    ] = None,
    out: OutOpt = None,
    compare: Annotated[
        Path | None, typer.Option("--compare", help="An older bench result JSON: print per-row deltas.")
    ] = None,
    fail_on_regression: Annotated[
        float | None,
        typer.Option("--fail-on-regression", help="With --compare: exit 1 if a row got slower by > PCT %."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw the rows to this PNG (needs the plot extra).")
    ] = None,
    dry_run: dryrun.DryRunOpt = False,
    tune: Annotated[
        bool,
        typer.Option("--tune", help="Measure the fastest backend and tile per shape bucket (for auto)."),
    ] = False,
    tune_out: Annotated[
        Path | None,
        typer.Option("--tune-out", help="With --tune: table file (default: $TOROIDAL_TUNING_FILE or cache)."),
    ] = None,
) -> None:
    check_out_path(out)
    if tune_out is not None and not tune:
        raise UserError("--tune-out needs --tune", "add --tune")
    if plot is not None:
        plot_command.check_plot_out(plot, "--plot")
    if fail_on_regression is not None:
        if compare is None:
            raise UserError("--fail-on-regression needs --compare", "pass --compare OLD.json")
        if not 0 <= fail_on_regression < float("inf"):  # nan too: no row could ever fail it
            raise UserError(
                f"--fail-on-regression {fail_on_regression:g} is not a percentage >= 0", "give e.g. 5"
            )
    if compare is not None:
        read_old_rows(compare)  # fail before the work, not after it
    flags = {
        "backend": backend,
        "seq_len": seq_len,
        "depth": depth,
        "batch": batch,
        "heads": heads,
        "d_model": d_model,
        "head_dim": head_dim,
        "dtype": dtype,
        "mode": mode,
        "causal": causal,
        "window": window,
        "lambda": lambda_,
        "period": period,
        "mechanism": mechanism,
        "options": option or None,
        "device": device,
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads,
        "memory_budget_gb": memory_budget_gb,
        "isolate": isolate,
        "paired": paired,
        "baselines": baselines,
        "ring_world_size": ring_world_size,
    }
    values = read_options(config, flags, DEFAULT_PRESET)
    sweep = build_sweep(values)
    cases = sweep.cases()
    available(sweep.device)  # a malformed TOROIDAL_MEMORY_LIMIT_GB fails here, not in the first row
    if dry_run:
        label = f"config {values['config_file']}" if config is not None else f"preset {DEFAULT_PRESET}"
        found = dryrun.settings(
            ctx, {**sweep.to_dict(), "out": out}, from_file=values, file_label=label, params=DRY_RUN_PARAMS
        )
        dryrun.show("bench", found, memory_line=sweep_memory_line(sweep))
        return
    if tune:
        run_tuning(sweep, tune_out, {"--out": out, "--compare": compare, "--plot": plot})
        return

    with render.progress() as bar, StopSignals("the current row") as stop:
        task = bar.add_task("bench", total=len(cases))
        result = run_sweep(
            sweep,
            on_case=lambda index, case: bar.update(task, description=_progress_label(case)),
            on_row=lambda row: bar.advance(task),
            should_stop=stop,
        )
    summary = {**result.summary, "notes": result.notes}
    render.console.print(bench_table(result.rows, f"toroidal bench on {sweep.device}"))
    counts = ", ".join(f"{summary[s]} {s}" for s in ("ok", "skipped", "oom", "error") if summary[s])
    render.console.print(f"{summary['rows']} rows ({counts}) in {summary['seconds']:.1f} s")
    for note in result.notes:
        render.console.print(Text(f"note: {note}", style="dim"))

    regressions = compare_with(compare, result.rows, fail_on_regression) if compare is not None else []
    if out is not None:
        record_config = {**sweep.to_dict(), "config_file": values["config_file"]}
        record = make_record(
            "bench",
            record_config,
            {"rows": result.rows, "summary": summary, "partial": result.partial},
            argv=invocation_argv(ctx),
            env=capture_env(sweep.device),
        )
        render.console.print(f"wrote {write_result(out, record)}")
    if result.partial:
        where = f"; the partial result is in {out}" if out is not None else ""
        line = f"{stop.name}: stopped after {len(result.rows)} of {len(cases)} rows{where}"
        render.err_console.print(Text(line, style="bold yellow"), soft_wrap=True)
        raise typer.Exit(stop.exit_code)
    if plot is not None:
        plot_command.plot_bench_rows(result.rows, plot)
    if regressions:
        worst = max(regressions, key=lambda row: row["ms_pct"])
        render.console.print(
            Text(
                f"regression: {len(regressions)} row(s) slower by more than {fail_on_regression:g}% "
                f"(worst {worst['backend']} N={worst['seq_len']}: {worst['ms_pct']:+.1f}%)",
                style="bold red",
            )
        )
        raise typer.Exit(1)
    if fail_on_regression is not None:
        render.console.print(Text(f"no row slower by more than {fail_on_regression:g}%", style="green"))

"""`toroidal bench`: sweep backends and shapes, time them against plain SDPA, show a table, write JSON.

Options and `--config` YAML keys are the same (`seq-len` = `seq_len`; `toroidal_cli.sweep_options`);
flags override the file, and the file overrides the library defaults. With no `--config`, the
`quick` preset is the base. The work is `toroidal.bench.run_sweep` (`--tune`: `toroidal.bench.tune`);
the tables are `toroidal_cli.bench_view`, the `--compare` table `toroidal_cli.compare`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from toroidal_cli import bench_view, dryrun, render
from toroidal_cli import compare as comparing
from toroidal_cli.errors import UserError, as_user_error
from toroidal_cli.memory_check import available, sweep_memory_line
from toroidal_cli.options import OutOpt, check_out_path, invocation_argv
from toroidal_cli.plotting import check_plot_out, plot_bench_rows
from toroidal_cli.progress import Progress
from toroidal_cli.results import capture_env, make_record, read_result, write_result
from toroidal_cli.signals import StopSignals
from toroidal_cli.sweep_options import (
    CONFIG_KEYS,
    DRY_RUN_PARAMS,
    BackendOpt,
    BatchOpt,
    CausalOpt,
    ConfigOpt,
    DepthOpt,
    DeviceOpt,
    DModelOpt,
    DtypeOpt,
    HeadDimOpt,
    HeadsOpt,
    LambdaOpt,
    MaxTimeOpt,
    MechanismOpt,
    ModeOpt,
    NoisyOpt,
    OptionOpt,
    PeriodOpt,
    RepeatsOpt,
    SeqLenOpt,
    ThreadsOpt,
    WarmupOpt,
    WindowOpt,
    flags,
    read_options,
)

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from toroidal.bench import BenchSweep

HELP = (
    "Benchmark the backends: time, tokens/s, TFLOP/s and peak memory, against plain SDPA.\n\n"
    "Every option takes a comma list (--seq-len 512,1024,2048); rows are the cartesian product. "
    "With no options it runs the `quick` preset on the CPU (under two minutes). "
    "--config takes a preset (quick, cpu-scaling, gpu) or a YAML file with the same keys."
)
DEFAULT_PRESET = "quick"
COMPARE_METRICS = ("median_ms", "peak_memory_mb")  # lower is better; --fail-on-regression gates time


def build_sweep(values: dict) -> BenchSweep:
    """A library sweep from `read_options` values (keys it lacks take the library defaults)."""
    from toroidal.bench import BenchSweep, can_isolate

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


def compare_with(old_path: Path, rows: list[dict], threshold: float | None) -> comparing.Verdict | None:
    """Print per-row deltas against an older result; with a `threshold`, the gate's verdict on time."""
    from toroidal.bench import KEY_FIELDS

    old_rows = read_old_rows(old_path)
    with as_user_error(f"{old_path} cannot be compared row by row"):
        compared = comparing.compare(
            old_rows,
            rows,
            KEY_FIELDS,
            COMPARE_METRICS,
            direction=lambda row, metric: comparing.LOWER,
            gated=lambda row, metric: metric == "median_ms",
        )
    both = [row for row in compared if row["match"] == "both"]
    render.console.print(bench_view.comparison_table(both, old_path, threshold))
    unmatched = len(compared) - len(both)
    if unmatched:
        only_old = sum(row["match"] == "old_only" for row in compared)
        render.console.print(
            f"[dim]{only_old} row(s) only in the old result, {unmatched - only_old} only in the new one[/]"
        )
    return comparing.gate(both, threshold) if threshold is not None else None


def _progress_label(case) -> str:
    return f"{case.mechanism} {case.backend} N={case.seq_len} D={case.depth} {case.dtype} {case.mode}"


def _row_line(row: dict) -> str:
    """A finished row in a plain progress line: its shape, then its time and tokens/s, or its status."""
    mechanism = row.get("mechanism") or "toroidal"
    label = ("" if mechanism == "toroidal" else f"{mechanism} ") + str(row.get("backend"))
    label += f" N={row.get('seq_len')} D={row.get('depth')} {row.get('dtype')} {row.get('mode')}"
    if row.get("status") != "ok" or row.get("median_ms") is None:
        return f"{label} {row.get('status')}"
    rate = render.format_tokens_per_s(row.get("tokens_per_s"))
    return f"{label} {render.format_number(row['median_ms'])} ms, {rate} tok/s"


def run_tuning(sweep: BenchSweep, path: Path | None, others: dict) -> None:
    """`--tune`: measure the sweep's shape buckets, merge them into the tuning table, show the winners."""
    from toroidal.bench import tune as tuning_run
    from toroidal.kernels import tuning_table as tuning

    given = [name for name, value in others.items() if value]
    if given:
        raise UserError(f"--tune cannot be combined with {', '.join(given)}", "run the tuning separately")
    path = path or tuning.default_path()
    if path is None:
        raise UserError(f"${tuning.ENV_VAR} turns tuning tables off", "pass --tune-out FILE")
    check_out_path(path, "--tune-out")
    with Progress("bench", "case") as progress:  # a case starts: the bar's label and a plain line
        measured = tuning_run.tune(sweep, on_case=lambda label: progress.advance(f"tune {label}"))
    if not measured.entries:
        raise UserError("no backend could run any shape of the sweep", "check --device, --dtype, the shapes")
    try:
        table = tuning.read_table(path).merged(measured) if path.exists() else measured
    except tuning.TuningTableError as error:
        render.console.print(Text(f"note: {error}; replacing it", style="dim"))
        table = measured
    render.console.print(bench_view.tuning_table(measured, sweep.device))
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
    max_time: MaxTimeOpt = None,
    noisy: NoisyOpt = None,
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
        check_plot_out(plot, "--plot")
    if fail_on_regression is not None:
        if compare is None:
            raise UserError("--fail-on-regression needs --compare", "pass --compare OLD.json")
        if not 0 <= fail_on_regression < float("inf"):  # nan too: no row could ever fail it
            raise UserError(
                f"--fail-on-regression {fail_on_regression:g} is not a percentage >= 0", "give e.g. 5"
            )
    if compare is not None:
        read_old_rows(compare)  # fail before the work, not after it
    values = read_options(config, flags(ctx.params), DEFAULT_PRESET)
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

    from toroidal.bench import load_warning, run_sweep

    busy = load_warning(sweep)
    if busy is not None:
        render.err_console.print(Text(f"warning: {busy}", style="yellow"), soft_wrap=True)
    with Progress("bench", "row", total=len(cases)) as progress, StopSignals("the current row") as stop:
        result = run_sweep(
            sweep,
            on_case=lambda index, case: progress.running(_progress_label(case)),
            on_row=lambda row: progress.advance(_row_line(row)),
            should_stop=stop,
        )
    summary = {**result.summary, "notes": result.notes}
    title = f"toroidal bench on {sweep.device}"
    render.console.print(bench_view.bench_table(result.rows, title, sweep.noisy))
    counts = ", ".join(f"{summary[s]} {s}" for s in ("ok", "skipped", "oom", "error") if summary[s])
    render.console.print(f"{summary['rows']} rows ({counts}) in {summary['seconds']:.1f} s")
    noisy_line = bench_view.noisy_line(result.rows, sweep.noisy)
    if noisy_line is not None:
        render.console.print(Text(noisy_line, style="yellow"), soft_wrap=True)
    for note in result.notes:
        render.console.print(Text(f"note: {note}", style="dim"))

    verdict = compare_with(compare, result.rows, fail_on_regression) if compare is not None else None
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
    if not summary["ok"]:  # the JSON written above keeps every row's reason
        where = f" (and in {out})" if out is not None else ""
        fix = f"see each row's reason in the table{where}"
        raise UserError(f"nothing was measured: every row was skipped or failed ({counts})", fix)
    if plot is not None:
        plot_bench_rows(result.rows, plot)
    if verdict is not None and verdict.worst is not None:
        worst = verdict.worst
        render.console.print(
            Text(
                f"regression: {len(verdict.regressions)} row(s) slower by more than {fail_on_regression:g}% "
                f"(worst {worst.row['backend']} N={worst.row['seq_len']}: {worst.worse_pct:+.1f}%)",
                style="bold red",
            )
        )
        raise typer.Exit(1)
    if fail_on_regression is not None:
        render.console.print(Text(f"no row slower by more than {fail_on_regression:g}%", style="green"))

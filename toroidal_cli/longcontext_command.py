"""The long-context command of a suite (`toroidal longbench`, `toroidal scrolls`): lm-eval tasks,
toroidal vs baseline attention.

`--checkpoint DIR` evaluates a `toroidal train` run as trained; `--model` a preset, model folder
or hub model with toroidal attention (options as in `toroidal train`). `--baseline` runs the
same weights with the host's own attention, `--both` runs both and prints the comparison.
The suite names the tasks; passkey, passkey_ll, needle and needle_multikey are generated
locally at `--lengths`. The work is `toroidal.longcontext.run`.
"""

# No `from __future__ import annotations`: the options' help texts are built per suite inside
# make_command, and Typer evaluates string annotations in module globals, where they are unknown.
import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

# The task tables import no torch; the runner and the models are imported when the command runs.
from toroidal.longcontext.tasks import SHIPPED_LENGTHS, SUITES, SYNTHETIC
from toroidal.training.errors import SetupError
from toroidal.training.hub import remote_code_trusted
from toroidal_cli import compare as comparing
from toroidal_cli import dryrun, render
from toroidal_cli.errors import UserError
from toroidal_cli.options import check_out_path, invocation_argv, parse_device
from toroidal_cli.resolve import flag_name
from toroidal_cli.results import capture_env, make_record, read_result, write_result
from toroidal_cli.run_options import PARSERS, TrustRemoteCodeOpt, setup_error
from toroidal_cli.values import parse_int, split_items

if TYPE_CHECKING:
    from toroidal.longcontext import ProgressEvent

KEY_FIELDS = ("task", "metric", "filter")
# Resolved fields whose option is named otherwise (for --dry-run's sources).
DRY_RUN_PARAMS = {"pretrained": "model", "lambda_distance": "lambda_", "include_paths": "include_path"}
# ModelSpec field -> the flag that sets it (toroidal options: None means "not given").
TOROIDAL_FLAGS = {
    "depth": "depth",
    "lambda_distance": "lambda_",
    "period": "period",
    "window": "window",
    "fusion": "fusion",
    "fusion_rank": "fusion_rank",
    "backend": "backend",
    "layers": "layers",
}


# --- options --------------------------------------------------------------------------------------------


def _toroidal_options(values: dict) -> dict:
    """Given toroidal flags, parsed as `toroidal train` parses them ('none' stays None = not given)."""
    options = {}
    for field_name, flag in TOROIDAL_FLAGS.items():
        raw = values[flag]
        if raw is not None:
            options[field_name] = PARSERS[flag](raw, flag_name(flag))
    return options


def _runs(baseline: bool, both: bool) -> tuple[str, ...]:
    if baseline and both:
        raise UserError("give --baseline or --both, not both", "--both runs the baseline too")
    return ("baseline", "toroidal") if both else ("baseline",) if baseline else ("auto",)


def _lengths(value: str | None) -> list[int] | None:
    return None if value is None else [parse_int(item, "--lengths") for item in split_items(value)]


def _read_compare(path: Path | None, command: str) -> dict | None:
    if path is None:
        return None
    other = read_result(path, command=command)
    if not isinstance(other.get("rows"), list):
        raise UserError(f"{path} has no 'rows'", f"pass a file written by `toroidal {command} --out`")
    return other


@contextlib.contextmanager
def quiet_libraries():
    """lm-eval's and transformers' log lines off (warnings about pre-built models); progress bars stay."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "transformers", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _progress(event: "ProgressEvent") -> None:
    """One line per task as it starts (loading is quiet: an error there stays the only line)."""
    if event.kind == "task":
        line = f"[{event.index}/{event.total}] {event.attention}: {event.task}"
        render.err_console.print(Text(line, style="bold"), soft_wrap=True)


# --- tables and comparisons ---------------------------------------------------------------------------


def _direction(rows: list[dict]):
    """A row's direction from the `higher_is_better` lm-eval gave its (task, metric, filter)."""
    higher = {tuple(row[key] for key in KEY_FIELDS): row.get("higher_is_better") for row in rows}

    def direction(row: dict, metric: str) -> int | None:
        found = higher.get(tuple(row[key] for key in KEY_FIELDS))
        return None if found is None else comparing.HIGHER if found else comparing.LOWER

    return direction


def comparison(old_rows: list[dict], new_rows: list[dict], new: str, old: str) -> list[dict]:
    """`compare` rows per (task, metric, filter) of the `value`s; the sides are called `new` and `old`."""
    direction = _direction(old_rows + new_rows)
    return comparing.compare(
        old_rows, new_rows, KEY_FIELDS, ("value",), direction=direction, this=new, other=old
    )


def record_rows(rows: list[dict], new: str, old: str) -> list[dict]:
    """Compared rows as the result file holds them: keys, old and new values, delta, change, better."""
    out = []
    for row in rows:
        change = row["metrics"]["value"]
        keys = {key: value for key, value in row.items() if key not in ("match", "metrics")}
        values = {old: change["other"], new: change["this"]}
        out.append({**keys, **values, **{key: change[key] for key in ("delta", "pct", "better")}})
    return out


def _metric(row: dict) -> str:
    return row["metric"] if row["filter"] in ("none", "") else f"{row['metric']} ({row['filter']})"


def _with_metric_names(rows: list[dict]) -> list[dict]:
    return [{**row, "metric_name": _metric(row)} for row in rows]


def _stderr(value) -> str:
    return "" if value is None else f"± {render.format_number(value)}"


RESULT_COLUMNS = [
    render.Column("attention", no_wrap=True),
    render.Column("task", no_wrap=True),
    render.Column("metric_name", "metric"),
    render.Column("value", justify="right"),
    render.Column("stderr", "stderr", format=_stderr, justify="right"),
    render.Column("samples", justify="right"),
]


def _compared(this: str, other: str) -> list[comparing.Shown]:
    return [comparing.Shown("value", this=this, other=other, sides=(this, other))]


def _compare_keys(runs: bool = False) -> list[render.Column]:
    return [
        *([render.Column("runs", "attention", no_wrap=True)] if runs else []),
        render.Column("task", no_wrap=True),
        render.Column("metric_name", "metric"),
    ]


def _of(rows: list[dict], attention: str) -> list[dict]:
    return [row for row in rows if row["attention"] == attention]


def compare_with_file(this: dict, other: dict) -> list[dict]:
    """This result's rows against another's, run by run (an attention the other lacks: its only run)."""
    other_rows = other["rows"] + other.get("averages", [])
    other_runs = list(dict.fromkeys(row["attention"] for row in other_rows))
    out = []
    for attention in dict.fromkeys(row["attention"] for row in this["rows"]):
        against = attention if attention in other_runs else other_runs[0] if len(other_runs) == 1 else None
        if against is None:
            continue
        rows = comparison(
            _of(other_rows, against), _of(this["rows"] + this["averages"], attention), "this", "other"
        )
        runs = attention if against == attention else f"{attention} vs {against}"
        out += [{"attention": attention, "other_attention": against, "runs": runs, **row} for row in rows]
    return out


# --- the command ----------------------------------------------------------------------------------------


def make_command(suite_name: str):
    """The command function of a suite (`toroidal.longcontext.SUITES`): same options, other task names."""
    suite = SUITES[suite_name]
    default_tasks = (
        ",".join(suite.default) if len(suite.default) <= 4 else ",".join(suite.default[:3]) + ",..."
    )

    def command(
        ctx: typer.Context,
        checkpoint: Annotated[
            Path | None,
            typer.Option(help="A `toroidal train` run folder (model, tokenizer, toroidal layers)."),
        ] = None,
        model: Annotated[
            str | None,
            typer.Option(help="Instead: a preset (configs/models), model folder, .gguf file or hub name."),
        ] = None,
        tasks: Annotated[
            str | None,
            typer.Option(
                help=f"Comma list: {suite.title} names (default {default_tasks}), "
                f"{', '.join(SYNTHETIC)} (generated), or any lm-eval task."
            ),
        ] = None,
        lengths: Annotated[
            str | None,
            typer.Option(
                help="Context lengths in tokens of the generated tasks, e.g. 1024,2048 "
                f"(default {','.join(map(str, SHIPPED_LENGTHS))})."
            ),
        ] = None,
        limit: Annotated[int | None, typer.Option(help="At most N samples per task.")] = None,
        max_length: Annotated[
            int | None,
            typer.Option(help="Tokens the model sees (longer contexts are cut); default its positions."),
        ] = None,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 1,
        baseline: Annotated[
            bool, typer.Option("--baseline", help="Run the same model without toroidal attention.")
        ] = False,
        both: Annotated[
            bool, typer.Option("--both", help="Run baseline and toroidal attention and compare them.")
        ] = False,
        depth: Annotated[str | None, typer.Option(help="Platters D per head (--model; default 2).")] = None,
        lambda_: Annotated[
            str | None, typer.Option("--lambda", help="Torus distance penalty (default 0.1).")
        ] = None,
        period: Annotated[
            str | None, typer.Option(help="Ring period P; default the run's --seq-len or the max length.")
        ] = None,
        window: Annotated[str | None, typer.Option(help="Circular window w (default none).")] = None,
        fusion: Annotated[str | None, typer.Option(help="Depth fusion (--model; default low_rank).")] = None,
        fusion_rank: Annotated[str | None, typer.Option(help="low_rank fusion rank (--model).")] = None,
        backend: Annotated[str | None, typer.Option(help="Toroidal kernel backend (default auto).")] = None,
        layers: Annotated[
            str | None, typer.Option(help="Toroidal layers, e.g. 0,2 (--model; default all).")
        ] = None,
        tokenizer: Annotated[str, typer.Option(help="With --model: bytes or model; auto picks.")] = "auto",
        seed: Annotated[int, typer.Option(help="A preset's random initialization.")] = 0,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
        include_path: Annotated[
            list[Path] | None,
            typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs (repeatable)."),
        ] = None,
        log_samples: Annotated[
            bool,
            typer.Option("--log-samples", help="Write lm-eval's per-sample records to OUT.samples.jsonl."),
        ] = False,
        compare: Annotated[
            Path | None, typer.Option("--compare", help=f"Another `toroidal {suite_name} --out` result.")
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", "-o", help="Also write the result JSON here.")
        ] = None,
        trust_remote_code: TrustRemoteCodeOpt = False,
        dry_run: dryrun.DryRunOpt = False,
    ) -> None:
        check_out_path(out)
        if log_samples and out is None:
            raise UserError("--log-samples needs --out", "the samples go next to the result: --out FILE.json")
        if (checkpoint is None) == (model is None):
            raise UserError("give --checkpoint RUN_FOLDER or --model NAME (one of them)")
        if checkpoint is not None and not checkpoint.is_dir():
            missing = "does not exist" if not checkpoint.exists() else "is not a folder"
            fix = "pass a folder written by `toroidal train`"
            raise UserError(f"--checkpoint {checkpoint} {missing}", fix)
        runs = _runs(baseline, both)
        if device != "auto":
            parse_device(device)  # the wrapper would fall back to the CPU, as lm-eval's HFLM does
        other = _read_compare(compare, suite_name)  # fail before the work
        values = {"lambda_": lambda_, "depth": depth, "period": period, "window": window, "fusion": fusion}
        values.update(fusion_rank=fusion_rank, backend=backend, layers=layers)
        from toroidal.longcontext import LongContextConfig, ModelSpec, run

        try:
            spec = ModelSpec(
                checkpoint=str(checkpoint) if checkpoint else None,
                pretrained=model,
                tokenizer=tokenizer,
                seed=seed,
                **_toroidal_options(values),
            )
            config = LongContextConfig(
                model=spec,
                suite=suite_name,
                runs=runs,
                tasks=split_items(tasks) if tasks is not None else None,
                lengths=_lengths(lengths),
                limit=limit,
                max_length=max_length,
                batch_size=batch_size,
                device=device,
                include_paths=[str(p) for p in include_path or []],
                log_samples=log_samples,
            )
            if dry_run:  # lm-eval decides the context lengths: no memory estimate before it runs
                resolved = {**dataclasses.asdict(spec), **dataclasses.asdict(config), "out": out}
                del resolved["model"]
                found = dryrun.settings(ctx, resolved, params=DRY_RUN_PARAMS, fallback="default or derived")
                dryrun.show(suite_name, found)
                return
            # lm-eval prints some notes (e.g. "bootstrapping for stddev"): stdout keeps only results.
            with (
                quiet_libraries(),
                contextlib.redirect_stdout(sys.stderr),
                remote_code_trusted(trust_remote_code),
            ):
                result = run(config, progress=_progress)
        except SetupError as error:
            raise setup_error(error) from None

        source = f"checkpoint {checkpoint}" if checkpoint else f"model {model}"
        render.console.print(Text(f"toroidal {suite_name}: {source}", style="bold"), soft_wrap=True)
        shown = _with_metric_names(result.rows + result.averages)
        render.console.print(render.table(shown, RESULT_COLUMNS, title=suite.title))
        payload = result.payload()
        if both:
            table = comparison(_of(shown, "baseline"), _of(shown, "toroidal"), "toroidal", "baseline")
            title = "toroidal vs baseline (same weights)"
            compared = _compared("toroidal", "baseline")
            render.console.print(comparing.table(_with_metric_names(table), compared, _compare_keys(), title))
            rows = record_rows(table, "toroidal", "baseline")
            payload["comparison"] = {"old": "baseline", "new": "toroidal", "rows": rows}
        if other is not None:
            table = compare_with_file({"rows": result.rows, "averages": result.averages}, other)
            title = f"this run vs {compare}"
            compared, keys = _compared("this", "other"), _compare_keys(runs=True)
            render.console.print(comparing.table(_with_metric_names(table), compared, keys, title))
            payload["compare"] = {"other": str(compare), "rows": record_rows(table, "this", "other")}
        if out is not None:
            argv = invocation_argv(ctx)
            record = make_record(
                suite_name, result.config, payload, argv=argv, env=capture_env(result.device)
            )
            render.console.print(f"wrote {write_result(out, record)}")
            if log_samples:
                from toroidal.longcontext.runner import write_samples

                render.console.print(
                    f"wrote {write_samples(out.with_name(out.stem + '.samples.jsonl'), result.samples)}"
                )

    return command

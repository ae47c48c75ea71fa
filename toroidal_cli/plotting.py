"""Pictures written by commands: the checks before the work, and bench rows, run folders and eval
results per length drawn.

Used by `toroidal plot` and by the `--plot` option of `bench`, `train` and `eval`. Each picture is FILE.png
plus FILE.plot.json (the numbers drawn); drawing needs the `plot` extra (matplotlib).
"""

from __future__ import annotations

import math
from pathlib import Path

from toroidal import plots
from toroidal.runtime.install import missing_module_message
from toroidal_cli import lengths, render
from toroidal_cli.errors import UserError
from toroidal_cli.options import check_out_path
from toroidal_cli.results import read_result


def check_plot_out(out: Path, option: str = "--out") -> Path:
    """Fail before the work: matplotlib missing, or an output path that cannot be a PNG."""
    try:
        plots.require_matplotlib()
    except plots.PlotUnavailable:
        raise UserError(f"plotting {missing_module_message('matplotlib')}") from None
    check_out_path(out, option)
    if out.suffix.lower() != ".png":
        raise UserError(f"{option} {out} is not a .png file", f"give {option} a name ending in .png")
    return out


def write(draw, *args) -> None:
    """Call a `toroidal.plots` function that writes the PNG and its JSON; say where they went."""
    try:
        png, numbers = draw(*args)
    except OSError as error:
        raise UserError(f"cannot write the plot: {error}", "check the --out path and permissions") from None
    render.console.print(f"wrote {png} and {numbers}")


def merge_bench_results(results: list[tuple[str, list[dict]]]) -> list[dict]:
    """The rows of several bench results (name, rows) as one set: one-N-per-file runs draw lines across N.

    Rows get their result's name as `source`, a series of their own, only where two results measured
    the same row (all its KEY_FIELDS equal): results to compare rather than parts of one sweep.
    """
    from toroidal.bench.rows import KEY_FIELDS  # here, not at the top: the bench package is heavy

    owners: dict[str, set[str]] = {}
    for name, rows in results:
        for row in rows:
            if row.get("status") == "ok":
                owners.setdefault(repr([row.get(key) for key in KEY_FIELDS]), set()).add(name)
    if all(len(names) == 1 for names in owners.values()):
        return [row for _, rows in results for row in rows]
    return [{**row, "source": name} for name, rows in results for row in rows]


def plot_bench_rows(rows: list[dict], out: Path) -> None:
    if not any(row.get("status") == "ok" for row in rows):
        raise UserError("no bench row has status ok: nothing to plot", "plot a result with successful rows")
    write(plots.plot_bench, rows, out)


def read_run(run_dir: Path) -> dict:
    """The metrics record of a `toroidal train` run folder."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder", "pass folders written by `toroidal train --out`")
    return read_result(run_dir / "metrics.json", command="train")


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    runs = {}
    for run_dir in run_dirs:
        record = read_run(run_dir)
        name = run_dir.resolve().name
        if name in runs:
            name = str(run_dir)
        runs[name] = record
    write(plots.plot_train, runs, out)


# --- lengths (`eval --plot`, `plot lengths`) ----------------------------------------------------------------

LENGTH_METRICS = ("perplexity", "bits_per_byte", "bits_per_token", "loss", "passkey_accuracy")


def length_series(runs: list[tuple[str, list[dict], int | None]], metric: str, group: bool) -> list[dict]:
    """Lines of `metric` versus length for `toroidal.plots.plot_lengths`, from runs (label, rows per
    length, training length or None). `group`: runs with one label become one line, their mean with
    the min-max spread, at every length any of them scored; else every label must be its own."""
    if metric not in LENGTH_METRICS:
        raise UserError(f"--metric {metric!r} is not drawn per length", f"use {', '.join(LENGTH_METRICS)}")
    grouped: dict[str, list[tuple[list[dict], int | None]]] = {}
    for label, rows, trained in runs:
        if label in grouped and not group:
            raise UserError(
                f"two results are labelled {label!r}",
                "give each its own --label, or pass --group to draw their mean and spread",
            )
        grouped.setdefault(label, []).append((rows, trained))
    series = []
    for label, members in grouped.items():
        values: dict[int, list[float]] = {}
        for rows, _ in members:
            for row in rows:
                value = row["metrics"].get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    values.setdefault(row["seq_len"], []).append(float(value))
        lengths = sorted(values)
        series.append(
            {
                "label": label,
                "seq_len": lengths,
                "mean": [sum(values[n]) / len(values[n]) for n in lengths],
                "low": [min(values[n]) for n in lengths],
                "high": [max(values[n]) for n in lengths],
                "runs": [len(values[n]) for n in lengths],
                "training_seq_len": sorted({trained for _, trained in members if trained is not None}),
            }
        )
    if not any(line["seq_len"] for line in series):
        raise UserError(f"no result has a {metric} to draw", "pick another --metric")
    return series


def read_length_runs(paths: list[Path], labels: list[str] | None) -> list[tuple[str, list[dict], int | None]]:
    """(label, rows per length, training length) of each `toroidal eval --out` file; labels by file
    name unless given, one per file."""
    if labels and len(labels) != len(paths):
        raise UserError(
            f"{len(labels)} --label for {len(paths)} result files", "give one --label per file, in order"
        )
    runs = []
    for index, path in enumerate(paths):
        record = read_result(path, command="eval")
        rows = lengths.result_rows(record, str(path))
        label = labels[index] if labels else path.stem
        runs.append((label, rows, lengths.summary(record).get("training_seq_len")))
    return runs


def plot_lengths(series: list[dict], out: Path, metric: str = "perplexity") -> None:
    write(plots.plot_lengths, series, out, metric)

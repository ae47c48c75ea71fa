"""`toroidal plot`: pictures of bench results, training runs and attention patterns (a Typer sub-app).

Each subcommand writes FILE.png and FILE.json (the numbers drawn) next to it. Needs the
`plot` extra (matplotlib). `toroidal bench --plot` and `toroidal train --plot` reuse
`plot_bench_rows` and `plot_runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toroidal import plots
from toroidal_cli import render
from toroidal_cli.errors import UserError, user_errors
from toroidal_cli.results import read_result

HELP = "Draw pictures: bench scaling, training curves, attention heat maps (PNG + JSON of the numbers)."
MAX_ATTENTION_TOKENS = 2048  # N*D: the heat map and its JSON hold (N*D)^2 numbers

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False)

OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="The PNG to write; the numbers go to the same name with .json.")
]


# --- shared with bench --plot and train --plot ---------------------------------------------------------


def check_plot_out(out: Path, option: str = "--out") -> Path:
    """Fail before the work: matplotlib missing, or an output path that cannot be a PNG."""
    try:
        plots.require_matplotlib()
    except plots.PlotUnavailable:
        raise UserError("plotting needs matplotlib, which is not installed", plots.INSTALL_HINT) from None
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder", f"give {option} a file name such as plots/bench.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"{option} {out} is not a .png file", f"give {option} a name ending in .png")
    return out


def _wrote(paths: tuple[Path, Path]) -> None:
    render.console.print(f"wrote {paths[0]} and {paths[1]}")


def _write(draw, *args) -> None:
    try:
        _wrote(draw(*args))
    except OSError as error:
        raise UserError(f"cannot write the plot: {error}", "check the --out path and permissions") from None


def plot_bench_rows(rows: list[dict], out: Path) -> None:
    if not any(row.get("status") == "ok" for row in rows):
        raise UserError("no bench row has status ok: nothing to plot", "plot a result with successful rows")
    _write(plots.plot_bench, rows, out)


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    runs = {}
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(
                f"{run_dir} is not a run folder", "pass folders written by `toroidal train --out`"
            )
        name = run_dir.resolve().name
        if name in runs:
            name = str(run_dir)
        runs[name] = read_result(run_dir / "metrics.json", command="train")
    _write(plots.plot_train, runs, out)


# --- subcommands ---------------------------------------------------------------------------------------


def _bench_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        record = read_result(path, command="bench")
        if not isinstance(record.get("rows"), list):
            raise UserError(f"{path} has no 'rows'", "pass a JSON file written by `toroidal bench --out`")
        source = {"source": path.stem} if len(paths) > 1 else {}
        rows += [{**row, **source} for row in record["rows"]]
    return rows


@app.command("bench", help="Time, peak memory and overhead versus N per backend, from bench result JSONs.")
@user_errors("plot bench")
def bench(
    results: Annotated[list[Path], typer.Argument(help="Result files of `toroidal bench --out`.")],
    out: OutOpt,
) -> None:
    check_plot_out(out)
    plot_bench_rows(_bench_rows(results), out)


@app.command("train", help="Training and validation loss and perplexity of one or more run folders.")
@user_errors("plot train")
def train(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of `toroidal train --out`.")],
    out: OutOpt,
) -> None:
    check_plot_out(out)
    plot_runs(runs, out)


def _optional_int(value: str, option: str) -> int | None:
    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"{option} {value!r} is not an integer", f"give {option} a whole number or none"
        ) from None


@app.command("attention", help="Heat maps of one head's attention weights (reference backend, random input).")
@user_errors("plot attention")
def attention(
    out: OutOpt,
    seq_len: Annotated[int, typer.Option("--seq-len", "-n", help="Sequence length N.")] = 32,
    depth: Annotated[int, typer.Option("--depth", "-d", help="Platters D per head.")] = 2,
    lambda_: Annotated[float, typer.Option("--lambda", help="Torus distance penalty lambda.")] = 0.1,
    window: Annotated[str, typer.Option(help="Circular window w, or none.")] = "none",
    causal: Annotated[bool, typer.Option("--causal/--no-causal", help="Causal masking.")] = False,
    period: Annotated[str, typer.Option(help="Ring period P, or none for P = N.")] = "none",
    head: Annotated[int, typer.Option(help="Which head to draw (of --heads).")] = 0,
    heads: Annotated[int, typer.Option(help="Number of heads of the random module.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the input.")] = 0,
) -> None:
    check_plot_out(out)
    if seq_len < 1 or depth < 1:
        raise UserError("--seq-len and --depth must be at least 1", "give positive values")
    if seq_len * depth > MAX_ATTENTION_TOKENS:
        raise UserError(
            f"N*D = {seq_len * depth} is too large to draw",
            f"keep --seq-len x --depth <= {MAX_ATTENTION_TOKENS}",
        )
    settings = {
        "seq_len": seq_len,
        "depth": depth,
        "lambda": lambda_,
        "window": _optional_int(window, "--window"),
        "causal": causal,
        "period": _optional_int(period, "--period"),
        "head": head,
        "seed": seed,
    }
    try:
        weights = plots.attention_weights(
            seq_len,
            depth,
            lambda_distance=lambda_,
            window=settings["window"],
            causal=causal,
            period=settings["period"],
            head=head,
            heads=heads,
            seed=seed,
        )
    except ValueError as error:
        raise UserError(str(error), "fix the options") from None
    _write(plots.plot_attention, weights, depth, out, settings)

"""`toroidal plot`: pictures of bench results, training runs and attention patterns (a Typer sub-app).

Each subcommand writes FILE.png and FILE.plot.json (the numbers drawn) next to it. Needs the
`plot` extra (matplotlib). The drawing is `toroidal_cli.plotting`, which `bench --plot`,
`train --plot` and `eval --plot` use too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toroidal import plots
from toroidal.training.errors import CheckpointError, SetupError  # (torch and models: imported when drawn)
from toroidal_cli import dryrun, plotting
from toroidal_cli.config_paths import relative_to_file
from toroidal_cli.errors import UserError, user_errors
from toroidal_cli.help import Command, Group
from toroidal_cli.plotting import check_plot_out, merge_bench_results, plot_bench_rows, plot_runs, write
from toroidal_cli.resolve import config_path, load_config
from toroidal_cli.results import read_result
from toroidal_cli.values import parse_bool, parse_float, parse_int

HELP = "Draw pictures: bench scaling, training curves, attention heat maps (PNG + JSON of the numbers)."
MAX_ATTENTION_TOKENS = 2048  # N*D: the heat map and its JSON hold (N*D)^2 numbers

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, cls=Group)

OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="The PNG to write; the numbers go to FILE.plot.json.")
]


# --- subcommands ---------------------------------------------------------------------------------------


def _bench_rows(paths: list[Path]) -> list[dict]:
    """The rows of every file, merged (`merge_bench_results`: named by file only where files overlap)."""
    results = []
    for path in paths:
        record = read_result(path, command="bench")
        rows_ok = isinstance(record.get("rows"), list) and all(isinstance(r, dict) for r in record["rows"])
        if not rows_ok:
            raise UserError(f"{path} has no 'rows'", "pass a JSON file written by `toroidal bench --out`")
        results.append((path.stem, record["rows"]))
    return merge_bench_results(results)


@app.command(
    "bench", cls=Command, help="Time, peak memory and overhead versus N per backend, from bench result JSONs."
)
@user_errors("plot bench")
def bench(
    ctx: typer.Context,
    results: Annotated[list[Path], typer.Argument(help="Result files of `toroidal bench --out`.")],
    out: OutOpt,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    check_plot_out(out)
    rows = _bench_rows(results)
    if dry_run:
        resolved = {"results": results, "rows": len(rows), "out": out, "numbers": plots.json_path(out)}
        dryrun.show("plot bench", dryrun.settings(ctx, resolved, fallback="derived"))
        return
    plot_bench_rows(rows, out)


@app.command(
    "train", cls=Command, help="Training and validation loss and perplexity of one or more run folders."
)
@user_errors("plot train")
def train(
    ctx: typer.Context,
    runs: Annotated[list[Path], typer.Argument(help="Run folders of `toroidal train --out`.")],
    out: OutOpt,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    check_plot_out(out)
    if dry_run:
        for run in runs:  # the same checks as drawing, without drawing
            if not run.is_dir():
                raise UserError(f"{run} is not a run folder", "pass run folders of `toroidal train --out`")
            read_result(run / "metrics.json", command="train")
        resolved = {"runs": runs, "out": out, "numbers": plots.json_path(out)}
        dryrun.show("plot train", dryrun.settings(ctx, resolved, fallback="derived"))
        return
    plot_runs(runs, out)


@app.command(
    "lengths",
    cls=Command,
    help="Perplexity versus evaluation length from `toroidal eval --seq-len 128,256,...` results: a line "
    "per file (or per label, with --group: the mean and the min-max band), training lengths marked.",
)
@user_errors("plot lengths")
def lengths_plot(
    ctx: typer.Context,
    results: Annotated[list[Path], typer.Argument(help="Result files of `toroidal eval --out`.")],
    out: OutOpt,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="A label per file, in order (default: the file names)."),
    ] = None,
    group: Annotated[
        bool, typer.Option("--group", help="Average files with the same label (seeds of one arm).")
    ] = False,
    metric: Annotated[
        str, typer.Option(help="perplexity, bits_per_byte, bits_per_token, loss or passkey_accuracy.")
    ] = "perplexity",
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    check_plot_out(out)
    metric = metric.strip().lower()
    series = plotting.length_series(plotting.read_length_runs(results, label), metric, group)
    if dry_run:
        resolved = {"results": results, "label": label, "group": group, "metric": metric, "out": out}
        resolved.update(lines=len(series), numbers=plots.json_path(out))
        dryrun.show("plot lengths", dryrun.settings(ctx, resolved, fallback="derived"))
        return
    plotting.plot_lengths(series, out, metric)


# Settings of `plot attention`: flags over the --config YAML over these defaults.
ATTENTION_DEFAULTS = {
    "seq_len": 32,
    "depth": 2,
    "lambda": 0.1,
    "window": None,
    "causal": False,
    "period": None,
    "head": 0,
    "heads": 2,
    "seed": 0,
    "checkpoint": None,
    "model": None,
    "text": None,
    "layer": None,
}
# What a trained run fixes itself: the model's own depth, lambda, window, period, causality, heads.
RUN_FIXED = ("seq_len", "depth", "lambda", "window", "causal", "period", "heads", "seed")
# What a pretrained model fixes: its heads and causality; the text fixes N. The torus is the flags'.
MODEL_FIXED = ("seq_len", "causal", "heads", "seed")
RANDOM_ONLY = ("text", "layer")  # meaningful only with a checkpoint or a model


def _attention_value(key: str, value, where: str):
    """One setting from a flag string or a YAML value, checked."""
    if key in ("checkpoint", "model", "text"):
        return None if value is None else str(value)
    if key == "causal":
        return parse_bool(value, where)
    if key == "lambda":
        return parse_float(value, where, minimum=0.0)
    if key in ("window", "period", "layer"):
        return parse_int(value, where, minimum=0 if key != "period" else 1, none_ok=True)
    number = parse_int(value, where, minimum=0 if key in ("head", "seed") else 1)
    if key == "seed":
        from toroidal.training.data import MAX_SEED  # (imports torch: only for a given seed)

        if number > MAX_SEED:
            raise UserError(f"{where}: {number} is out of range", f"use a seed from 0 to {MAX_SEED}")
    return number


def _source_fixes(settings: dict, fixed: tuple, chosen: dict, flag: str, what: str, why: str) -> None:
    """A drawn run or model: no setting it fixes may be chosen, and it needs --text."""
    chosen_fixed = [key for key in fixed if key in chosen]
    if chosen_fixed:
        raise UserError(f"--{chosen_fixed[0].replace('_', '-')} cannot change {what}", f"drop it: {why}")
    if not settings["text"]:
        raise UserError(f"{flag} needs --text", 'pass the text to run through it, e.g. --text "..."')


def attention_settings(config: Path | None, flags: dict) -> dict:
    """The resolved settings: flags (None = not given) over the YAML file over ATTENTION_DEFAULTS."""
    from_file = {}
    if config:
        path = config_path(str(config), "plot")
        from_file = relative_to_file(load_config(path, tuple(ATTENTION_DEFAULTS)), path, ("checkpoint",), ())
    given = {key: value for key, value in flags.items() if value is not None}
    settings = dict(ATTENTION_DEFAULTS)
    for key, value in {**from_file, **given}.items():
        where = f"--{key.replace('_', '-')}" if key in given else f"{key} in {config}"
        settings[key] = _attention_value(key, value, where)
    if settings["checkpoint"] is not None and settings["model"] is not None:
        raise UserError("--checkpoint and --model exclude each other", "pass one of them")
    if settings["model"] is not None:
        _source_fixes(settings, MODEL_FIXED, {**from_file, **given}, "--model", "a pretrained model",
                      "the model fixes heads and causality, the text fixes the length")
    elif settings["checkpoint"] is not None:
        _source_fixes(settings, RUN_FIXED, {**from_file, **given}, "--checkpoint", "a trained run",
                      "the checkpoint fixes depth, lambda, window, period, causality and heads")
    else:
        extra = [key for key in RANDOM_ONLY if settings[key] is not None]
        if extra:
            raise UserError(
                f"--{extra[0]} needs --checkpoint or --model",
                "pass --checkpoint RUN_FOLDER or --model, or drop it",
            )
    return settings


def _random_module_weights(settings: dict):
    from toroidal.training import attention_maps

    if settings["seq_len"] * settings["depth"] > MAX_ATTENTION_TOKENS:
        raise UserError(
            f"N*D = {settings['seq_len'] * settings['depth']} is too large to draw",
            f"keep --seq-len x --depth <= {MAX_ATTENTION_TOKENS}",
        )
    try:
        return attention_maps.attention_weights(
            settings["seq_len"],
            settings["depth"],
            lambda_distance=settings["lambda"],
            window=settings["window"],
            causal=settings["causal"],
            period=settings["period"],
            head=settings["head"],
            heads=settings["heads"],
            seed=settings["seed"],
        )
    except ValueError as error:
        raise UserError(str(error), "fix the options") from None


def _trained_weights(settings: dict):
    from toroidal.training import attention_maps

    try:
        return attention_maps.trained_attention_weights(
            settings["checkpoint"],
            settings["text"],
            layer=settings["layer"],
            head=settings["head"],
            max_tokens=MAX_ATTENTION_TOKENS,
        )
    except CheckpointError as error:
        raise UserError(str(error)) from None
    except ValueError as error:
        raise UserError(str(error), "pick another --text, --layer or --head") from None


def _model_weights(settings: dict):
    from toroidal.training import attention_maps

    torus = {"depth": settings["depth"], "lambda_distance": settings["lambda"]}
    torus.update(window=settings["window"], period=settings["period"])
    try:
        return attention_maps.model_attention_weights(
            settings["model"],
            settings["text"],
            layer=settings["layer"] or 0,
            head=settings["head"],
            torus=torus,
            max_tokens=MAX_ATTENTION_TOKENS,
        )
    except SetupError as error:
        raise UserError(error.message, error.fix) from None
    except ValueError as error:
        raise UserError(str(error), "pick another --text, --layer, --head or torus option") from None


@app.command(
    "attention",
    cls=Command,
    help="Heat maps of one head's attention weights (reference backend): of a random module, of a "
    "trained run (--checkpoint), or of toroidal attention put untrained into one layer of a pretrained "
    "model (--model: a preset, folder, .gguf file or hub name), on real text (--text).",
)
@user_errors("plot attention")
def attention(
    ctx: typer.Context,
    out: OutOpt,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A YAML file with these options as keys.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A `toroidal train` run folder to draw.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Instead: a pretrained model (preset, folder, .gguf or hub name)."),
    ] = None,
    text: Annotated[
        str | None, typer.Option("--text", help="Text to run through the checkpoint or model.")
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer", help="Toroidal layer of the checkpoint (default: the first), or of --model [0]."
        ),
    ] = None,
    seq_len: Annotated[str | None, typer.Option("--seq-len", "-n", help="Sequence length N [32].")] = None,
    depth: Annotated[str | None, typer.Option("--depth", "-d", help="Platters D per head [2].")] = None,
    lambda_: Annotated[str | None, typer.Option("--lambda", help="Torus distance penalty [0.1].")] = None,
    window: Annotated[str | None, typer.Option(help="Circular window w, or none [none].")] = None,
    causal: Annotated[bool | None, typer.Option("--causal/--no-causal", help="Causal masking [no].")] = None,
    period: Annotated[str | None, typer.Option(help="Ring period P, or none for P = N [none].")] = None,
    head: Annotated[str | None, typer.Option(help="Which head to draw [0].")] = None,
    heads: Annotated[str | None, typer.Option(help="Number of heads of the random module [2].")] = None,
    seed: Annotated[str | None, typer.Option(help="Seed of the random weights and input [0].")] = None,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    check_plot_out(out)
    flags = {
        "seq_len": seq_len, "depth": depth, "lambda": lambda_, "window": window, "causal": causal,
        "period": period, "head": head, "heads": heads, "seed": seed,
        "checkpoint": str(checkpoint) if checkpoint is not None else None, "model": model, "text": text,
        "layer": layer,
    }  # fmt: skip
    settings = attention_settings(config, flags)
    if dry_run:
        from_file = load_config(config_path(str(config), "plot"), tuple(ATTENTION_DEFAULTS)) if config else {}
        found = dryrun.settings(
            ctx,
            {**settings, "out": out},
            from_file=from_file,
            file_label=f"config {config}",
            params={"lambda": "lambda_"},
        )
        dryrun.show("plot attention", found)
        return
    if settings["model"] is not None:
        drawn = _model_weights(settings)
        picture = {
            "model": settings["model"],
            "layer": drawn.layer,
            "head": settings["head"],
            "depth": drawn.depth,
            "lambda": settings["lambda"],
            "period": drawn.period,
            "tokens": len(drawn.tokens),
        }
        write(plots.plot_attention, drawn.weights, drawn.depth, out, picture, drawn.tokens)
        return
    if settings["checkpoint"] is None:
        picture = {key: settings[key] for key in ("seq_len", "depth", "lambda", "window", "causal")}
        picture.update(period=settings["period"], head=settings["head"], seed=settings["seed"])
        write(plots.plot_attention, _random_module_weights(settings), settings["depth"], out, picture)
        return
    trained = _trained_weights(settings)
    picture = {
        "checkpoint": settings["checkpoint"],
        "layer": trained.layer,
        "head": settings["head"],
        "depth": trained.depth,
        "period": trained.period,
        "tokens": len(trained.tokens),
    }
    write(plots.plot_attention, trained.weights, trained.depth, out, picture, trained.tokens)

"""`toroidal eval`: perplexity, bits per byte, passkey accuracy, speed and memory of a run or a model.

`--checkpoint DIR` evaluates a `toroidal train` run folder (its model, tokenizer and mechanism
layers; its data options are the defaults). `--model` evaluates a preset, model folder or hub
model with `--mechanism standard|toroidal|...` (`--attention baseline|toroidal` is its old
name). `--split` picks the text scored (heldout by default: never what `train` trained on) and
`--max-tokens` a budget that scores the same text at any batch size; the result's `scored` block
records the text (token count and fingerprint). `--compare OTHER.json` prints a table against
another eval result, refusing one scored on other text unless `--force`;
`--fail-on-regression PCT` makes a quality regression exit 1 (never across different text).

`--seq-len 128,256,512` scores each length on the same text (length extrapolation): a row per
length in the table and the result (`rows`, `summary`); `--compare` and the gate go length by
length; `--plot FILE.png` draws perplexity versus length with the training length marked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

# The library (and torch) is imported when the command runs, not for --help.
from toroidal.training.errors import SetupError
from toroidal.training.metric_names import STREAMING_METRICS
from toroidal_cli import compare as comparing
from toroidal_cli import dryrun, lengths, plotting, render
from toroidal_cli.errors import UserError
from toroidal_cli.memory_check import refuse_if_too_big
from toroidal_cli.options import OutOpt, check_out_path
from toroidal_cli.progress import Progress
from toroidal_cli.resolve import flag_name, from_command_line
from toroidal_cli.results import capture_env, make_record, read_result, write_result
from toroidal_cli.run_options import FIELD_OF, TrustRemoteCodeOpt, resolve_options, resolved_argv, setup_error
from toroidal_cli.values import parse_float

HELP = (
    "Evaluate a trained run (--checkpoint) or a model (--model): perplexity, bits per byte, "
    "passkey accuracy, tokens/s and peak memory; compare with another result (--compare)."
)

MODEL_OPTIONS = ["model", "attention", "depth", "lambda_", "period", "window", "fusion", "fusion_rank"]
MODEL_OPTIONS += ["backend", "layers", "tokenizer", "mechanism", "mechanism_option", "position"]
DATA_OPTIONS = ["dataset", "split", "data_period", "data_vocab", "passkey_digits", "seq_len", "batch_size"]
OPTION_NAMES = MODEL_OPTIONS + DATA_OPTIONS + ["max_batches", "max_tokens", "seed", "precision", "device"]

# +1: higher is better, -1: lower is better; metrics not listed are shown without a verdict.
DIRECTIONS = {
    "loss": -1,
    "perplexity": -1,
    "bits_per_token": -1,
    "bits_per_byte": -1,
    "passkey_accuracy": 1,
    "tokens_per_s": 1,
    "seconds": -1,
    "peak_memory_mb": -1,
}
QUALITY = ("loss", "perplexity", "bits_per_token", "bits_per_byte", "passkey_accuracy")
# --streaming: the same metrics scored token by token on LatentKV states (gate them with --gate NAME).
STREAMING = tuple(f"streaming_{name}" for name in STREAMING_METRICS)
DIRECTIONS.update({f"streaming_{name}": DIRECTIONS[name] for name in STREAMING_METRICS})
STREAMING_OPTIONS = ["streaming", "latent_size", "update"]
METRIC_ORDER = (*QUALITY, "tokens_per_s", "seconds", "peak_memory_mb", "tokens", "samples", "parameters")
METRIC_ORDER += STREAMING


# --- comparison ----------------------------------------------------------------------------------------


def comparison(this: dict, other: dict, gated: tuple[str, ...]) -> list[dict]:
    """`compare` rows, one per metric both results have a number for, in METRIC_ORDER."""
    shared = [
        name
        for name in sorted(set(this) & set(other), key=lambda n: (METRIC_ORDER + (n,)).index(n))
        if isinstance(this[name], (int, float)) and isinstance(other[name], (int, float))
    ]
    return comparing.compare(
        [{"metric": name, "value": other[name]} for name in shared],
        [{"metric": name, "value": this[name]} for name in shared],
        ("metric",),
        ("value",),
        direction=lambda row, _: DIRECTIONS.get(row["metric"]),
        gated=lambda row, _: row["metric"] in gated,
    )


def _number(value) -> str:
    """Counts stay integers (`comparing.compare` gives floats), other values compact."""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return render.format_number(value)


def _metric_value(name: str, value):
    """tokens/s as every command writes it (`render.format_tokens_per_s`); other values as they are."""
    return render.format_tokens_per_s(value) if name.endswith("tokens_per_s") else value


COMPARED = [comparing.Shown("value", this="this run", this_first=True, format=_number)]
COMPARE_KEYS = [render.Column("metric", no_wrap=True)]
METRIC_COLUMNS = [render.Column("metric", no_wrap=True), render.Column("value", justify="right")]


def length_comparison(this_rows: list[dict], other_rows: list[dict], gated: tuple[str, ...]) -> list[dict]:
    """`compare` rows, one per length in either result (`match` says where it is missing), each
    with the metrics both results have a number for at some length, in METRIC_ORDER."""

    def numbers(rows):
        return {n for row in rows for n, v in row["metrics"].items() if isinstance(v, (int, float))}

    shared = numbers(this_rows) & numbers(other_rows)
    names = sorted(shared, key=lambda n: (METRIC_ORDER + (n,)).index(n))
    return comparing.compare(
        [{"seq_len": row["seq_len"], **row["metrics"]} for row in other_rows],
        [{"seq_len": row["seq_len"], **row["metrics"]} for row in this_rows],
        ("seq_len",),
        names,
        direction=lambda row, name: DIRECTIONS.get(name),
        gated=lambda row, name: name in gated,
    )


# Per length: these metrics' other and this values and the change (the full set goes to the JSON).
LENGTH_SHOWN = (("perplexity", "ppl"), ("bits_per_byte", "bits/byte"), ("passkey_accuracy", "passkey"))
LENGTH_SHOWN += (("tokens_per_s", "tokens/s"),)


def _length_shown(compared: list[dict]) -> list[comparing.Shown]:
    names = {name for row in compared for name in row["metrics"]}
    shown = [(name, short) for name, short in LENGTH_SHOWN if name in names]
    if "bits_per_byte" not in names and "bits_per_token" in names:
        shown.insert(1, ("bits_per_token", "bits/token"))
    return [
        comparing.Shown(
            name, this=f"{short} this", other=f"{short} other", delta=None, change=f"{short} Δ", better=None,
            this_first=True, format=render.format_tokens_per_s if name == "tokens_per_s" else _number,
        )
        for name, short in shown
    ]  # fmt: skip


def _config_notes(this: dict, other: dict) -> list[str]:
    keys = ("checkpoint", "model", "mechanism", "dataset", "split", "seq_len", "lengths", "max_tokens")
    keys += ("max_batches",)
    keys += ("device",)
    return [
        f"{key}: {other.get(key)!r} -> {this.get(key)!r}" for key in keys if this.get(key) != other.get(key)
    ]


def _comparison_notes(config, other: dict, mismatch) -> None:
    """How the two runs' configs differ, and a warning when they were scored on different text."""
    other_config = other.get("config") if isinstance(other.get("config"), dict) else {}
    for note in _config_notes(config, other_config):
        render.console.print(Text(f"note: the runs differ in {note}", style="dim"))
    if mismatch is not None:
        line = f"toroidal eval: warning: compared across different text (--force): {mismatch[0]}"
        render.err_console.print(Text(line, style="bold yellow"), soft_wrap=True)


def _comparison_record(compare: Path, mismatch, rows: list) -> dict:
    """The `comparison` entry of a result: which file, its rows, and whether the text was the same."""
    record = {"other": str(compare), "same_text": mismatch is None, "rows": rows}
    if mismatch is not None:
        record["different_text"] = mismatch[0]
    return record


def _text_mismatch(this_scored: dict, other: dict, compare: Path) -> tuple[str, str] | None:
    """(why, fix) when this result and `other` did not score the same text, else None."""
    other_scored = comparing.recorded_scored(other)
    reason = comparing.text_mismatch(this_scored, other_scored, str(compare))
    if reason is None:
        return None
    if other_scored is None:
        return reason, f"evaluate {compare} again with this version, or pass --force to compare anyway"
    fix = "score both with the same --dataset, --split, --seq-len and --max-tokens"
    return reason, f"{fix}, or pass --force to compare anyway"


def _refuse_across_texts(mismatch: tuple[str, str] | None, force: bool, threshold: float | None) -> None:
    """No comparison across different text without --force, and never a gate."""
    if mismatch is None:
        return
    reason, fix = mismatch
    if threshold is not None:
        fix = "gate only results scored on the same text"
        raise UserError(f"--fail-on-regression cannot apply: {reason}", fix)
    if not force:
        raise UserError(f"--compare: {reason}", fix)


# --- the command ---------------------------------------------------------------------------------------


def command(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A `toroidal train` run folder (model, tokenizer, toroidal layers).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Instead: tiny, a preset, a model folder, a .gguf file or a hub name.")
    ] = None,
    position: Annotated[
        str, typer.Option(help="With a preset: rope (its own position encoding) or none (no rotary).")
    ] = "rope",
    attention: Annotated[
        str | None, typer.Option(help="With --model: old name of --mechanism, baseline or toroidal.")
    ] = None,
    mechanism: Annotated[
        str | None,
        typer.Option("--mechanism", "-m", help="With --model: standard (default), toroidal or another one."),
    ] = None,
    mechanism_option: Annotated[
        list[str] | None,
        typer.Option("--mechanism-option", help="With --model: a mechanism option NAME=VALUE (repeatable)."),
    ] = None,
    depth: Annotated[int, typer.Option(help="With --model: platters D per head.")] = 2,
    lambda_: Annotated[float, typer.Option("--lambda", help="With --model: torus distance penalty.")] = 0.1,
    period: Annotated[str, typer.Option(help="With --model: ring period; none: --seq-len.")] = "none",
    window: Annotated[str, typer.Option(help="With --model: circular window, or none.")] = "none",
    fusion: Annotated[str, typer.Option(help="With --model: depth fusion mode.")] = "low_rank",
    fusion_rank: Annotated[str, typer.Option(help="With --model: low_rank fusion rank, or none.")] = "none",
    backend: Annotated[str, typer.Option(help="With --model: toroidal kernel backend, or auto.")] = "auto",
    layers: Annotated[
        str, typer.Option(help="With --model: toroidal layers, e.g. 0,2; all by default.")
    ] = "all",
    tokenizer: Annotated[str, typer.Option(help="With --model: bytes or model; auto picks.")] = "auto",
    dataset: Annotated[
        str,
        typer.Option(help="periodic, sinusoidal, passkey, text:PATH, code:DIR, wikitext2, hf:NAME[:CONFIG]."),
    ] = "periodic",
    split: Annotated[
        str,
        typer.Option(
            help="heldout: what `train` held out (text: its last tenth, code: held-out files; synthetic: "
            "the test stream; hub: test split); all: the whole text; train: what `train` trained on."
        ),
    ] = "heldout",
    data_period: Annotated[int, typer.Option(help="periodic: pattern length.")] = 8,
    data_vocab: Annotated[int, typer.Option(help="periodic, sinusoidal: distinct tokens.")] = 16,
    passkey_digits: Annotated[int, typer.Option(help="passkey: digits of the pass key.")] = 5,
    seq_len: Annotated[
        str,
        typer.Option(
            help="Tokens per sample; several (128,256,512) score each on the same text, a row per length."
        ),
    ] = "128",
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 8,
    max_batches: Annotated[
        str, typer.Option(help="At most this many batches; none: all text, 16 of synthetic data.")
    ] = "none",
    max_tokens: Annotated[
        str,
        typer.Option(
            help="Score the first ceil(N / seq-len) samples, the same text at any --batch-size (e.g. 64k); "
            "not with --max-batches."
        ),
    ] = "none",
    seed: Annotated[int, typer.Option(help="Seed of synthetic data (and of a preset's random init).")] = 0,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 / fp16 autocast on CUDA.")] = "fp32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    streaming: Annotated[
        bool,
        typer.Option(
            "--streaming",
            help="Also score token by token on constant-size LatentKV states (every layer toroidal).",
        ),
    ] = False,
    latent_size: Annotated[int, typer.Option(help="With --streaming: latent slots per head.")] = 64,
    update: Annotated[
        str, typer.Option(help="With --streaming: linear or gru (untrained update parameters).")
    ] = "linear",
    compare: Annotated[
        Path | None, typer.Option("--compare", help="Another `toroidal eval --out` result to compare with.")
    ] = None,
    fail_on_regression: Annotated[
        str | None,
        typer.Option(help="Exit 1 if a gated metric is worse than --compare's by more than PCT percent."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Compare with a result scored on other text (marked; --fail-on-regression still refuses).",
        ),
    ] = False,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate", help="Metric gated by --fail-on-regression (repeatable; default: quality metrics)."
        ),
    ] = None,
    out: OutOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw perplexity versus length to this PNG, the training length marked (+ FILE.plot.json).",
        ),
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    check_out_path(out)
    if plot is not None:
        plotting.check_plot_out(plot, "--plot")
    threshold = (
        None if fail_on_regression is None else parse_float(fail_on_regression, "--fail-on-regression")
    )
    if threshold is not None and compare is None:
        raise UserError("--fail-on-regression needs --compare", "pass the result to compare with")
    gated = tuple(gate) if gate else QUALITY
    unknown = [name for name in gated if name not in DIRECTIONS]
    if unknown:
        raise UserError(f"--gate {unknown[0]!r} is not a comparable metric", f"use {', '.join(DIRECTIONS)}")
    other = read_result(compare, command="eval") if compare is not None else None  # fail before the work
    if other is not None and (lengths.is_multi(other) or not isinstance(other.get("metrics"), dict)):
        lengths.result_rows(other, str(compare))  # malformed: one line now
    if force and other is None:
        raise UserError("--force only applies with --compare", "pass --compare OTHER.json or drop --force")
    unused = [name for name in ("latent_size", "update") if not streaming and from_command_line(ctx, name)]
    if unused:
        flag = "--" + unused[0].replace("_", "-")
        raise UserError(f"{flag} only applies with --streaming", f"add --streaming or drop {flag}")
    values = _options(ctx, checkpoint, model)
    several = values["lengths"] is not None
    other_rows = lengths.result_rows(other, str(compare)) if other is not None and several else None
    if other is not None and not several:  # one length: the other result's row at it, as one result
        other = lengths.as_one_length(other, values["seq_len"], str(compare))
    if other is not None and not several and comparing.recorded_scored(other) is None:  # before the work
        _refuse_across_texts(_text_mismatch({}, other, compare), force, threshold)

    def before_scoring(scored: dict) -> None:  # a token count that differs already: refuse before the work
        if other is None:
            return
        if not several:
            if comparing.recorded_scored(other) is not None:
                _refuse_across_texts(_text_mismatch(scored, other, compare), force, threshold)
            return
        row = lengths.row_at(other_rows, scored["seq_len"])
        if row is not None:
            mismatch = _text_mismatch(scored, {"scored": row.get("scored")}, compare)
            _refuse_across_texts(mismatch, force, threshold)

    values.update(streaming=streaming, latent_size=latent_size, update=update.strip().lower())
    from toroidal.training.evaluate import RUN_DEFAULTS, EvalConfig, evaluate
    from toroidal.training.footprint import eval_footprint
    from toroidal.training.hub import remote_code_trusted

    try:
        with remote_code_trusted(trust_remote_code):
            config = EvalConfig(checkpoint=str(checkpoint) if checkpoint else None, **values)
            longest = replace(config, seq_len=max(config.lengths), lengths=None) if several else config
            footprint = eval_footprint(longest)  # the longest window needs the most memory
            if dry_run:
                shown = {**asdict(config), "out": out, "compare": compare}
                shown.update({"plot": plot} if plot is not None else {})
                if not several:
                    del shown["lengths"]
                found = dryrun.settings(
                    ctx,
                    shown,
                    from_file=RUN_DEFAULTS if checkpoint is not None else (),
                    file_label=f"checkpoint {checkpoint}",
                    params={**{field: name for name, field in FIELD_OF.items()}, "lengths": "seq_len"},
                )
                dryrun.show("eval", found, footprint)
                return
            refuse_if_too_big(footprint)
            with Progress("eval", "sample") as progress:  # samples scored, after each batch
                result = evaluate(
                    config,
                    progress=lambda done, total: progress.update(done, total=total),
                    before_scoring=before_scoring,
                )
    except SetupError as error:
        raise setup_error(error) from None

    argv = _argv(values, config, checkpoint, streaming, trust_remote_code)
    source = f"checkpoint {checkpoint}" if checkpoint else f"{result.config['mechanism']} {model}"
    label = checkpoint.resolve().name if checkpoint else f"{model} {result.config['mechanism']}"
    if several:
        against = _Against(other, other_rows, compare, force, threshold, gated) if other is not None else None
        verdict = _several_lengths(result, config, source, label, against, argv, out, plot)
        _exit_on(verdict, compare, threshold, gated)
        return

    metrics = result.metrics
    rows = [
        {"metric": name, "value": _metric_value(name, metrics[name])}
        for name in METRIC_ORDER
        if metrics.get(name) is not None
    ]
    render.console.print(Text(f"toroidal eval: {source} on {config.dataset}"), soft_wrap=True)
    render.console.print(render.table(rows, METRIC_COLUMNS))
    scored = result.scored
    render.console.print(Text(f"scored: {comparing.scored_label(scored)}", style="dim"), soft_wrap=True)
    if config.max_tokens is not None and scored["tokens"] < config.max_tokens:
        line = f"note: {scored['split']} has fewer tokens than --max-tokens {config.max_tokens:,}: all scored"
        render.console.print(Text(line, style="dim"), soft_wrap=True)
    if streaming:
        note = (
            f"streaming_*: the same samples token by token on {latent_size} latent slots per head, "
            f"{values['update']} update with untrained parameters"
        )
        render.console.print(Text(note, style="dim"), soft_wrap=True)

    verdict = None
    mismatch = _text_mismatch(scored, other, compare) if other is not None else None
    if other is not None and (mismatch is None or force):
        compared = comparison(metrics, other["metrics"], gated)
        title = f"this run vs {compare}"
        caption = None if mismatch is None else Text(f"DIFFERENT TEXT (--force): {mismatch[0]}", "bold red")
        render.console.print(
            comparing.table(compared, COMPARED, COMPARE_KEYS, title, caption, threshold=threshold)
        )
        _comparison_notes(result.config, other, mismatch)
        verdict = comparing.gate(compared, threshold) if threshold is not None and mismatch is None else None
    if out is not None:
        payload = {"metrics": metrics, "scored": scored, "mechanism": result.mechanism}
        if other is not None and (mismatch is None or force):
            rows = [{"metric": row["metric"], **row["metrics"]["value"]} for row in compared]
            payload["comparison"] = _comparison_record(compare, mismatch, rows)
        record = make_record("eval", result.config, payload, argv=argv, env=capture_env(result.device))
        render.console.print(f"wrote {write_result(out, record)}")
    if plot is not None:
        rows = [{"seq_len": config.seq_len, "metrics": metrics}]
        plotting.plot_lengths(plotting.length_series([(label, rows, None)], "perplexity", False), plot)
    _refuse_across_texts(mismatch, force, threshold)  # after writing: the result itself stands
    _exit_on(verdict, compare, threshold, gated)


def _exit_on(verdict, compare: Path | None, threshold: float | None, gated: tuple[str, ...]) -> None:
    """Exit 1 when the gate compared nothing or found a regression (`comparing.gate`'s verdict)."""
    if verdict is not None and not verdict.compared:
        # A gate that compared nothing must not pass: CI would go green on a broken baseline.
        names = ", ".join(gated)
        line = f"--fail-on-regression: no gated metric ({names}) has a comparable value in {compare}"
        render.err_console.print(Text(f"toroidal eval: {line}", style="bold red"), soft_wrap=True)
        raise typer.Exit(1)
    if verdict is not None and verdict.worst is not None:
        worst = verdict.worst
        name = worst.row.get("metric", worst.metric)  # one length: a row per metric; several: per length
        at = f" at seq_len {worst.row['seq_len']}" if "seq_len" in worst.row else ""
        line = f"{name}{at} is {worst.worse_pct:.2f}% worse than {compare} (threshold {threshold:g}%)"
        render.err_console.print(Text(f"toroidal eval: regression: {line}", style="bold red"), soft_wrap=True)
        raise typer.Exit(1)


def _options(ctx: typer.Context, checkpoint: Path | None, model: str | None) -> dict:
    """Flags over the checkpoint run's data options over defaults; model options only with --model."""
    if checkpoint is not None and model is not None:
        raise UserError("give --checkpoint or --model, not both")
    if checkpoint is None and model is None:
        raise UserError("nothing to evaluate", "pass --checkpoint RUN_FOLDER or --model NAME")
    defaults = {}
    if checkpoint is not None:
        from toroidal.training.evaluate import RUN_DEFAULTS, run_defaults

        given = [name for name in MODEL_OPTIONS if name != "model" and from_command_line(ctx, name)]
        if given:
            raise UserError(
                f"--{given[0].rstrip('_').replace('_', '-')} cannot change a checkpoint",
                "the model, tokenizer and toroidal options come from the run; use --model to build another",
            )
        try:
            defaults = {k: v for k, v in run_defaults(str(checkpoint)).items() if k in RUN_DEFAULTS}
        except SetupError as error:
            raise setup_error(error) from None
    names = [name for name in OPTION_NAMES if name not in ("model", "seq_len")]
    values = resolve_options(ctx, names, defaults)
    values["model"] = model
    given = from_command_line(ctx, "seq_len") or "seq_len" not in defaults
    raw = ctx.params["seq_len"] if given else defaults["seq_len"]
    where = flag_name("seq_len") if given else f"checkpoint {checkpoint}: seq_len"
    values["seq_len"], values["lengths"] = lengths.parse_lengths(raw, where)
    return values


def _argv(values: dict, config, checkpoint: Path | None, streaming: bool, trust_remote: bool) -> list[str]:
    """The command line that reproduces this evaluation from its resolved values."""
    if checkpoint is not None:  # the model options come from the checkpoint
        names = [n for n in OPTION_NAMES if n not in MODEL_OPTIONS]
        extra = ["--checkpoint", str(checkpoint)]
    else:  # the resolved --mechanism stands in for its old name --attention
        names, extra = [n for n in OPTION_NAMES if n != "attention"], []
    resolved = {**values, "mechanism": config.mechanism, "seq_len": config.lengths or config.seq_len}
    extra += ["--trust-remote-code"] if trust_remote else []
    return resolved_argv("eval", names + (STREAMING_OPTIONS if streaming else []), resolved, extra)


# --- several lengths ------------------------------------------------------------------------------------


def _length_mismatch(rows: list[dict], other_rows: list[dict], compare: Path) -> tuple[str, str] | None:
    """The first length both results scored on different text, as `_text_mismatch` says it."""
    for row in rows:
        other = lengths.row_at(other_rows, row["seq_len"])
        if other is not None:
            mismatch = _text_mismatch(row["scored"], {"scored": other.get("scored")}, compare)
            if mismatch is not None:
                return mismatch
    return None


@dataclass(frozen=True)
class _Against:
    """The result `--compare` names, its rows per length, and how to compare and gate."""

    record: dict
    rows: list[dict]
    path: Path
    force: bool
    threshold: float | None
    gated: tuple[str, ...]


def _several_lengths(result, config, source: str, label: str, against, argv, out, plot):
    """Render a row per length, compare length by length, write the result and the plot; returns
    the gate's verdict (None: no gate). Refuses different text after writing, as one length does."""
    rows, info = result.rows, result.summary
    render.console.print(Text(f"toroidal eval: {source} on {config.dataset}"), soft_wrap=True)
    render.console.print(lengths.table(rows, info))
    for line in lengths.notes(rows, info, config.max_tokens):
        render.console.print(Text(line, style="dim"), soft_wrap=True)
    mismatch = _length_mismatch(rows, against.rows, against.path) if against is not None else None
    compared = None
    if against is not None and (mismatch is None or against.force):
        compare, other, threshold = against.path, against.record, against.threshold
        compared = length_comparison(rows, against.rows, against.gated)
        both = [row for row in compared if row["match"] == "both"]
        title = f"this run vs {compare}, per length"
        caption = None if mismatch is None else Text(f"DIFFERENT TEXT (--force): {mismatch[0]}", "bold red")
        keys = [render.Column("seq_len", "length", justify="right", no_wrap=True)]
        render.console.print(comparing.table(both, _length_shown(both), keys, title, caption, threshold))
        missing = {
            where: ", ".join(str(row["seq_len"]) for row in compared if row["match"] == match)
            for where, match in (("this run", "new_only"), (str(compare), "old_only"))
        }
        for where, found in missing.items():
            if found:
                render.console.print(Text(f"missing: length {found} only in {where}", style="yellow"))
        if not both:
            render.console.print(Text(f"no length is in both this run and {compare}", style="yellow"))
        _comparison_notes(result.config, other, mismatch)
    if out is not None:
        payload = {"rows": rows, "summary": info, "mechanism": result.mechanism}
        if compared is not None:
            payload["comparison"] = _comparison_record(compare, mismatch, compared)
        record = make_record("eval", result.config, payload, argv=argv, env=capture_env(result.device))
        render.console.print(f"wrote {write_result(out, record)}")
    if plot is not None:
        series = plotting.length_series([(label, rows, info.get("training_seq_len"))], "perplexity", False)
        plotting.plot_lengths(series, plot)
    if against is None:
        return None
    _refuse_across_texts(mismatch, against.force, against.threshold)  # after writing: the result stands
    if against.threshold is None or mismatch is not None:
        return None
    return comparing.gate(compared, against.threshold)

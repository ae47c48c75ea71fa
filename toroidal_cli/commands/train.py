"""`toroidal train`: train a language model with toroidal (or baseline) attention.

Options come from flags and from `--config` (a YAML file or a preset in configs/train with
the same keys in snake_case); a flag given on the command line wins over the file (parsing:
`toroidal_cli.run_options`). The work is `toroidal.training.train`; this module parses, renders
progress and writes `metrics.json` (rank 0 only under torchrun).
"""

from __future__ import annotations

import contextlib
import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from toroidal_cli import dryrun, render
from toroidal_cli.config_paths import relative_to_file
from toroidal_cli.errors import UserError
from toroidal_cli.memory_check import refuse_if_too_big
from toroidal_cli.options import check_can_create_in, invocation_argv
from toroidal_cli.plotting import check_plot_out, plot_runs
from toroidal_cli.progress import Progress
from toroidal_cli.results import capture_env, make_record, write_result
from toroidal_cli.run_options import (
    FIELD_OF,
    PARSERS,
    TrustRemoteCodeOpt,
    read_yaml_options,
    resolve_options,
    resolved_argv,
    setup_error,
)
from toroidal_cli.signals import StopSignals

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from toroidal.training import ProgressEvent

HELP = (
    "Train a language model with toroidal attention (or another mechanism) and write a run folder.\n\n"
    "Models: tiny (default), a preset in configs/models, a local model folder, a .gguf file or a hub name. "
    "Data: periodic, sinusoidal, passkey, text:PATH, code:DIR[:EXT,...], wikitext2, hf:NAME[:CONFIG]. "
    "Under torchrun the run is data-parallel (gloo on CPU, nccl on CUDA)."
)

# --- progress ----------------------------------------------------------------------------------------


def _format(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


class TrainProgress:
    """Steps with loss, learning rate and tokens/s (`toroidal_cli.progress`: a bar with an ETA on a
    terminal, else plain lines); evaluations, checkpoints and a resume as lines of their own."""

    def __init__(self):
        stats = TextColumn("{task.description}")  # loss, lr, tokens/s
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), stats, TimeElapsedColumn()]
        columns += [TextColumn("eta"), TimeRemainingColumn()]
        self.progress = Progress("train", "step", columns=columns, label="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "start":
            self.progress.start(event.total_steps, event.step)
            if event.step:
                self.progress.note(f"resumed at step {event.step}")
        elif event.kind == "step":
            m = event.metrics
            rate = render.format_tokens_per_s(m["tokens_per_s"])
            stats = f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {rate} tok/s"
            if m.get("mean_depth") is not None:  # adaptive depth
                stats += f"  depth {m['mean_depth']:.2f}  saved {m['compute_saved']:.0%}"
            self.progress.update(event.step, text=stats)
        elif event.kind == "eval":
            m = event.metrics
            parts = [f"step {event.step}: val loss {m['loss']:.4f}", f"ppl {_format(m['perplexity'])}"]
            if m.get("bits_per_byte") is not None:
                parts.append(f"bpb {m['bits_per_byte']:.4f}")
            if m.get("passkey_accuracy") is not None:
                parts.append(f"passkey {m['passkey_accuracy']:.2%}")
            self.progress.note("  ".join(parts))
        elif event.kind == "checkpoint":
            self.progress.note(Text(f"checkpoint {event.metrics['path']}", style="dim"))


VALIDATION_COLUMNS = [
    render.Column("step", justify="right"),
    render.Column("tokens", justify="right"),
    render.Column("loss", "val loss", justify="right"),
    render.Column("perplexity", "perplexity", justify="right"),
    render.Column("bits_per_byte", "bits/byte", justify="right"),
    render.Column("bits_per_token", "bits/token", justify="right"),
    render.Column("passkey_accuracy", "passkey acc", justify="right"),
]


def _summary_rows(payload: dict) -> list[dict]:
    final, timing, model = payload["final"], payload["timing"], payload["model"]
    rows = [
        ("steps", final["step"]),
        ("tokens", final["tokens"]),
        ("train loss (last step)", final["train_loss"]),
        ("val loss", final.get("val_loss")),
        ("val perplexity", final.get("val_perplexity")),
        ("val bits/byte", final.get("val_bits_per_byte")),
        ("val passkey accuracy", final.get("val_passkey_accuracy")),
        ("parameters", model["parameters"]),
        ("trainable parameters", model["trainable_parameters"]),
        ("toroidal layers", ",".join(map(str, model["toroidal_layers"])) or "-"),
        ("tokens/s", render.format_tokens_per_s(timing["tokens_per_s"])),
        ("wall time (s)", timing["wall_time_s"]),
    ]
    mechanism = payload.get("mechanism") or {}
    if mechanism.get("name") not in (None, "toroidal", "standard"):
        rows.append((f"{mechanism['name']} layers", ",".join(map(str, mechanism["layers"])) or "-"))
    means = mechanism.get("metrics_mean") or {}
    rows += [(f"{mechanism['name']}: {key}", value) for key, value in means.items()]
    return [
        {"metric": name, "value": value} for name, value in rows if value is not None or "val" not in name
    ]


# --- the command --------------------------------------------------------------------------------------

OPTION_NAMES = [name for name in PARSERS if name not in ("max_batches", "max_tokens", "split")]  # eval's


def command(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="YAML file or preset in configs/train; flags override its keys."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="tiny, a preset in configs/models, a model folder, a .gguf file or hub name.")
    ] = "tiny",
    position: Annotated[
        str, typer.Option(help="A preset's position encoding: rope (its own) or none (no rotary: NoPE).")
    ] = "rope",
    attention: Annotated[
        str | None, typer.Option(help="Old name of --mechanism: toroidal or baseline (= standard).")
    ] = None,
    mechanism: Annotated[
        str | None,
        typer.Option(
            "--mechanism", "-m", help="Attention mechanism: toroidal (default), standard or another one."
        ),
    ] = None,
    mechanism_option: Annotated[
        list[str] | None,
        typer.Option(
            "--mechanism-option", help="An option of a non-toroidal mechanism, NAME=VALUE (repeatable)."
        ),
    ] = None,
    adaptive_depth: Annotated[
        bool,
        typer.Option(
            "--adaptive-depth", help="Learn how many of the --depth platters to use (--mechanism adaptive)."
        ),
    ] = False,
    min_depth: Annotated[
        str, typer.Option(help="With --adaptive-depth: the fewest platters the gate may pick; none: 1.")
    ] = "none",
    depth: Annotated[int, typer.Option(help="Platters D per head.")] = 2,
    lambda_: Annotated[float, typer.Option("--lambda", help="Torus distance penalty lambda.")] = 0.1,
    period: Annotated[str, typer.Option(help="Ring period P; none: the training --seq-len.")] = "none",
    window: Annotated[str, typer.Option(help="Circular window w, or none.")] = "none",
    fusion: Annotated[
        str, typer.Option(help="Depth fusion: low_rank, attention, mean or concat.")
    ] = "low_rank",
    fusion_rank: Annotated[str, typer.Option(help="Rank of low_rank fusion; none: max(1, D // 4).")] = "none",
    backend: Annotated[str, typer.Option(help="Toroidal kernel backend, or auto.")] = "auto",
    layers: Annotated[
        str, typer.Option(help="Layers with toroidal attention, e.g. 0,2; all by default.")
    ] = "all",
    freeze_base: Annotated[
        bool,
        typer.Option(
            "--freeze-base",
            help="Train only the attention modules of --layers (q/k/v/o projections and depth fusion).",
        ),
    ] = False,
    grad_checkpointing: Annotated[
        bool, typer.Option("--grad-checkpointing", help="Recompute activations in backward (less memory).")
    ] = False,
    dataset: Annotated[
        str,
        typer.Option(
            help="periodic, sinusoidal, passkey, text:PATH, code:DIR[:EXT,...], wikitext2, hf:NAME[:CONFIG]."
        ),
    ] = "periodic",
    data_period: Annotated[int, typer.Option(help="periodic: length of the repeated pattern.")] = 8,
    data_vocab: Annotated[int, typer.Option(help="periodic, sinusoidal: number of distinct tokens.")] = 16,
    passkey_digits: Annotated[int, typer.Option(help="passkey: digits of the pass key.")] = 5,
    tokenizer: Annotated[
        str, typer.Option(help="bytes, bpe:VOCAB (trained on the training text) or model; auto picks.")
    ] = "auto",
    seq_len: Annotated[int, typer.Option(help="Tokens per sample.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Samples per micro-batch and process.")] = 8,
    steps: Annotated[str, typer.Option(help="Optimizer steps (default 200 unless --tokens).")] = "none",
    tokens: Annotated[str, typer.Option(help="Token budget instead of --steps, e.g. 2M.")] = "none",
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    min_lr_ratio: Annotated[float, typer.Option(help="Cosine decays to lr x this.")] = 0.1,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 20,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    clip: Annotated[float, typer.Option(help="Gradient norm clipping; 0: off.")] = 1.0,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 / fp16 mixed precision on CUDA.")] = "fp32",
    seed: Annotated[int, typer.Option(help="Seed of initialization, data and order.")] = 0,
    eval_every: Annotated[
        int, typer.Option(help="Validate every N steps (and at the end); 0: end only.")
    ] = 50,
    eval_batches: Annotated[int, typer.Option(help="Validation batches.")] = 8,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps for --resume; 0: never.")] = 0,
    log: Annotated[str, typer.Option(help="Experiment log: csv, tensorboard, wandb or none.")] = "none",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder (default runs/<time>); must be new unless --resume."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw the run's loss curves to this PNG (plot extra).")
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    if plot is not None:
        check_plot_out(plot, "--plot")
    file_values, file_path = (
        ({}, None) if config is None else read_yaml_options(config, OPTION_NAMES, ("out",))
    )
    if file_path is not None:  # an --out flag replaces the file's, unchecked: the user asked for it
        file_values = relative_to_file(file_values, file_path, outputs=() if out is not None else ("out",))
    options = resolve_options(ctx, OPTION_NAMES, file_values, str(file_path))
    if out is None and "out" in file_values:
        out = Path(str(file_values["out"]))
    out = _run_folder(out, resume)
    from toroidal.training import SetupError, TrainConfig, train
    from toroidal.training.footprint import train_footprint
    from toroidal.training.hub import remote_code_trusted
    from toroidal.training.runs import METRICS

    try:
        with remote_code_trusted(trust_remote_code):
            train_config = TrainConfig(**options)
            footprint = train_footprint(train_config)
            if dry_run:
                resolved = {**train_config.to_dict(), "out": out, "resume": resume}
                params = {field: name for name, field in FIELD_OF.items()}
                label = f"config {file_path}"
                found = dryrun.settings(ctx, resolved, from_file=file_values, file_label=label, params=params)
                dryrun.show("train", found, footprint)
                return
            refuse_if_too_big(footprint)
            # Under torchrun only rank 0 renders (the library calls back on rank 0 only).
            bar = TrainProgress() if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
            with bar, StopSignals("the current step") as stop:
                progress = bar if isinstance(bar, TrainProgress) else None
                result = train(train_config, out, resume=resume, progress=progress, should_stop=stop)
    except SetupError as error:
        raise setup_error(error) from None
    if not result.is_main:
        if result.stopped:
            raise typer.Exit(stop.exit_code)
        return
    evals = result.payload["validation"]
    columns = [c for c in VALIDATION_COLUMNS if any(row.get(c.key) is not None for row in evals)]
    render.console.print(render.table(evals, columns, title="validation"))
    summary = _summary_rows(result.payload)
    title = f"toroidal train: {result.config['mechanism']} on {result.config['dataset']} in {out}"
    render.console.print(Text(title), soft_wrap=True)
    render.console.print(
        render.table(summary, [render.Column("metric"), render.Column("value", justify="right")])
    )
    extra = ["--out", str(out)] + (["--resume"] if resume else [])
    extra += ["--trust-remote-code"] if trust_remote_code else []
    # The resolved mechanism stands in for its old name --attention.
    names = [name for name in OPTION_NAMES if name != "attention"]
    argv = resolved_argv("train", names, {**options, "mechanism": train_config.mechanism}, extra)
    payload = result.payload
    if result.stopped:  # the metrics so far, and which signal ended the run where
        payload = {**payload, "interrupted": {"signal": stop.name, "step": payload["final"]["step"]}}
    record = make_record("train", result.config, payload, argv=argv, env=capture_env(result.device))
    render.console.print(f"wrote {write_result(out / METRICS, record)}")
    if result.stopped:
        again = invocation_argv(ctx, given_only=True, exclude=("out", "resume"))
        again += ["--out", str(out), "--resume"]
        line = f"interrupted at step {payload['final']['step']}; resume with: {shlex.join(again)}"
        render.err_console.print(Text(line, style="bold yellow"), soft_wrap=True)
        raise typer.Exit(stop.exit_code)
    if plot is not None:
        plot_runs([out], plot)


def _run_folder(out: Path | None, resume: bool) -> Path:
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file", "give --out a folder for the run")
        check_can_create_in(out.absolute(), out, "--out")
        return out
    if resume:
        raise UserError("--resume needs --out", "pass the folder of the run to continue")
    from toroidal.training.distributed import world_size_from_env

    if world_size_from_env() > 1:
        raise UserError("under torchrun every process needs the same run folder", "pass --out")
    return Path("runs") / datetime.now().strftime("train-%Y%m%d-%H%M%S")

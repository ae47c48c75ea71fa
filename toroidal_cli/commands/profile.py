"""`toroidal profile`: torch.profiler on one ToroidalAttention configuration; tables, trace and JSON.

Takes the options of `toroidal bench` (`toroidal_cli.sweep_options`) with one value each (a list
is an error), `--mechanism` and `--option NAME=VALUE` included: another mechanism is profiled as
its standalone layer. The work is `toroidal.bench.profile.profile_attention`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from toroidal_cli import dryrun, render
from toroidal_cli.errors import UserError, as_user_error
from toroidal_cli.memory_check import module_footprint, refuse_if_too_big
from toroidal_cli.options import OutOpt, check_out_path, invocation_argv
from toroidal_cli.results import capture_env, make_record, write_result
from toroidal_cli.sweep_options import (
    AXES,
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
    MechanismOpt,
    ModeOpt,
    OptionOpt,
    PeriodOpt,
    SeqLenOpt,
    ThreadsOpt,
    WarmupOpt,
    WindowOpt,
    flags,
    read_options,
)

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs, not for --help
    from toroidal.bench import BenchCase
    from toroidal.bench.profile import ProfileSpec

HELP = (
    "Profile one forward (and backward) pass of ToroidalAttention with torch.profiler.\n\n"
    "Shows the top operators by self time, the time per stage (projections, rotary, kernel, "
    "fusion, output, backward) and peak memory; --trace writes a Chrome trace. Options are those "
    "of `toroidal bench`, one value each."
)

# Without --config: one mid-sized training step of the default layer.
DEFAULTS = {
    "backend": "auto",
    "seq_len": 1024,
    "depth": 4,
    "batch": 1,
    "heads": 8,
    "d_model": 512,
    "dtype": "fp32",
    "mode": "fwd+bwd",
    "causal": True,
    "window": None,
    "lambda": 0.1,
    "period": None,
    "device": "cpu",
    "warmup": 1,
    "repeats": 1,
    "threads": None,
    "mechanism": "toroidal",
    "options": {},
}


def single_values(values: dict) -> dict:
    """`read_options` lists reduced to one value each, over DEFAULTS; a list of several is an error."""
    config = dict(DEFAULTS)
    if "head_dim" in values:
        config.pop("d_model")
    for key, value in values.items():
        if key == "options":  # {name: [values]}
            several = [name for name, items in value.items() if len(items) != 1]
            if several:
                raise UserError(
                    f"profile takes one value per option; --option {several[0]} has {len(value[several[0]])}",
                    "profile one configuration at a time (use `toroidal bench` for sweeps)",
                )
            config[key] = {name: items[0] for name, items in value.items()}
            continue
        if key not in AXES:
            config[key] = value
            continue
        if len(value) != 1:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"profile takes one value per option; {flag} has {len(value)} "
                f"({', '.join(str(v) for v in value)})",
                "profile one configuration at a time (use `toroidal bench` for sweeps)",
            )
        config[key] = value[0]
    return config


def _case(config: dict) -> BenchCase:
    from toroidal.bench import BenchCase

    heads = config["heads"]
    d_model = config["d_model"] if "d_model" in config else config["head_dim"] * heads
    return BenchCase(
        backend=config["backend"],
        seq_len=config["seq_len"],
        depth=config["depth"],
        batch=config["batch"],
        heads=heads,
        d_model=d_model,
        dtype=config["dtype"],
        mode=config["mode"],
        causal=config["causal"],
        window=config["window"],
        lambda_distance=config["lambda"],
        period=config["period"],
        device=config["device"],
        mechanism=config["mechanism"],
        options=tuple(sorted(config["options"].items())),
    )


def build_spec(config: dict, top: int) -> ProfileSpec:
    from toroidal.bench import case_backend, sweep_options
    from toroidal.bench.profile import ProfileSpec
    from toroidal.config import ToroidalConfig
    from toroidal.kernels import BackendUnavailable

    case = _case(config)
    foreign = sorted(set(config["options"]) - set(sweep_options(case.mechanism)))
    if foreign:
        taken = ", ".join(sweep_options(case.mechanism)) or "none (its options are the axis flags)"
        raise UserError(
            f"--option {foreign[0]}: mechanism {case.mechanism!r} takes {taken}", "drop it or fix the name"
        )
    problem = case.problem()
    if problem is not None:
        raise UserError(problem, "choose --depth dividing the head dim, and --d-model divisible by --heads")
    with as_user_error("fix the option or the config file"):
        layer = ToroidalConfig(
            d_model=case.d_model,
            n_heads=case.heads,
            depth=case.depth,
            lambda_distance=case.lambda_distance,
            period=case.period,
            causal=case.causal,
            window=case.window,
            backend=case.backend,
            max_len=case.seq_len,  # so that period none means P = N, causal or not (as in bench)
        )
        spec = ProfileSpec(
            layer,
            batch=case.batch,
            seq_len=case.seq_len,
            dtype=case.dtype,
            mode=case.mode,
            device=case.device,
            warmup=config["warmup"],
            steps=config["repeats"],
            top=top,
            threads=config["threads"],
            mechanism=case.mechanism,
            options=case.mechanism_kwargs() if case.mechanism != "toroidal" else {},
        )
    try:
        case_backend(case)  # fail now, with the backend's own reason, not inside the profiler
    except BackendUnavailable as error:
        raise UserError(str(error), "choose another --backend (or auto)") from None
    return spec


@contextlib.contextmanager
def without_profiler_banner() -> Iterator[None]:
    """Drop the 'USDT: ... profiler_start/stop' lines torch's C++ profiler writes to fd 2; keep the rest."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line for line in captured.read().decode(errors="replace").splitlines() if "USDT:" not in line
            ]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def _ms(value) -> str:
    return "-" if value is None else f"{value:,.3f}"


def stage_table(rows: list[dict], on_device: bool):
    columns = [
        render.Column("stage", "stage", no_wrap=True),
        render.Column("calls", "calls/step", format=lambda v: f"{v:g}", justify="right"),
        render.Column("cpu_ms", "CPU ms", format=_ms, justify="right"),
    ]
    if on_device:
        columns.append(render.Column("device_ms", "GPU ms", format=_ms, justify="right"))
    columns.append(
        render.Column("pct", "% of step", format=lambda v: "-" if v is None else f"{v:.1f}", justify="right")
    )
    return render.table(rows, columns, title="time per stage (per step)")


def operator_table(rows: list[dict], on_device: bool, top: int):
    columns = [
        render.Column("name", "operator", no_wrap=True),
        render.Column("calls", "calls/step", format=lambda v: f"{v:g}", justify="right"),
        render.Column("self_cpu_ms", "self CPU ms", format=_ms, justify="right"),
        render.Column("cpu_total_ms", "CPU total ms", format=_ms, justify="right"),
    ]
    if on_device:
        columns += [
            render.Column("self_device_ms", "self GPU ms", format=_ms, justify="right"),
            render.Column("device_total_ms", "GPU total ms", format=_ms, justify="right"),
        ]
    columns.append(render.Column("self_pct", "self %", format=lambda v: f"{v:.1f}", justify="right"))
    basis = "GPU" if on_device else "CPU"
    return render.table(rows, columns, title=f"top {top} operators by self {basis} time (per step)")


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
    repeats: Annotated[
        str | None, typer.Option("--repeats", help="Profiled steps (times are per step).")
    ] = None,
    mechanism: MechanismOpt = None,
    option: OptionOpt = None,
    threads: ThreadsOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many operators to list.")] = 15,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Write a Chrome trace (chrome://tracing, Perfetto) here.")
    ] = None,
    out: OutOpt = None,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    check_out_path(out)
    check_out_path(trace, "--trace")
    if out is not None and trace is not None and out.absolute() == trace.absolute():
        raise UserError(f"--out and --trace are both {out}", "give the trace its own file name")
    given = read_options(config, flags(ctx.params), default_config=None)
    values = single_values(given)
    spec = build_spec(values, top)
    footprint = module_footprint(_case(values))
    if dry_run:
        shown = {key: value for key, value in values.items() if key != "config_file"}
        found = dryrun.settings(
            ctx,
            {**shown, "top": top, "trace": trace, "out": out},
            from_file=given,
            file_label=f"config {values.get('config_file')}",
            params=DRY_RUN_PARAMS,
        )
        dryrun.show("profile", found, footprint, batch_flag="--batch")
        return
    if footprint is not None:
        refuse_if_too_big(footprint, batch_flag="--batch")
    on_device = spec.device.startswith("cuda")
    from toroidal.bench.profile import profile_attention

    what = spec.config.backend if spec.mechanism == "toroidal" else spec.mechanism
    render.err_console.print(Text(f"profiling {spec.mode} of {what} ...", style="dim"))
    with without_profiler_banner():
        result = profile_attention(spec)

    summary = result.summary
    render.console.print(stage_table(result.stages, on_device))
    render.console.print(operator_table(result.operators, on_device, top))
    backend_text = summary["backend"] + (f"→{summary['chosen']}" if summary["backend"] == "auto" else "")
    if spec.mechanism != "toroidal":
        backend_text = spec.mechanism + "".join(f" {k}={v}" for k, v in values["options"].items())
    memory = "-" if summary["peak_memory_mb"] is None else f"{summary['peak_memory_mb']:,.1f} MiB"
    render.console.print(
        f"{backend_text} · B={spec.batch} N={spec.seq_len} d_model={spec.config.d_model} "
        f"H={spec.config.n_heads} D={spec.config.depth} {spec.dtype} {spec.mode} on {spec.device} · "
        f"{summary['step_ms']:,.1f} ms/step under the profiler · peak {memory}"
    )
    for note in result.notes:
        render.console.print(Text(f"note: {note}", style="dim"))

    if trace is not None:
        try:
            render.console.print(f"wrote trace {result.export_trace(trace)}")
        except OSError as error:
            raise UserError(
                f"cannot write {trace}: {error.strerror}", "check the path and permissions"
            ) from None
    if out is not None:
        record_config = {
            **{key: values[key] for key in values if key != "config_file"},
            "layer": spec.config.to_dict(),
            "mechanism": spec.mechanism,
            "kernel_options": spec.options,
            "top": top,
            "config_file": values.get("config_file"),
        }
        payload = {"stages": result.stages, "operators": result.operators, "summary": summary}
        record = make_record(
            "profile", record_config, payload, argv=invocation_argv(ctx), env=capture_env(spec.device)
        )
        render.console.print(f"wrote {write_result(out, record)}")

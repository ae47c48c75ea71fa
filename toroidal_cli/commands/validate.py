"""`toroidal validate`: run the library's correctness checks, show a table, optionally write JSON."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from toroidal_cli import dryrun, render
from toroidal_cli.errors import UserError
from toroidal_cli.options import (
    OutOpt,
    check_out_path,
    dtype_name,
    invocation_argv,
    parse_device,
    parse_dtype,
)
from toroidal_cli.progress import Progress
from toroidal_cli.results import capture_env, make_record, write_result

HELP = (
    "Check toroidal attention against its definition; exit 1 if any check fails.\n\n"
    "Distances, cyclic-shift invariance, causality, padding, gradients, and every backend "
    "against the reference backend (values and input gradients). With --mechanism NAME: that "
    "mechanism's kernel contract (causality, empty rows) and its own checks (hyperbolic: stability "
    "from norm 1e-8 to 1e4 in fp32 and bf16, round trip, distances; standard: against softmax)."
)

COLUMNS = [
    render.Column("name", "check", no_wrap=True),
    render.Column("status", "status"),
    render.Column("error", "measured error", justify="right"),
    render.Column("tolerance", "tolerance", justify="right"),
    render.Column("detail", "detail", style="dim"),
]


def command(
    ctx: typer.Context,
    device: Annotated[str, typer.Option(help="Device to check on: cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option(
            help="dtype of the backend checks: fp32, fp16, bf16 or fp64 (properties use fp32; fp64 adds "
            "exact float64 shift invariance and gradcheck of every backend that takes float64)."
        ),
    ] = "fp32",
    quick: Annotated[bool, typer.Option("--quick", help="Fewer backend cases (3 instead of 9).")] = False,
    backend: Annotated[
        list[str] | None,
        typer.Option("--backend", "-b", help="Check only this backend against reference (repeatable)."),
    ] = None,
    mechanism: Annotated[
        str, typer.Option("--mechanism", "-m", help="Mechanism to check: toroidal (default), standard, ...")
    ] = "toroidal",
    out: OutOpt = None,
    dry_run: dryrun.DryRunOpt = False,
) -> None:
    torch_device, torch_dtype = parse_device(device), parse_dtype(dtype)
    # The library (and torch) is imported when the command runs, not for --help.
    from toroidal.kernels import backend_names
    from toroidal.mechanisms import mechanism_names
    from toroidal.validate import CheckResult, run_check, summarize, validation_suite

    check_out_path(out)
    backends = list(backend) if backend else None
    unknown = [name for name in backends or [] if name not in backend_names()]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}", f"choose from {', '.join(backend_names())}")
    if mechanism not in mechanism_names():
        raise UserError(f"unknown mechanism {mechanism!r}", f"choose from {', '.join(mechanism_names())}")
    if backends and mechanism != "toroidal":
        raise UserError(f"--backend checks toroidal backends, not --mechanism {mechanism}", "drop --backend")
    if dry_run:  # the checks use tiny shapes: no memory estimate to give
        resolved = {"device": str(torch_device), "dtype": dtype_name(torch_dtype), "quick": quick}
        resolved["mechanism"] = mechanism
        resolved.update(backend=backends or [n for n in backend_names() if n != "reference"], out=out)
        if mechanism != "toroidal":
            resolved["backend"] = "none (toroidal only)"
        dryrun.show("validate", dryrun.settings(ctx, resolved))
        return

    try:
        suite = validation_suite(torch_device, torch_dtype, quick, backends, mechanism=mechanism)
    except ImportError as error:  # an optional dependency of the mechanism (e.g. geoopt) is missing
        raise UserError(str(error)) from None
    checks: list[CheckResult] = []
    start = time.perf_counter()
    with Progress("validate", "check", total=len(suite)) as progress:
        for group, check in suite:
            progress.running(group)
            found = run_check(group, check)
            checks.extend(found)
            statuses = [result.status for result in found]
            counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
            progress.advance(f"{group}: {counts}" if counts else group)
    seconds = time.perf_counter() - start

    summary = {**summarize(checks), "seconds": round(seconds, 2)}
    render.console.print(render.table([c.to_dict() for c in checks], COLUMNS, title="toroidal validate"))
    verdict = "[bold green]all checks pass[/]" if summary["ok"] else "[bold red]some checks fail[/]"
    render.console.print(
        f"{verdict}: {summary['pass']} pass, {summary['fail']} fail, {summary['skip']} skip "
        f"on {torch_device} in {seconds:.1f} s"
    )

    if out is not None:
        config = {
            "device": str(torch_device),
            "dtype": dtype_name(torch_dtype),
            "quick": quick,
            "mechanism": mechanism,
            "backends": backends or [name for name in backend_names() if name != "reference"],
        }
        payload = {"checks": [c.to_dict() for c in checks], "summary": summary}
        record = make_record(
            "validate", config, payload, argv=invocation_argv(ctx), env=capture_env(torch_device)
        )
        render.console.print(f"wrote {write_result(out, record)}")
    if not summary["ok"]:
        raise typer.Exit(1)

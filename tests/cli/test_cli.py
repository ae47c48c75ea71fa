"""The `toroidal` command line: help, version, stubs, validate, and one-line user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import typer
from helpers import assert_one_line_error
from typer.testing import CliRunner

import toroidal
from toroidal_cli.app import app
from toroidal_cli.results import read_result

COMMANDS = ["train", "eval", "bench", "longbench", "scrolls", "profile", "validate", "plot"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_exactly_the_eight_commands():
    assert list(typer.main.get_command(app).commands) == COMMANDS
    result = invoke("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_no_arguments_shows_help():
    result = invoke()
    assert "validate" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"toroidal {toroidal.__version__}"


def test_validate_passes_and_writes_a_result(tmp_path):
    out = tmp_path / "results" / "validate.json"
    result = invoke("validate", "--quick", "--out", str(out))
    assert result.exit_code == 0, result.output
    for column in ("check", "status", "measured error", "tolerance"):
        assert column in result.stdout
    assert "all checks pass" in result.stdout
    record = read_result(out, command="validate")
    assert record["config"]["device"] == "cpu" and record["config"]["quick"] is True
    assert (
        record["command"]["argv"][:2] == ["toroidal", "validate"] and "--quick" in record["command"]["argv"]
    )
    assert record["env"]["torch"] == torch.__version__
    statuses = {check["status"] for check in record["checks"]}
    assert statuses <= {"pass", "skip"}
    names = [check["name"] for check in record["checks"]]
    for expected in (
        "distance: symmetry",
        "shift invariance: rope=periodic",
        "causal no-leak",
        "research snippet",
    ):
        assert expected in names
    assert any(name.startswith("backend sdpa") for name in names)
    summary = record["summary"]
    assert summary["ok"] is True and summary["fail"] == 0 and summary["total"] == len(record["checks"])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--device", "tpu"], ["toroidal validate:", "unknown device 'tpu'", "--device cpu"]),
        (["--device", "cpu:banana"], ["unknown device"]),
        (["--dtype", "fp8"], ["unknown dtype 'fp8'", "fp32"]),
        (["--backend", "nope"], ["unknown backend 'nope'", "sdpa"]),
    ],
)
def test_validate_bad_options_are_one_line_errors(args, fragments):
    assert_one_line_error(invoke("validate", *args), *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_validate_on_a_missing_gpu_says_so():
    assert_one_line_error(invoke("validate", "--device", "cuda"), "not available", "--device cpu")


def test_validate_out_to_a_folder_is_a_user_error(tmp_path):
    assert_one_line_error(
        invoke("validate", "--quick", "--backend", "sdpa", "--out", str(tmp_path)), "folder"
    )


def test_console_script_prints_no_traceback():
    """The real entry point (`python -m toroidal_cli` = the `toroidal` script) on a user error."""
    done = subprocess.run(
        [sys.executable, "-m", "toroidal_cli", "validate", "--device", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == "" and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == "toroidal validate: unknown device 'nope'; use --device cpu, cuda or cuda:N"


def test_table_cells_are_not_rich_markup():
    from rich.console import Console

    from toroidal_cli import render

    out = Console(width=200, record=True)
    rows = [{"name": "x", "status": "skip", "detail": 'pip install "toroidal-attention[gpu]"'}]
    out.print(render.table(rows, [render.Column("name"), render.Column("status"), render.Column("detail")]))
    assert "toroidal-attention[gpu]" in out.export_text()


def test_config_errors_become_user_errors():
    from toroidal import ToroidalConfig
    from toroidal_cli.errors import UserError, as_user_error

    with pytest.raises(UserError) as caught, as_user_error("fix the YAML config or the flag"):
        ToroidalConfig(d_model=64, n_heads=4, depth=3)
    line = caught.value.line()
    assert "ToroidalConfig.depth=3" in line and line.endswith("; fix the YAML config or the flag")

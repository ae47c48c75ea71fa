"""Start-up: `--help`, `--version`, a dry run that needs no model, and mistakes in options answer
without importing torch (each checked in a fresh interpreter); help reads INT, TEXT, PATH and
flags as flags, never Typer's `<bool>` or `<str>`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from toroidal.kernels import backend_names
from toroidal_cli import values
from toroidal_cli.app import COMMAND_NAMES, app

runner = CliRunner()

# Runs `toroidal ARGS` for each ARGS in argv[1] (JSON) through CliRunner, then prints one JSON line:
# the exit codes, the outputs, and whether torch was imported along the way.
PROBE = """
import json, sys
import toroidal_cli.app
from typer.testing import CliRunner
runs = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(toroidal_cli.app.app, args)
    runs.append({"args": args, "code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr})
print(json.dumps({"runs": runs, "torch": "torch" in sys.modules}))
"""


def probe(*commands: list[str], cwd=None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_and_version_import_no_torch():
    helps = [[name, "--help"] for name in COMMAND_NAMES]
    helps += [["plot", sub, "--help"] for sub in ("bench", "train", "attention")]
    found = probe(["--help"], ["--version"], *helps)
    assert [run["code"] for run in found["runs"]] == [0] * len(found["runs"])
    assert "Usage: toroidal [OPTIONS] COMMAND" in " ".join(found["runs"][0]["stdout"].split())
    assert found["runs"][1]["stdout"].startswith("toroidal ")
    assert found["torch"] is False


def test_dry_runs_without_a_model_import_no_torch(tmp_path):
    pytest.importorskip("matplotlib")  # every `plot` command checks for it first
    from toroidal_cli.results import make_record, write_result

    (tmp_path / "run").mkdir()
    write_result(tmp_path / "run" / "metrics.json", make_record("train", {}, {"loss_curve": []}, env={}))
    found = probe(
        ["plot", "train", "run", "--out", "curves.png", "--dry-run"],
        ["plot", "attention", "--out", "map.png", "--seq-len", "16", "--dry-run"],
        cwd=tmp_path,
    )
    for run in found["runs"]:
        assert run["code"] == 0, run["stderr"]
        assert "dry run: nothing was run or written" in run["stdout"]
    assert found["torch"] is False
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_option_mistakes_fail_before_torch_is_imported(tmp_path):
    found = probe(
        ["train", "--backend", "nope"],
        ["train", "--dataset", "text:missing.txt"],
        ["train", "--dataset", "code:no-such-folder"],
        ["eval", "--model", "tiny", "--backend", "flash3"],
        ["bench", "--backend", "nope"],
        cwd=tmp_path,
    )
    lines = [run["stderr"].strip() for run in found["runs"]]
    assert [run["code"] for run in found["runs"]] == [1] * 5, lines
    assert lines[0].startswith("toroidal train: --backend: unknown backend 'nope'; choose auto or blockwise")
    assert lines[1] == (
        "toroidal train: text file missing.txt does not exist; "
        "pass --dataset text:PATH with an existing text file"
    )
    assert lines[2].startswith("toroidal train: code folder no-such-folder does not exist")
    assert lines[3].startswith("toroidal eval: --backend: unknown backend 'flash3'")
    assert lines[4].startswith("toroidal bench: --backend: unknown backend 'nope'; choose auto, all or")
    assert found["torch"] is False


def test_the_backend_names_checked_before_import_are_the_registered_ones():
    assert list(values.BACKENDS) == backend_names()


def test_help_names_values_and_shows_flags_as_flags():
    for args in [["--help"], *([name, "--help"] for name in COMMAND_NAMES), ["plot", "bench", "--help"]]:
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, args
        for odd in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list["):
            assert odd not in result.stdout, (args, odd)
    train = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "--depth INT Platters D per head." in train
    assert "--lambda FLOAT Torus distance penalty" in train
    assert "--model TEXT tiny, a preset" in train
    assert "--out -o PATH Run folder" in train
    assert "--freeze-base Train only" in train  # a flag: no value after it
    bench = " ".join(runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "--causal --no-causal Causal masking." in bench
    plot = " ".join(runner.invoke(app, ["plot", "bench", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "results... PATH... Result files" in plot


def test_help_metavars_leave_parsing_alone(tmp_path):
    """The flags parse as before: a bad value is still Typer's usage error naming the option."""
    result = runner.invoke(app, ["train", "--depth", "x", "--dry-run"])
    assert result.exit_code == 2 and "'--depth'" in result.output

"""Run folders written by toroidal 0.1.0 still load and compute what they computed then."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toroidal_cli.app import app

FIXTURES = Path(__file__).parent / "fixtures" / "runs_v0_1"
EXPECTED = json.loads((FIXTURES / "expected_eval.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_run_folder_evaluates_to_the_same_loss(name, tmp_path):
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)  # a copy: nothing may be written into the fixture
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app, ["eval", "--checkpoint", str(run), "--max-batches", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text(encoding="utf-8"))["metrics"]
    assert metrics["tokens"] == EXPECTED[name]["tokens"]
    assert metrics["loss"] == pytest.approx(EXPECTED[name]["loss"], abs=1e-5)

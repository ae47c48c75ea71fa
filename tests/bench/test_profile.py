"""`toroidal profile` and `toroidal.bench.profile`: stages, operators, trace, JSON, errors; no timings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

import toroidal.attention
from toroidal import ToroidalAttention, ToroidalConfig
from toroidal.bench.profile import FORWARD_STAGES, ProfileSpec, chosen_backend, profile_attention
from toroidal_cli.app import app
from toroidal_cli.results import read_result

runner = CliRunner()
TINY = ["--seq-len", "16", "--d-model", "32", "--heads", "2", "--depth", "2", "--warmup", "1"]


def invoke(*args: str):
    return runner.invoke(app, ["profile", *args])


def test_profile_writes_tables_trace_and_json(tmp_path):
    trace, out = tmp_path / "trace.json", tmp_path / "profile.json"
    result = invoke(*TINY, "--repeats", "2", "--top", "5", "--trace", str(trace), "--out", str(out))
    assert result.exit_code == 0, result.output
    for text in ("time per stage", "top 5 operators", "projections", "kernel", "backward", "auto→sdpa"):
        assert text in result.stdout

    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    assert any(event.get("name") == "toroidal::kernel" for event in events)

    record = read_result(out, command="profile")
    stages = {row["stage"]: row for row in record["stages"]}
    assert set(stages) == {*FORWARD_STAGES, "backward", "other", "step"}
    assert stages["rotary"]["calls"] == 2  # queries and keys
    assert stages["step"]["pct"] == pytest.approx(100.0)
    assert all(row["cpu_ms"] >= 0 and row["device_ms"] is None for row in record["stages"])
    assert 1 <= len(record["operators"]) <= 5
    assert all(not op["name"].startswith("toroidal::") for op in record["operators"])
    summary = record["summary"]
    assert summary["chosen"] == "sdpa" and summary["steps"] == 2 and summary["peak_memory_mb"] >= 0
    assert record["config"]["layer"]["max_len"] == 16  # period none means P = N, as in bench
    assert record["config"]["mode"] == "fwd+bwd"


def test_forward_only_has_no_backward_stage(tmp_path):
    out = tmp_path / "p.json"
    result = invoke(*TINY, "--mode", "fwd", "--backend", "blockwise", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = read_result(out, command="profile")
    assert "backward" not in {row["stage"] for row in record["stages"]}
    assert record["summary"]["chosen"] == "blockwise"


def test_profile_takes_a_yaml_config(tmp_path):
    config = tmp_path / "one.yaml"
    config.write_text("seq-len: 8\nhead_dim: 8\nheads: 2\ndepth: 2\nmode: fwd\ncausal: false\nwarmup: 0\n")
    out = tmp_path / "p.json"
    result = invoke("--config", str(config), "--out", str(out))
    assert result.exit_code == 0, result.output
    layer = read_result(out, command="profile")["config"]["layer"]
    assert (layer["d_model"], layer["n_heads"], layer["causal"]) == (16, 2, False)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--seq-len", "16,32"], ["one value per option", "--seq-len has 2"]),
        (["--backend", "all"], ["one value per option"]),
        (["--backend", "flash2"], ["flash2", "unavailable"]),
        (["--depth", "3"], ["does not divide"]),
        (["--dtype", "fp8"], ["unknown dtype"]),
        (["--seq-len", "abc"], ["--seq-len", "'abc'"]),
        (["--config", "quick"], ["one value per option"]),
    ],
)
def test_bad_values_are_one_line_errors(args, fragments):
    assert_one_line_error(invoke(*TINY, *args), "toroidal profile:", *fragments)


def test_trace_and_out_on_one_file_is_an_error(tmp_path):
    same = str(tmp_path / "p.json")
    assert_one_line_error(invoke(*TINY, "--trace", same, "--out", same), "--out and --trace are both")


def test_trace_to_a_folder_is_an_error(tmp_path):
    assert_one_line_error(invoke(*TINY, "--trace", str(tmp_path)), "folder")


def test_the_module_labels_its_own_stages_and_nothing_is_patched():
    layer = ToroidalAttention(ToroidalConfig(d_model=32, n_heads=2, depth=2))
    original = toroidal.attention.toroidal_attention
    with torch.profiler.profile() as prof:
        layer(torch.randn(1, 8, 32))
    labels = {event.key for event in prof.key_averages() if event.key.startswith("toroidal::")}
    assert labels == {f"toroidal::{stage}" for stage in FORWARD_STAGES}
    assert toroidal.attention.toroidal_attention is original
    assert not layer.qkv._forward_hooks and not layer.qkv._forward_pre_hooks
    assert chosen_backend(ProfileSpec(layer.config, seq_len=8)) == "sdpa"  # with gradients, as above


def test_library_profile_returns_plain_rows():
    spec = ProfileSpec(ToroidalConfig(d_model=32, n_heads=2, depth=2), seq_len=8, mode="fwd", warmup=0, top=3)
    result = profile_attention(spec)
    assert [row["stage"] for row in result.stages] == [*FORWARD_STAGES, "other", "step"]
    assert len(result.operators) <= 3
    assert result.summary["gpu_name"] is None and any("telemetry" in note for note in result.notes)
    with pytest.raises(ValueError, match="mode"):
        ProfileSpec(ToroidalConfig(d_model=32, n_heads=2, depth=2), mode="sideways")


def test_console_script_filters_the_profiler_banner():
    """torch's C++ profiler writes 'USDT: ... profiler_start' to fd 2, which CliRunner cannot see."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "toroidal_cli", "profile", *TINY, "--mode", "fwd", "--top", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "time per stage" in done.stdout
    assert "USDT" not in done.stdout + done.stderr

"""Tuning tables: write, read, `auto` follows them where they cover a call, and bad tables are ignored."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import assert_one_line_error, small_cpu_default
from typer.testing import CliRunner

from toroidal import toroidal_attention
from toroidal.functional import plan_call, selected_backend
from toroidal.kernels import resolve_backend
from toroidal.kernels import tuning_table as tuning
from toroidal.kernels.tuning_table import (
    Bucket,
    TunedEntry,
    TuningTable,
    TuningTableError,
    TuningTableWarning,
)
from toroidal_cli.app import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
CALL = dict(depth=2, lambda_distance=0.1, causal=True, period=64)


def qkv(n=64, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, 8, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


def table_for(backend: str, tile: int | None = None, n: int = 64) -> TuningTable:
    """A one-entry table answering calls like `qkv(n)` with CALL."""
    bucket = Bucket.for_request(plan_call(*qkv(n), **CALL).request)
    return TuningTable({bucket: TunedEntry(bucket, backend, tile, 1.0, {backend: 1.0})})


@pytest.fixture
def use_table(tmp_path, monkeypatch):
    """Write a table (or raw text) to a file `auto` reads; returns the path."""

    def use(table: TuningTable | str):
        path = tmp_path / "tuning.json"
        if isinstance(table, str):
            path.write_text(table)
        else:
            tuning.write_table(table, path)
        monkeypatch.setenv(tuning.ENV_VAR, str(path))
        tuning.reload()  # `auto` reads the table once per process: as a new process would
        return path

    return use


@pytest.fixture(autouse=True)
def forget_the_table(monkeypatch):
    """Tests here point `auto` at their own tables: the next test starts from the process default."""
    yield
    monkeypatch.undo()
    tuning.reload()


def test_buckets_round_to_the_nearest_power_of_two():
    assert [tuning.nearest_power_of_two(n) for n in (1, 3, 1000, 1400, 1500)] == [1, 4, 1024, 1024, 2048]
    bucket = Bucket.for_request(plan_call(*qkv(48), **CALL).request)  # 96 platter-tokens
    assert bucket == Bucket("cpu", "fp32", 128, 128, True, False)


def test_round_trip_and_auto_follows_the_table_only_where_it_covers_the_call(use_table):
    assert selected_backend(*qkv(), **CALL) == small_cpu_default()  # the built-in default for small calls
    table = table_for("blockwise", tile=16)
    path = use_table(table)
    assert tuning.read_table(path).entries == table.entries
    assert json.loads(path.read_text())["schema"] == tuning.SCHEMA

    assert selected_backend(*qkv(), **CALL) == "blockwise"
    chosen = resolve_backend("auto", plan_call(*qkv(), **CALL).request)
    assert chosen.tile == 16  # the table's tile, not blockwise's default
    expected = toroidal_attention(*qkv(), **CALL, backend="reference")
    assert torch.allclose(toroidal_attention(*qkv(), **CALL), expected, atol=1e-5)
    # Other buckets keep the defaults: another length, a training call, another causality.
    assert selected_backend(*qkv(16), **CALL) == small_cpu_default()
    assert selected_backend(*qkv(requires_grad=True), **CALL) == "sdpa"  # small training: sdpa
    assert selected_backend(*qkv(), **{**CALL, "causal": False}) == small_cpu_default()


@pytest.mark.parametrize("backend", ["flash2", "no-such-backend"])
def test_entries_whose_backend_cannot_serve_the_call_are_ignored(use_table, backend):
    use_table(table_for(backend))
    assert selected_backend(*qkv(), **CALL) == small_cpu_default()


def test_merging_keeps_other_buckets_and_replaces_the_same_one():
    merged = table_for("blockwise", 16).merged(table_for("reference", n=16)).merged(table_for("sdpa"))
    assert sorted(entry.backend for entry in merged.entries.values()) == ["reference", "sdpa"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"schema": {"name": "other", "version": 1}, "entries": []}', "schema is"),
        (json.dumps({"schema": tuning.SCHEMA, "entries": [{"device": "cpu"}]}), "'dtype' is missing"),
    ],
)
def test_a_corrupt_table_is_an_error_to_read_and_ignored_by_auto_with_one_warning(use_table, text, problem):
    path = use_table(text)
    with pytest.raises(TuningTableError, match=problem) as error:
        tuning.read_table(path)
    assert str(path) in str(error.value)
    with pytest.warns(TuningTableWarning, match=problem):
        assert selected_backend(*qkv(), **CALL) == small_cpu_default()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file version warns once
        assert selected_backend(*qkv(), **CALL) == small_cpu_default()


def test_a_tile_must_be_a_positive_integer(use_table):
    data = table_for("blockwise", 16).to_dict()
    data["entries"][0]["tile"] = 0
    with pytest.raises(TuningTableError, match="'tile' must be null or a positive integer"):
        tuning.read_table(use_table(json.dumps(data)))


TINY = ["-n", "32", "--d-model", "16", "--heads", "2", "-d", "2", "--warmup", "0", "--repeats", "1"]


def test_bench_tune_writes_the_table_that_auto_then_reads(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "tuning.json"  # the folder is created
    result = runner.invoke(app, ["bench", "--tune", "--tune-out", str(path), "-b", "sdpa,blockwise", *TINY])
    assert result.exit_code == 0, result.output
    assert "fastest backend per shape bucket" in result.output and f"wrote {path}" in result.output
    (entry,) = tuning.read_table(path).entries.values()
    assert entry.bucket == Bucket("cpu", "fp32", 64, 64, True, False)
    assert set(entry.measured) == {"sdpa", "blockwise/tile=64"}  # tiles up to L = 64
    assert entry.backend in ("sdpa", "blockwise") and entry.median_ms == min(entry.measured.values())

    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    tuning.reload()
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    assert selected_backend(q, k, v, depth=2, lambda_distance=0.1, causal=True) == entry.backend
    # A second run with another length adds its bucket to the same file.
    result = runner.invoke(app, ["bench", "--tune", "--tune-out", str(path), "-b", "sdpa", *TINY, "-n", "16"])
    assert result.exit_code == 0, result.output
    assert len(tuning.read_table(path).entries) == 2


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--tune-out", "t.json"], ["--tune-out needs --tune"]),
        (["--tune", "--out", "r.json"], ["--tune cannot be combined with --out"]),
        (["--tune"], ["turns tuning tables off", "--tune-out FILE"]),  # conftest turns them off
    ],
)
def test_bench_tune_errors(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bench", *args, *TINY])
    assert_one_line_error(result, *fragments)

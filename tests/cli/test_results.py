"""The result format: records, atomic writes, reading with clear errors, row comparison."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime

import pytest

import toroidal
from toroidal_cli import compare, results
from toroidal_cli.compare import compare_rows
from toroidal_cli.errors import UserError
from toroidal_cli.results import capture_env, make_record, read_result, write_result

ENV_KEYS = {"python", "platform", "torch", "device", "device_name", "cuda", "driver", "cpu_count", "threads"}


def record(**payload):
    return make_record("bench", {"n": 8}, payload or {"rows": [{"a": 1}], "summary": {}}, env={"python": "3"})


def test_record_has_the_header_and_the_payload():
    rec = make_record("validate", {"device": "cpu"}, {"checks": [], "summary": {"ok": True}})
    assert rec["schema"] == {"name": "toroidal.validate", "version": 1}
    assert rec["command"]["name"] == "validate"
    assert rec["toroidal_version"] == toroidal.__version__
    assert rec["config"] == {"device": "cpu"}
    assert rec["checks"] == [] and rec["summary"] == {"ok": True}
    assert rec["created"].endswith("Z")
    datetime.fromisoformat(rec["created"].replace("Z", "+00:00"))
    assert set(rec["env"]) == ENV_KEYS


def test_payload_may_not_overwrite_the_header():
    with pytest.raises(ValueError, match="collide"):
        make_record("bench", {}, {"config": {}})


def test_capture_env_on_cpu():
    env = capture_env("cpu")
    assert env["device"] == "cpu" and env["cpu_count"] >= 1 and env["threads"] >= 1
    assert env["driver"] is None


def test_round_trip(tmp_path):
    path = tmp_path / "deep" / "er" / "run.json"  # parent folders are created
    rec = record(rows=[{"backend": "sdpa", "ms": 1.5, "shape": (2, 3)}], summary={"ok": True})
    assert write_result(path, rec) == path
    back = read_result(path, command="bench")
    assert back["rows"] == [{"backend": "sdpa", "ms": 1.5, "shape": [2, 3]}]
    assert back["schema"] == rec["schema"] and back["created"] == rec["created"]
    assert os.listdir(path.parent) == ["run.json"]  # no temp file left behind


def test_non_finite_numbers_are_written_as_null(tmp_path):
    path = write_result(tmp_path / "r.json", record(rows=[{"err": math.nan, "big": math.inf}]))
    text = path.read_text()
    json.loads(text)  # strict JSON: no NaN / Infinity tokens
    assert "NaN" not in text and read_result(path)["rows"] == [{"err": None, "big": None}]


def test_failed_serialization_leaves_the_old_file_untouched(tmp_path):
    path = write_result(tmp_path / "r.json", record())
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_result(path, record(rows=[{"oops": object()}]))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    path = write_result(tmp_path / "r.json", record())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(UserError, match="No space left"):
        write_result(path, record(rows=[{"new": 1}]))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_writing_to_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        write_result(tmp_path, record())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a toroidal result"),
        ('{"rows": []}', "not a toroidal result"),
        ('{"schema": {"name": "other.thing", "version": 1}}', "not a toroidal result"),
        ('{"schema": {"name": "toroidal.bench", "version": "1"}}', "not a toroidal result"),
        ('{"schema": {"name": "toroidal.bench", "version": 99}}', "upgrade toroidal"),
        ('{"schema": {"name": "toroidal.eval", "version": 1}}', "expected 'toroidal.bench'"),
    ],
)
def test_read_result_errors_are_user_errors(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as caught:
        read_result(path, command="bench")
    assert "\n" not in caught.value.line() and str(path) in caught.value.line()


def test_compare_rows_deltas_and_percentages():
    old = [
        {"backend": "sdpa", "n": 8, "ms": 2.0, "mb": 0.0},
        {"backend": "ref", "n": 8, "ms": 4.0, "mb": 1.0},
    ]
    new = [{"backend": "ref", "n": 8, "ms": 3.0, "mb": 1.0}, {"backend": "flex", "n": 8, "ms": 1.0}]
    new.append({"backend": "sdpa", "n": 8, "ms": 3.0, "mb": 2.0})
    rows = compare_rows(old, new, ["backend", "n"], ["ms", "mb"])
    by_backend = {row["backend"]: row for row in rows}
    assert [row["backend"] for row in rows] == ["sdpa", "ref", "flex"]  # old order, then new-only rows
    sdpa = by_backend["sdpa"]
    assert sdpa["match"] == "both" and sdpa["n"] == 8
    assert sdpa["metrics"]["ms"] == {"old": 2.0, "new": 3.0, "delta": 1.0, "pct": 50.0}
    assert sdpa["metrics"]["mb"]["delta"] == 2.0 and sdpa["metrics"]["mb"]["pct"] is None  # old is 0
    assert by_backend["ref"]["metrics"]["ms"]["pct"] == -25.0
    flex = by_backend["flex"]
    assert flex["match"] == "new_only" and flex["metrics"]["ms"] == {
        "old": None,
        "new": 1.0,
        "delta": None,
        "pct": None,
    }
    assert flex["metrics"]["mb"]["new"] is None  # missing metric


def test_compare_rows_reports_rows_that_disappeared_and_ignores_non_numbers():
    rows = compare_rows([{"k": 1, "m": 1.0}, {"k": 2, "m": "n/a"}], [{"k": 2, "m": 5}], ["k"], ["m"])
    assert rows[0]["match"] == "old_only" and rows[0]["metrics"]["m"]["new"] is None
    assert rows[1]["match"] == "both" and rows[1]["metrics"]["m"] == {
        "old": None,
        "new": 5.0,
        "delta": None,
        "pct": None,
    }


def test_compare_rows_rejects_duplicate_keys():
    with pytest.raises(ValueError, match="two rows"):
        compare_rows([{"k": 1}, {"k": 1}], [], ["k"], [])


def test_compare_gives_the_better_side_and_the_gate_checks_only_gated_values():
    other = [{"k": "a", "ms": 2.0, "acc": 0.5}, {"k": "b", "ms": 4.0, "acc": 0.5}]
    this = [{"k": "a", "ms": 3.0, "acc": 0.5}, {"k": "b", "ms": 2.0, "acc": 0.75}]
    directions = {"ms": compare.LOWER, "acc": compare.HIGHER}
    rows = compare.compare(
        other,
        this,
        ["k"],
        ["ms", "acc"],
        direction=lambda row, m: directions[m],
        gated=lambda row, m: m == "ms",
    )
    a, b = (row["metrics"] for row in rows)
    assert a["ms"]["better"] == "other" and a["ms"]["worse_pct"] == 50.0 and a["acc"]["better"] == "same"
    assert b["ms"]["better"] == "this" and b["ms"]["worse_pct"] == 50.0 * -1 and b["acc"]["better"] == "this"
    verdict = compare.gate(rows, threshold=10)
    assert verdict.compared == 2 and [found.row["k"] for found in verdict.regressions] == ["a"]
    assert verdict.worst.metric == "ms" and compare.gate(rows, threshold=60).worst is None
    text = compare.table(rows, [compare.Shown("ms"), compare.Shown("acc", delta=None)], title="t")
    headers = ["other", "this", "delta", "change", "better", "other", "this", "change", "better"]
    assert [column.header for column in text.columns] == headers
    assert (
        compare.better_side(1.0, None) is None and compare.better_side(-1.0, compare.LOWER, "x", "y") == "x"
    )

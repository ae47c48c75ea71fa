"""The validation checks: they pass on the library, and they catch deliberately broken backends."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from toroidal.kernels import base
from toroidal.validate import FAIL, PASS, SKIP, run_check, run_validation, summarize
from toroidal.validate import toroidal as validation
from toroidal.validate.report import verdict
from toroidal.validate.toroidal import QUICK_CASES, check_backends, check_padded_rows
from toroidal_cli.app import app

ONE_CASE = QUICK_CASES[:2]  # both cases share one shape: cheap for every backend


class FakeBackend(base.Backend):
    """The reference backend, distorted by `mutate(out)`; `reason(request)` decides availability."""

    def __init__(self, name, mutate=lambda out: out, reason=lambda request: None):
        self.name, self._mutate, self._reason = name, mutate, reason

    def unavailable_reason(self, request):
        return self._reason(request)

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        out, _ = base.get_backend("reference").forward(q, k, v, geometry, key_padding, scale, False)
        return self._mutate(out), None


@pytest.fixture
def fake(monkeypatch):
    """Register fake backends for one test only (the registry dict is restored afterwards)."""

    def add(backend):
        monkeypatch.setitem(base._REGISTRY, backend.name, backend)
        return backend.name

    return add


def by_name(results):
    return {r.name: r for r in results}


def test_the_library_passes_the_quick_suite():
    results = run_validation(quick=True, backends=["sdpa"])
    failed = [r for r in results if r.status == FAIL]
    assert not failed, failed
    names = {r.name for r in results}
    assert {"distance: symmetry", "causal no-leak", "research snippet", "backend sdpa: gradients"} <= names
    assert summarize(results)["ok"] is True


def test_orthogonality_scores():
    results = by_name(validation.check_orthogonality())
    standard = results["rope orthogonality: standard"]
    assert standard.status == PASS and standard.error == pytest.approx(1.0)  # informational
    assert results["rope orthogonality: orthogonal"].error < 0.1


def test_verdict_fails_on_nan_and_on_excess():
    assert verdict("x", 0.5, 1.0).status == PASS
    assert verdict("x", 2.0, 1.0).status == FAIL
    assert verdict("x", math.nan, 1.0).status == FAIL


def test_a_wrong_backend_fails_values_and_gradients(fake):
    name = fake(FakeBackend("wrong", mutate=lambda out: out * 1.01))
    results = by_name(check_backends(cases=ONE_CASE, backends=[name]))
    values, grads = results["backend wrong: values"], results["backend wrong: gradients"]
    assert values.status == FAIL and values.error > 1e-3
    assert grads.status == FAIL and grads.error > 1e-3


def test_a_forward_only_backend_gets_values_checked_and_gradients_skipped(fake):
    reason = lambda request: "no backward here" if request.requires_grad else None
    name = fake(FakeBackend("fwdonly", reason=reason))
    results = by_name(check_backends(cases=ONE_CASE, backends=[name]))
    assert results["backend fwdonly: values"].status == PASS
    grads = results["backend fwdonly: gradients"]
    assert grads.status == SKIP and grads.detail == "no backward here"


def test_an_unavailable_backend_is_skipped_with_its_reason(fake):
    name = fake(FakeBackend("nowhere", reason=lambda request: "needs a device this machine lacks"))
    results = check_backends(cases=ONE_CASE, backends=[name]) + check_padded_rows(backends=[name])[1:]
    assert {r.status for r in results} == {SKIP}
    assert all(r.detail == "needs a device this machine lacks" for r in results)


def test_a_backend_that_skips_some_cases_is_judged_on_the_rest(fake):
    reason = lambda request: "no windows" if request.geometry.window is not None else None
    name = fake(FakeBackend("nowin", reason=reason))
    values = by_name(check_backends(cases=QUICK_CASES, backends=[name]))["backend nowin: values"]
    assert values.status == PASS and "1/3 cases" in values.detail and "2 skipped: no windows" in values.detail


def test_a_crashing_backend_fails_without_stopping_the_run(fake):
    def crash(out):
        raise RuntimeError("kernel exploded")

    name = fake(FakeBackend("crash", mutate=crash))
    results = by_name(check_backends(cases=ONE_CASE, backends=[name]) + check_padded_rows(backends=[name]))
    assert results["backend crash: values"].status == FAIL
    assert "kernel exploded" in results["backend crash: values"].detail
    assert results["padded rows: crash"].status == FAIL


def test_nan_on_empty_rows_is_caught(fake):
    name = fake(FakeBackend("nans", mutate=lambda out: torch.where(out == 0, torch.nan, out)))
    results = by_name(check_padded_rows(backends=[name]))
    assert results["padded rows: reference"].status == PASS
    assert results["padded rows: nans"].status == FAIL


class LeakyBackend(FakeBackend):
    """Ignores the causal rule: future tokens leak into the past."""

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        return super().forward(
            q, k, v, dataclasses.replace(geometry, causal=False), key_padding, scale, False
        )


def test_a_causal_leak_is_caught(fake):
    name = fake(LeakyBackend("leaky"))
    assert {r.status for r in validation.check_causal_no_leak(backend=name)} == {FAIL}
    assert {r.status for r in validation.check_causal_no_leak(backend="reference")} == {PASS}


def test_a_position_dependent_error_breaks_shift_invariance(fake):
    drift = lambda out: out + 1e-3 * torch.arange(out.shape[-2], dtype=out.dtype)[:, None]
    name = fake(FakeBackend("drift", mutate=drift))
    assert {r.status for r in validation.check_shift_invariance(backend=name)} == {FAIL}
    assert {r.status for r in validation.check_shift_invariance(backend="reference")} == {PASS}


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        check_backends(backends=["no-such-backend"])


def test_run_check_turns_a_crash_into_a_failure_and_keeps_the_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    def broken():
        torch.rand(10)
        raise ZeroDivisionError("boom")

    results = run_check("broken group", broken)
    assert [(r.name, r.status) for r in results] == [("broken group", FAIL)]
    assert "ZeroDivisionError: boom" in results[0].detail
    assert torch.equal(torch.rand(3), expected)


def test_validate_command_exits_1_on_a_broken_backend(fake, tmp_path):
    fake(FakeBackend("wrong", mutate=lambda out: out + 0.1))
    out = tmp_path / "v.json"
    result = CliRunner().invoke(app, ["validate", "--quick", "--backend", "wrong", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "some checks fail" in result.stdout
    assert "backend wrong: values" in result.stdout and "fail" in result.stdout
    record = json.loads(out.read_text())
    assert record["summary"]["ok"] is False and record["summary"]["fail"] >= 2

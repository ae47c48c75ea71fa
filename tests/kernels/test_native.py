"""The `native` backend: the C++ kernel compiled here, against `reference`, and its build rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toroidal import toroidal_attention
from toroidal.functional import plan_call, selected_backend
from toroidal.kernels import BackendUnavailable, get_backend, native

REASON = get_backend("native").unavailable_reason(plan_call(*(torch.zeros(1, 1, 4, 4),) * 3, depth=2).request)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native kernel unavailable here: {REASON}")

cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 40),
        "depth": st.sampled_from([1, 2, 3, 4]),
        "width": st.sampled_from([2, 16, 24]),  # padded to 16, exact, padded to 32
        "lam": st.sampled_from([0.0, 0.1, 3.0]),
        "causal": st.booleans(),
        "period_change": st.integers(-30, 9),  # periods shorter than the sequence wrap it
        "window": st.sampled_from([None, 0, 1, 3, 10**6]),
        "queries": st.integers(0, 6),  # 0: a full pass; else the last few positions, as when decoding
        "pad": st.integers(0, 40),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=80, deadline=None)
@given(cases)
def test_matches_reference_values_and_gradients(c):
    gen = torch.Generator().manual_seed(c["seed"])
    n, n_q = c["n"], min(c["queries"], c["n"]) or c["n"]
    e = c["width"] * c["depth"]
    k, v = (torch.randn(2, 3, n, e, generator=gen, requires_grad=True) for _ in range(2))
    q = torch.randn(2, 3, n_q, e, generator=gen, requires_grad=True)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, : c["pad"]] = False  # batch 0: leading padding, rows with nothing to see under causality
    results = []
    for backend in ("reference", "native"):
        out = toroidal_attention(
            q, k, v, depth=c["depth"], lambda_distance=c["lam"], causal=c["causal"], window=c["window"],
            period=max(1, n + c["period_change"]), key_padding_mask=mask, q_offset=n - n_q, backend=backend,
        )  # fmt: skip
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
        results.append((out, *grads))
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "causal, window, period",
    [(True, None, 311), (False, None, 311), (True, 37, 300), (False, 37, 128)],
    ids=["causal", "full", "causal-window", "wrapping-window"],
)
def test_a_long_sequence_crosses_many_blocks(causal, window, period):
    # 300 positions x 4 platters = 1200 tokens: several 64-row and 256-key blocks, a ragged last
    # block, and with a window, blocks the kernels skip.
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, 64, generator=gen, requires_grad=True) for _ in range(3))
    kwargs = dict(depth=4, lambda_distance=0.7, causal=causal, period=period, window=window)
    results = []
    for backend in ("native", "reference"):
        out = toroidal_attention(q, k, v, backend=backend, **kwargs)
        results.append((out, *torch.autograd.grad((out * out).sum(), (q, k, v))))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() <= 2e-5


def test_auto_takes_native_for_inference_and_sdpa_for_small_training():
    q = torch.randn(1, 2, 64, 64)
    call = dict(depth=4, lambda_distance=0.1, causal=True)
    assert selected_backend(q, q, q, **call) == "native"
    q_train = q.clone().requires_grad_()
    assert selected_backend(q_train, q_train, q_train, **call) == "sdpa"
    long = torch.randn(1, 1, 1024, 64, requires_grad=True)
    assert selected_backend(long, long, long, **call) == "native"


def test_calls_native_cannot_serve_say_why():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(BackendUnavailable, match="native needs float32 or float64"):
        toroidal_attention(q.half(), q.half(), q.half(), depth=2, backend="native")
    with pytest.raises(BackendUnavailable, match="native does not materialize weights"):
        toroidal_attention(q, q, q, depth=2, backend="native", return_weights=True)
    huge = dataclasses.replace(plan_call(q, q, q, depth=2).request, n_keys=2**24 + 1)
    assert "positions below 2**24" in get_backend("native").unavailable_reason(huge)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("TOROIDAL_NATIVE", "0")
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(BackendUnavailable, match="TOROIDAL_NATIVE=0"):
        toroidal_attention(q, q, q, depth=2, backend="native")
    assert selected_backend(q, q, q, depth=2) != "native"


def test_builds_are_cached_by_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TOROIDAL_KERNEL_CACHE", str(tmp_path))
    first = native._build(16)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(16) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert native._build(32) != first  # one library per padded width
    assert not list(tmp_path.glob("tmp*"))  # no half-written files left behind


def test_a_missing_or_failing_compiler_is_one_clear_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TOROIDAL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(native.BuildError, match="needs a C.. compiler"):
        native._build(16)
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fatal error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(native, "_compiler", lambda: str(broken))
    with pytest.raises(
        native.BuildError, match="compiling the native kernel failed: fatal error: no such thing"
    ):
        native._build(16)
    assert not list(tmp_path.glob("*.so"))


def test_a_process_forked_after_a_call_can_still_call():
    # An OpenMP thread pool would hang here: bench workers and data loaders fork.
    import os
    import signal

    q = torch.randn(1, 2, 64, 64)
    call = dict(depth=4, causal=True, lambda_distance=0.1, backend="native")
    expected = toroidal_attention(q, q, q, **call)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the call returns the same values within 30 s
        signal.alarm(30)
        os._exit(0 if torch.equal(toroidal_attention(q, q, q, **call), expected) else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0

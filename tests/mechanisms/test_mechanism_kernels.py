"""The mechanism registry's contract, its two built-in kernels, and the mechanism axis of `toroidal bench`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import toroidal.mechanisms.registry as mechanisms
from toroidal import toroidal_attention
from toroidal.bench import BenchSweep, run_sweep
from toroidal.mechanisms import Mechanism, build_attention, build_kernel, check_options
from toroidal.mechanisms.base import KernelModule
from toroidal_cli.app import app
from toroidal_cli.results import read_result

pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(b=2, h=2, n=12, e=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, e, generator=gen) for _ in range(3)]


def test_standard_kernel_is_plain_sdpa_and_padding_gives_zero_rows():
    q, k, v = qkv()
    kernel = build_kernel("standard", 2, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(kernel(q, k, v, causal=True), expected)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :] = False  # nothing to attend in the second sequence
    padding[0, :3] = False
    out = kernel(q, k, v, causal=False, key_padding_mask=padding)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    expected = F.scaled_dot_product_attention(q[:1, :, :, :], k[:1, :, 3:], v[:1, :, 3:])
    assert torch.allclose(out[:1], expected, atol=1e-6)


def test_standard_kernel_decodes_with_a_query_offset():
    q, k, v = qkv()
    kernel = build_kernel("standard", 2, 8)
    full = kernel(q, k, v, causal=True)
    last = kernel(q[:, :, -3:], k, v, causal=True, q_offset=9)
    assert torch.allclose(last, full[:, :, -3:], atol=1e-6)


def test_toroidal_kernel_with_concat_fusion_is_toroidal_attention():
    q, k, v = qkv(e=8)
    kernel = build_kernel("toroidal", 2, 8, depth=2, lambda_distance=0.3, fusion="concat", max_len=10)
    expected = toroidal_attention(q, k, v, depth=2, lambda_distance=0.3, period=10, causal=True)
    assert torch.allclose(kernel(q, k, v, causal=True), expected, atol=1e-6)
    # Bidirectional calls ring over the key length, as ToroidalConfig.period_for says.
    expected = toroidal_attention(q, k, v, depth=2, lambda_distance=0.3, period=12)
    assert torch.allclose(kernel(q, k, v, causal=False), expected, atol=1e-6)


def test_the_period_rule_and_the_torus_option_names_have_one_home():
    from dataclasses import fields

    from toroidal.config import ATTENTION_OPTIONS, TORUS_FLAGS, TORUS_OPTIONS, ToroidalConfig, period_for

    assert period_for(12, period=7, max_len=10, causal=True) == 7
    assert period_for(12, period=None, max_len=10, causal=True) == 10
    assert period_for(12, period=None, max_len=10, causal=False) == 12
    config = ToroidalConfig(max_len=10)  # a bidirectional config asked about a causal call
    assert (config.period_for(12), config.period_for(12, causal=True)) == (12, 10)
    assert set(TORUS_OPTIONS) <= {f.name for f in fields(ToroidalConfig)}
    assert {*ATTENTION_OPTIONS, "fusion", "fusion_rank"} == set(TORUS_OPTIONS) == {*TORUS_FLAGS, "max_len"}
    assert mechanisms.get_mechanism("toroidal").accepts == TORUS_OPTIONS
    for name in ("tiled", "fft", "adaptive"):  # every torus mechanism takes the torus by these names
        assert set(TORUS_OPTIONS) - {"backend"} <= set(mechanisms.get_mechanism(name).accepts)


def test_standalone_layer_and_unknown_options():
    layer = build_attention("toroidal", 32, 4, depth=2)
    assert layer(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    assert layer.get_metrics() == {}
    with pytest.raises(ValueError, match="unknown option\\(s\\) nope; accepted: none"):
        build_kernel("standard", 2, 8, nope=1)
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        mechanisms.get_mechanism("nope")
    with pytest.raises(ValueError, match="d_model=30 must be divisible"):
        build_attention("standard", 30, 4)


class _Halving(KernelModule):
    """A test-only approximate mechanism: standard attention times `factor`; counts its calls."""

    def __init__(self, heads, head_dim, **options):
        super().__init__()
        check_options("halving", options, ("factor",))
        self.factor, self.calls = options.get("factor", 0.5), 0

    def forward(self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0):
        self.calls += 1
        return self.factor * F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def get_metrics(self):
        return {"calls": self.calls}


@pytest.fixture
def halving():
    mechanism = mechanisms.register_mechanism(
        Mechanism("halving", "test only", _Halving, accepts=("factor",), approximates="standard")
    )
    yield mechanism
    del mechanisms._REGISTRY["halving"]


def test_sweep_crosses_only_the_options_a_mechanism_accepts(halving):
    sweep = BenchSweep(
        backend=["auto", "sdpa"], seq_len=[16], d_model=[32], heads=[2], depth=[2],
        mechanism=["toroidal", "standard", "halving"], options={"factor": [0.5, 1.0]},
    )  # fmt: skip
    labels = [(case.mechanism, case.backend, case.options_label) for case in sweep.cases()]
    assert labels == [
        ("toroidal", "auto", None),
        ("toroidal", "sdpa", None),
        ("standard", "-", None),
        ("halving", "-", "factor=0.5"),
        ("halving", "-", "factor=1.0"),
    ]


def test_mechanism_rows_report_metrics_and_the_error_against_their_target(halving):
    sweep = BenchSweep(
        seq_len=[16], d_model=[32], heads=[2], depth=[2], mechanism=["standard", "halving"],
        options={"factor": [0.5, 1.0]}, warmup=1, repeats=2, isolate=False,
    )  # fmt: skip
    rows = run_sweep(sweep).rows
    assert [row["status"] for row in rows] == ["ok"] * 3
    standard, half, whole = rows
    assert standard["chosen"] == "standard" and standard["error"] is None
    assert half["error"] == pytest.approx(0.5, abs=1e-5)  # 0.5 * exact against exact
    assert whole["error"] == pytest.approx(0.0, abs=1e-5)
    assert half["mechanism_metrics"]["calls"] >= 3  # warm-up and timed runs, then the error run


def test_bench_cli_mechanism_axis_from_flags_and_yaml(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "-n", "16", "--d-model", "32", "--heads", "2", "--depth", "2", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "-m", "standard,toroidal", "-b", "sdpa", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_result(out, command="bench")["rows"]
    assert [(row["mechanism"], row["backend"], row["status"]) for row in rows] == [
        ("standard", "-", "ok"),
        ("toroidal", "sdpa", "ok"),
    ]
    config = tmp_path / "sweep.yaml"
    config.write_text("mechanism: [standard]\nseq_len: 16\nd_model: 32\nheads: 2\ndepth: 2\nrepeats: 1\n")
    result = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [row["mechanism"] for row in read_result(out, command="bench")["rows"]] == ["standard"]

"""Peak-memory estimates: formulas, available memory, nearest fit, and estimates against measured peaks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toroidal.bench import BenchCase, BenchSweep, materialized_bytes, run_sweep
from toroidal.runtime import memory

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def test_estimate_total_and_description_list_the_largest_parts_first():
    estimate = memory.Estimate({"activations": 300 * MIB, "parameters": 2 * memory.GIB, "tiny": 10})
    assert estimate.total == 300 * MIB + 2 * memory.GIB + 10
    assert estimate.describe().startswith("2.29 GiB (parameters 2.00 GiB, activations 300 MiB")
    assert "tiny" not in estimate.describe()  # under a MiB: noise, not worth a word


def test_bench_budget_uses_the_same_materialized_bytes():
    case = BenchCase("reference", seq_len=256, depth=4, batch=2, heads=8, d_model=256, mode="fwd+bwd")
    shape = memory.AttentionShape(2, 8, 256, 4, 32, "fp32", training=True)
    assert materialized_bytes("reference", case) == memory.materialized_bytes("reference", shape)
    assert memory.materialized_bytes("reference", shape) == 2 * 8 * 1024**2 * 4 * 6 + 1024**2 * 21


def test_attention_estimates_grow_with_the_problem_and_tiled_kernels_stay_small():
    small = memory.AttentionShape(1, 8, 512, 4, 64)
    large = memory.AttentionShape(1, 8, 1024, 4, 64)
    for backend in ("reference", "sdpa", "blockwise", "decomposed", "flex"):
        assert memory.attention_call(backend, large).total > memory.attention_call(backend, small).total
    # (L x L) backends grow 4x with L; the tiled ones stay far below them
    assert memory.workspace_bytes("reference", large) > 3.9 * memory.workspace_bytes("reference", small)
    assert memory.workspace_bytes("blockwise", large) * 20 < memory.workspace_bytes("reference", large)
    training = memory.AttentionShape(1, 8, 512, 4, 64, training=True)
    assert memory.attention_call("sdpa", training).parts["inputs"] == 2 * small.tensor_bytes * 4


def test_training_estimate_parts():
    shape = memory.ModelShape(
        hidden=128, layers=4, heads=4, head_dim=32, intermediate=352, vocab=259, parameters=10**6
    )
    toroidal = memory.ToroidalLayers(count=4, depth=2, backend="reference")
    full = memory.model_training(shape, batch=8, seq_len=256, toroidal=toroidal)
    assert full.parts["parameters"] == 4 * 10**6 and full.parts["optimizer"] == 8 * 10**6
    frozen = memory.model_training(shape, batch=8, seq_len=256, toroidal=toroidal, trainable=1000)
    assert frozen.parts["optimizer"] == 8000 < full.parts["optimizer"]
    checkpointed = memory.model_training(
        shape, batch=8, seq_len=256, toroidal=toroidal, grad_checkpointing=True
    )
    assert checkpointed.parts["activations"] < full.parts["activations"]
    assert checkpointed.parts["attention"] < full.parts["attention"]  # one layer's scores kept, not four
    baseline = memory.model_training(shape, batch=8, seq_len=256, toroidal=None)
    assert baseline.parts["attention"] == 0 and baseline.total < full.total
    inference = memory.model_inference(shape, batch=8, seq_len=256, toroidal=toroidal)
    assert inference.total < full.total and "optimizer" not in inference.parts


def test_nearest_fit_halves_the_batch_first_then_the_sequence():
    seen = []

    def estimate(batch, seq_len):
        seen.append((batch, seq_len))
        return memory.Estimate({"all": batch * seq_len})

    assert memory.nearest_fit(estimate, 8, 1024, available=1024) == (1, 1024, memory.Estimate({"all": 1024}))
    assert seen == [(4, 1024), (2, 1024), (1, 1024)]
    seen.clear()
    assert memory.nearest_fit(estimate, 2, 1024, available=300)[:2] == (1, 256)
    assert seen == [(1, 1024), (1, 512), (1, 256)]
    assert memory.nearest_fit(estimate, 1, 32, available=1) is None  # nothing at or above 16 tokens fits


def test_available_bytes_reads_the_device_and_honours_the_override(monkeypatch):
    monkeypatch.delenv(memory.LIMIT_VARIABLE, raising=False)
    free = memory.available_bytes("cpu")
    assert free is not None and free > 0
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.5")
    assert memory.available_bytes("cpu") == memory.GIB // 2
    estimate = memory.Estimate({"all": memory.GIB})
    assert memory.over_available(estimate, "cpu") == (
        "estimated peak memory 1.00 GiB exceeds the 512 MiB available on cpu"
    )
    assert memory.over_available(memory.Estimate({"all": MIB}), "cpu") is None
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(memory.LIMIT_VARIABLE, bad)
        with pytest.raises(ValueError, match=memory.LIMIT_VARIABLE):
            memory.available_bytes("cpu")


def test_bench_rows_over_the_available_memory_are_skipped_with_the_estimate(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.01")  # 10 MiB: less than any row's runtime share
    sweep = BenchSweep(backend=["sdpa"], seq_len=[64], depth=[2], heads=[2], d_model=[32], isolate=False)
    (row,) = run_sweep(sweep).rows
    assert row["status"] == "skipped"
    assert row["reason"].startswith("estimated peak memory") and "available on cpu" in row["reason"]
    assert row["estimated_memory_mb"] == pytest.approx(
        memory.attention_call("sdpa", memory.AttentionShape(1, 2, 64, 2, 16)).total / MIB
    )


# --- estimates against measured peaks ------------------------------------------------------------------

# Peak resident-set growth of a fresh interpreter running the real training (or evaluation) code,
# measured from just before the run, after the imports: what the estimate predicts.
_MEASURE = r"""
import json, sys, tempfile
import torch
torch.set_num_threads(1)
from toroidal.training.config import TrainConfig
from toroidal.training.evaluate import EvalConfig, evaluate
from toroidal.training.footprint import eval_footprint, train_footprint
from toroidal.training.loop import train

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

kind, options = sys.argv[1], json.loads(sys.argv[2])
if kind == "train":
    config = TrainConfig(**options, steps=2, eval_every=0, eval_batches=1, warmup_steps=1, device="cpu")
    footprint, work = train_footprint(config), lambda: train(config, tempfile.mkdtemp() + "/run")
else:
    config = EvalConfig(**options, max_batches=1, device="cpu")
    footprint, work = eval_footprint(config), lambda: evaluate(config)
start = status("VmRSS")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the high-water mark to now
work()
print(json.dumps({"estimate": footprint.estimate.total, "measured": status("VmHWM") - start}))
"""

linux_only = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc for peak RSS"
)


MEASURED = {
    # four layers each keeping three (B, H, L, L) float32 tensors for backward: ~0.5 GiB of scores
    "train": {"model": "tiny", "backend": "reference", "seq_len": 128, "batch_size": 16},
    # the sdpa backend's cached (L x L) bias at L = 1024 and a batch of 4096 tokens
    "eval": {"model": "tiny", "attention": "toroidal", "backend": "sdpa", "seq_len": 512, "batch_size": 8},
}


@pytest.fixture(scope="module")
def measured_runs():
    """Both measurements at once, in their own fresh interpreters: {kind: {"estimate", "measured"}}."""
    procs = {
        kind: subprocess.Popen(
            [sys.executable, "-c", _MEASURE, kind, json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for kind, options in MEASURED.items()
    }
    figures = {}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        figures[kind] = json.loads(out.strip().splitlines()[-1])
    return figures


@linux_only
@pytest.mark.parametrize("kind", list(MEASURED))
def test_model_estimate_is_within_a_factor_of_two_of_the_measured_peak(measured_runs, kind):
    figures = measured_runs[kind]
    assert figures["measured"] > 64 * MIB, figures  # a real peak, not allocator noise
    ratio = figures["estimate"] / figures["measured"]
    assert 0.5 <= ratio <= 2.0, figures


@linux_only
def test_bench_row_estimates_are_within_a_factor_of_two_of_the_isolated_peaks():
    sweep = BenchSweep(
        backend=["reference", "sdpa"],
        seq_len=[512],
        depth=[4],
        heads=[8],
        d_model=[512],
        warmup=0,
        repeats=1,
        threads=1,
        isolate=True,
        paired=False,
    )
    rows = run_sweep(sweep).rows
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert row["peak_memory_mb"] > 64, row  # (L x L) tensors at L = 2048, not noise
        assert 0.5 <= row["estimated_memory_mb"] / row["peak_memory_mb"] <= 2.0, row

"""The CUDA paths end to end: every backend against a float64 CPU reference, the module, the CLI.

All of it skips without a CUDA device (CI has none); run it on a GPU machine with
`python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from toroidal import ToroidalAttention, toroidal_attention
from toroidal.functional import selected_backend
from toroidal_cli.app import app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, H, N, E, DEPTH = 2, 4, 24, 32, 4
# float32 matmuls may run in TF32 on the GPU; bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.float32: 3e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CASES = {
    # period 16 < N: the ring wraps inside the sequence; the window crosses the seam
    "causal-window-padded": dict(causal=True, window=5, period=16, lambda_distance=0.4, padded=True),
    "bidirectional-gqa": dict(causal=False, lambda_distance=0.7, kv_heads=2),
    "decode-offset": dict(causal=True, lambda_distance=0.2, q_offset=20),
    "causal-no-bias": dict(causal=True, lambda_distance=0.0),
}


def _inputs(case: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_queries = N - case.get("q_offset", 0)
    kv_heads = case.get("kv_heads", H)
    q = torch.randn(B, H, n_queries, E, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, N, E, generator=g, dtype=torch.float64) for _ in "kv")
    padding = None
    if case.get("padded"):
        padding = torch.ones(B, N, dtype=torch.bool)
        padding[0, :3] = False  # left padding: with causal masking, rows 0-2 of batch 0 see nothing
        padding[1, -4:] = False
    return (q, k, v), padding


def _kwargs(case: dict, padding) -> dict:
    keep = ("causal", "window", "period", "lambda_distance", "q_offset")
    return dict(depth=DEPTH, key_padding_mask=padding, **{k: case[k] for k in keep if k in case})


def _run(backend, inputs, padding, case, device, dtype):
    q, k, v = (t.detach().to(device, dtype).requires_grad_() for t in inputs)
    if padding is not None:
        padding = padding.to(device)
    out = toroidal_attention(q, k, v, backend=backend, **_kwargs(case, padding))
    out.float().square().sum().backward()
    return out.double().cpu(), [t.grad.double().cpu() for t in (q, k, v)]


def _relative(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["sdpa", "blockwise", "flex", "auto"])
def test_backend_matches_the_float64_reference(backend, case, dtype):
    inputs, padding = _inputs(CASES[case])
    expected, expected_grads = _run("reference", inputs, padding, CASES[case], "cpu", torch.float64)
    out, grads = _run(backend, inputs, padding, CASES[case], "cuda", dtype)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    tolerance = TOLERANCE[dtype]
    assert _relative(out, expected) < tolerance, backend
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        assert _relative(grad, expected_grad) < 2 * tolerance, f"{backend} d{name}"
    if padding is not None:
        assert out[0, :, :3].abs().max() == 0  # rows with nothing to attend are zeros, not NaN


def test_auto_picks_a_cuda_backend_for_training():
    inputs, _ = _inputs(CASES["causal-no-bias"])
    q, k, v = (t.to("cuda", torch.bfloat16).requires_grad_() for t in inputs)
    chosen = selected_backend(q, k, v, depth=DEPTH, causal=True, lambda_distance=0.1)
    assert chosen in ("flash2", "flex", "sdpa")


def test_module_on_cuda_matches_the_same_module_on_cpu():
    torch.manual_seed(0)
    layer = ToroidalAttention(d_model=64, n_heads=4, max_len=32, depth=4, lambda_distance=0.1)
    x = torch.randn(2, 20, 64)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, -5:] = 0
    expected, _ = layer(x, attention_mask=mask)
    out, _ = layer.to("cuda")(x.cuda().requires_grad_(), attention_mask=mask.cuda())
    out.float().sum().backward()
    assert _relative(out.double().cpu()[mask.bool()], expected.double()[mask.bool()]) < 3e-3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


# --- the CLI on the GPU ----------------------------------------------------------------------------------

runner = CliRunner()
SHAPE = ["--seq-len", "64", "--d-model", "64", "--heads", "2", "--depth", "2", "--warmup", "1"]


def test_bench_on_cuda_times_every_gpu_backend_with_telemetry(tmp_path):
    out = tmp_path / "bench.json"
    args = [*SHAPE, "--repeats", "3", "--device", "cuda", "--dtype", "bf16", "--mode", "fwd,fwd+bwd"]
    result = runner.invoke(app, ["bench", *args, "-b", "auto,flex,sdpa,blockwise", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8
    for row in rows:
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["overhead"] > 0 and row["peak_memory_mb"] >= 0
    if any(row["gpu_name"] for row in rows):  # pynvml installed: every row carries telemetry
        assert all(row["gpu_name"] and row["gpu_power_w"] is not None for row in rows)


def test_profile_on_cuda(tmp_path):
    out = tmp_path / "profile.json"
    args = [*SHAPE, "--device", "cuda", "--backend", "sdpa", "--out", str(out)]
    result = runner.invoke(app, ["profile", *args])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["operators"] and record["stages"]


def test_validate_on_cuda():
    result = runner.invoke(app, ["validate", "--device", "cuda"])
    assert result.exit_code == 0, result.output

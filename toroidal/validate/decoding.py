"""The decoding section of `toroidal validate`: exact KV-cache decoding, and what streaming costs.

Checks (float32, on the requested device):
- KV-cache decoding, token by token and in chunks, equals the full causal pass (1e-5),
  with a circular window and a period smaller than N (the ring wraps);
- streaming is exact where it should be: one position per slot (m = P, t < P);
- the streaming state does not grow with the tokens seen;
- informational: the time of one decoding step and the memory held for the context,
  streaming against the KV cache, on a small shape (`toroidal bench --mode stream`
  measures any shape).
"""

from __future__ import annotations

import statistics

import torch

from toroidal.attention import ToroidalAttention
from toroidal.bench import BenchCase, Timing
from toroidal.bench.stream import LATENT_SIZE, UPDATE, context_bytes, measure_decode_step
from toroidal.config import ToroidalConfig
from toroidal.kv_cache import KVCache
from toroidal.streaming import StreamingToroidalAttention
from toroidal.validate.report import PASS, PROPERTY_TOLERANCE, CheckResult, max_abs_diff, verdict

N, CHUNKS = 12, (5, 1, 6)
COST_CASE = dict(backend="auto", seq_len=1024, depth=4, batch=1, heads=4, d_model=256, mode="stream")


def _module(device, **overrides) -> ToroidalAttention:
    fields = dict(d_model=64, n_heads=4, depth=4, lambda_distance=0.5, max_len=32, causal=True)
    fields.update(overrides)
    module = ToroidalAttention(ToroidalConfig(**fields))
    with torch.no_grad():  # fusion must not be the identity for the comparison to mean something
        for param in module.fusion.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return module.to(device).eval()


def check_kv_cache(device) -> list[CheckResult]:
    module = _module(device, window=3, period=5, depth=2)
    x = torch.randn(2, N, 64).to(device)
    errors = []
    with torch.no_grad():
        full, _ = module(x)
        for chunks in ((1,) * N, CHUNKS):
            cache, outputs, start = KVCache(), [], 0
            for size in chunks:
                outputs.append(module(x[:, start : start + size], cache=cache)[0])
                start += size
            errors.append(max_abs_diff(torch.cat(outputs, dim=1), full))
    detail = f"N={N}, P=5, window=3, D=2: token by token and chunks {CHUNKS} vs the full pass"
    return [verdict("kv-cache decoding: exact", max(errors), PROPERTY_TOLERANCE, detail)]


def check_streaming_exact_case(device) -> list[CheckResult]:
    results = []
    for update in ("linear", "gru"):
        module = _module(device, window=4, max_len=N)
        stream = StreamingToroidalAttention(module, latent_size=N, update=update).to(device)
        x = torch.randn(2, N, 64).to(device)
        with torch.no_grad():
            error = max_abs_diff(stream(x)[0], module(x)[0])
        detail = f"m = P = N = {N}, window=4: one position per slot equals the full pass"
        results.append(verdict(f"streaming exact case: {update}", error, PROPERTY_TOLERANCE, detail))
    return results


def check_state_size(device) -> list[CheckResult]:
    stream = StreamingToroidalAttention(_module(device, max_len=8), latent_size=4, update="gru").to(device)
    state, sizes = stream.init_state(1), []
    with torch.no_grad():
        for t in range(1, 101):
            _, state = stream.forward_streaming(torch.randn(1, 64).to(device), state)
            if t in (10, 100):
                sizes.append(state.nbytes)
    detail = f"state bytes after 10 and 100 tokens, P=8 ({sizes[0]} bytes)"
    return [verdict("streaming state: constant size", abs(sizes[1] - sizes[0]), 0.0, detail)]


def streaming_cost(device) -> list[CheckResult]:
    """Informational: one step's time and the context's memory, streaming vs KV cache."""
    case = BenchCase(**COST_CASE, device=str(device))
    # One thread: single-token steps gain nothing from more, and contended threads make noise.
    threads = torch.get_num_threads()
    timing = Timing(str(device), warmup=3, repeats=15, threads=1)
    try:
        stream = statistics.median(measure_decode_step(case, timing, "stream").times) * 1e3
        cached = statistics.median(measure_decode_step(case, timing, "kv_cache").times) * 1e3
    finally:
        torch.set_num_threads(threads)
    state, cache = context_bytes(case)
    shape = f"N={case.seq_len}, B=1, H={case.heads}, d_model={case.d_model}, D={case.depth}, m={LATENT_SIZE}"
    return [
        CheckResult(
            "streaming vs kv-cache: step time",
            PASS,
            detail=f"informational: {stream:.3f} ms vs {cached:.3f} ms per token ({stream / cached:.2f}x); "
            f"{shape}, {UPDATE} update, 1 thread",
        ),
        CheckResult(
            "streaming vs kv-cache: memory",
            PASS,
            detail=f"informational: state {state / 1024:,.1f} KiB (constant) vs KV cache "
            f"{cache / 1024:,.1f} KiB (grows {cache / case.seq_len / 1024:.1f} KiB per token); {shape}",
        ),
    ]


def check_decoding(device: torch.device | str = "cpu") -> list[CheckResult]:
    device = torch.device(device)
    return (
        check_kv_cache(device)
        + check_streaming_exact_case(device)
        + check_state_size(device)
        + streaming_cost(device)
    )

"""`toroidal validate --mechanism NAME` for mechanisms other than `toroidal` (which keeps its own suite).

Every mechanism gets the kernel contract (float32, default options): causal masking lets
nothing flow from future keys, and rows with nothing to attend give zeros with finite
gradients. Then, per mechanism:

- `standard`: against softmax attention materialized in float64, in the requested dtype;
- `hyperbolic`: stability for inputs of norm 1e-8 to 1e4 in float32 and bfloat16 (finite outputs
  and gradients, curvature included), the expmap0/logmap0 round trip, distance symmetry, zero
  diagonal, and the all-pairs distance and midpoint against geoopt's own;
- `tiled`: with every tile exact (budget None, concatenating fusion) it is toroidal attention;
- `alibi`: against its bias materialized in float64 (causal with padding, bidirectional, and
  the last rows decoded with a query offset).
"""

from __future__ import annotations

import math

import torch

from toroidal.config import period_for
from toroidal.functional import toroidal_attention
from toroidal.mechanisms import build_kernel, get_mechanism
from toroidal.validate.report import (
    FAIL,
    KERNEL_TOLERANCE,
    NO_LEAK_TOLERANCE,
    PROPERTY_TOLERANCE,
    CheckResult,
    max_abs_diff,
    verdict,
)

_BATCH, _HEADS, _N, _WIDTH = 2, 2, 12, 16
STABILITY_NORMS = (1e-8, 1e-4, 1.0, 1e2, 1e4)
ROUND_TRIP_TOLERANCE = 1e-5
DISTANCE_RELATIVE_TOLERANCE = 1e-4  # float32 against geoopt in float64; measured 1e-5 near the rim


def _rand(*shape, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(device=device, dtype=dtype)


def _non_finite(*tensors) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t is not None)


# --- the kernel contract -----------------------------------------------------------------------


def check_kernel_contract(mechanism: str, device: torch.device | str = "cpu") -> list[CheckResult]:
    """Causal no-leak and zero rows for empty rows (finite gradients), for any registered mechanism."""
    device = torch.device(device)
    kernel = build_kernel(mechanism, _HEADS, _WIDTH).to(device)
    shape = (_BATCH, _HEADS, _N, _WIDTH)
    q, k, v = (_rand(*shape, device=device) for _ in range(3))

    t = 7  # keys and values from position t on change: outputs before t must not
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[:, :, t:] = _rand(_BATCH, _HEADS, _N - t, _WIDTH, device=device)
    changed_v[:, :, t:] = _rand(_BATCH, _HEADS, _N - t, _WIDTH, device=device)
    with torch.no_grad():
        before, after = kernel(q, k, v, causal=True), kernel(q, changed_k, changed_v, causal=True)
    name = f"{mechanism}: causal no-leak"
    if max_abs_diff(before[..., t:, :], after[..., t:, :]) == 0.0:
        leak = CheckResult(name, FAIL, None, NO_LEAK_TOLERANCE, "vacuous: outputs ignore the keys")
    else:
        detail = f"N={_N}, keys {t}.. changed, default options"
        leak = verdict(name, max_abs_diff(before[..., :t, :], after[..., :t, :]), NO_LEAK_TOLERANCE, detail)

    padding = torch.ones(_BATCH, _N, dtype=torch.bool, device=device)
    padding[0, :3] = False  # causal rows 0-2 of batch 0 see only padding
    padding[1] = False  # batch 1 has no real key at all
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = kernel(*leaves, causal=True, key_padding_mask=padding)
    out.float().pow(2).sum().backward()
    name = f"{mechanism}: empty rows"
    bad = _non_finite(out, *(leaf.grad for leaf in leaves))
    if bad:
        empty = CheckResult(name, FAIL, math.nan, NO_LEAK_TOLERANCE, f"{bad} non-finite outputs or gradients")
    else:
        out = out.detach()
        error = max(float(out[0, :, :3].abs().max()), float(out[1].abs().max()))
        empty = verdict(name, error, NO_LEAK_TOLERANCE, "max |out| on rows with no key; gradients finite")
    return [leak, empty]


# --- standard ------------------------------------------------------------------------------------


def check_standard(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> list[CheckResult]:
    """`standard` against softmax(q k^T * e^-1/2) v materialized in float64, causal with padding."""
    device = torch.device(device)
    kernel = build_kernel("standard", _HEADS, _WIDTH)
    q, k, v = (_rand(_BATCH, _HEADS, _N, _WIDTH, device=device, dtype=dtype) for _ in range(3))
    padding = torch.ones(_BATCH, _N, dtype=torch.bool, device=device)
    padding[1, -3:] = False
    with torch.no_grad():
        out = kernel(q, k, v, causal=True, key_padding_mask=padding)
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) * _WIDTH**-0.5
    allowed = torch.ones(_N, _N, dtype=torch.bool).tril() & padding.cpu()[:, None, None, :]
    expected = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1) @ v64
    detail = f"causal, right padding, N={_N}, {str(dtype).removeprefix('torch.')}"
    return [
        verdict("standard: vs float64 softmax", max_abs_diff(out, expected), KERNEL_TOLERANCE[dtype], detail)
    ]


def check_alibi(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[CheckResult]:
    """`alibi` against softmax(q k^T e^-1/2 - m_h (i - j)) v (|i - j| bidirectional) in float64."""
    from toroidal.mechanisms.alibi import alibi_slopes

    device = torch.device(device)
    kernel = build_kernel("alibi", _HEADS, _WIDTH)
    q, k, v = (_rand(_BATCH, _HEADS, _N, _WIDTH, device=device, dtype=dtype) for _ in range(3))
    padding = torch.ones(_BATCH, _N, dtype=torch.bool, device=device)
    padding[1, -3:] = False
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    slopes = torch.tensor(alibi_slopes(_HEADS), dtype=torch.float64)[:, None, None]
    offset = (torch.arange(_N)[:, None] - torch.arange(_N)[None, :]).double()
    name = str(dtype).removeprefix("torch.")
    results = []
    for causal in (True, False):
        with torch.no_grad():
            out = kernel(q, k, v, causal=causal, key_padding_mask=padding)
            last = kernel(q[:, :, -2:], k, v, causal=causal, key_padding_mask=padding, q_offset=_N - 2)
        scores = q64 @ k64.transpose(-1, -2) * _WIDTH**-0.5 - slopes * (offset if causal else offset.abs())
        allowed = padding.cpu()[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(_N, _N, dtype=torch.bool).tril()
        expected = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1) @ v64
        error = max(max_abs_diff(out, expected), max_abs_diff(last, expected[:, :, -2:]))
        kind = "causal" if causal else "bidirectional"
        detail = f"{kind}, right padding, N={_N}, last 2 rows decoded too, {name}"
        results.append(verdict(f"alibi: {kind} vs float64 bias", error, KERNEL_TOLERANCE[dtype], detail))
    return results


# --- hyperbolic ----------------------------------------------------------------------------------


def _inputs_of_norm(norm: float, dtype, device, generator) -> torch.Tensor:
    """(B, H, N, e) vectors of exactly this norm (before rounding to `dtype`) in random directions."""
    x = torch.randn(_BATCH, _HEADS, _N, _WIDTH, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * norm).to(device=device, dtype=dtype)


def check_hyperbolic_stability(device: torch.device | str = "cpu") -> list[CheckResult]:
    """Finite outputs and gradients (q, k, v, curvature, beta) for inputs of norm 1e-8..1e4, both
    aggregations, causal with padding, keys independent of the queries and equal to them (zero
    distances), in float32 and bfloat16. The measured error is the count of non-finite values."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    padding = torch.ones(_BATCH, _N, dtype=torch.bool, device=device)
    padding[1, :2] = False  # with causal masking, rows 0-1 of batch 1 have nothing to attend
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        bad_out = bad_grad = runs = 0
        for aggregation in ("midpoint", "tangent"):
            kernel = build_kernel(
                "hyperbolic", _HEADS, _WIDTH, aggregation=aggregation, learn_curvature=True, learn_beta=True
            ).to(device)
            for norm in STABILITY_NORMS:
                for same_keys in (False, True):
                    q, v = (_inputs_of_norm(norm, dtype, device, generator) for _ in range(2))
                    k = q.clone() if same_keys else _inputs_of_norm(norm, dtype, device, generator)
                    leaves = [t.requires_grad_(True) for t in (q, k, v)]
                    kernel.zero_grad()
                    out = kernel(*leaves, causal=True, key_padding_mask=padding)
                    out.float().pow(2).sum().backward()
                    bad_out += _non_finite(out)
                    bad_grad += _non_finite(
                        *(leaf.grad for leaf in leaves), *(p.grad for p in kernel.parameters())
                    )
                    runs += 1
        label = str(dtype).removeprefix("torch.")
        detail = f"{runs} runs: norms 1e-8..1e4, midpoint and tangent, causal + padding"
        results.append(verdict(f"hyperbolic: outputs finite ({label})", bad_out, 0.0, detail))
        results.append(
            verdict(f"hyperbolic: gradients finite ({label})", bad_grad, 0.0, "q, k, v, c, beta; " + detail)
        )
    return results


def check_hyperbolic_geometry(device: torch.device | str = "cpu") -> list[CheckResult]:
    """Round trip, symmetry, zero diagonal, and agreement with geoopt, for c in 0.1, 1, 10."""
    from toroidal.mechanisms.hyperbolic import (
        POINT_DTYPE,
        RIM_MARGIN,
        from_ball,
        geoopt_modules,
        gyromidpoint,
        pairwise_distance,
        to_ball,
    )

    _, stereographic = geoopt_modules()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    curvatures = (0.1, 1.0, 10.0)
    # Radii from 1e-8 of the radius to the projection limit, in random directions.
    fractions = torch.cat([torch.logspace(-8, -1, 8), torch.linspace(0.2, 1 - RIM_MARGIN, 9)]).double()
    trip = {torch.float32: 0.0, POINT_DTYPE: 0.0}
    symmetry = diagonal = distance = midpoint = 0.0
    for value in curvatures:
        for dtype in trip:
            c = torch.tensor(value, dtype=dtype, device=device)
            directions = torch.randn(len(fractions), 4, _WIDTH, generator=generator, dtype=torch.float64)
            radii = fractions[:, None, None] / math.sqrt(value)
            x = (directions / directions.norm(dim=-1, keepdim=True) * radii).to(device=device, dtype=dtype)
            back = stereographic.expmap0(from_ball(x, c), k=-c)
            trip[dtype] = max(trip[dtype], max_abs_diff(back, x))

        c32 = torch.tensor(value, device=device)
        u = torch.randn(_HEADS, _N, _WIDTH, generator=generator) * torch.logspace(-8, 2, _N)[:, None]
        points, _, _ = to_ball(u.to(device), c32)  # from the origin to the rim
        d = pairwise_distance(points, points, c32)
        symmetry = max(symmetry, max_abs_diff(d, d.transpose(-1, -2)))
        diagonal = max(diagonal, float(d.diagonal(dim1=-2, dim2=-1).abs().max()))
        x64, c64 = points.double(), c32.double()
        expected = stereographic.dist(x64[..., :, None, :], x64[..., None, :, :], k=-c64)
        relative = (d.double() - expected).abs() / expected.clamp_min(1.0)
        distance = max(distance, float(relative.max()))

        weights = torch.softmax(torch.randn(_HEADS, _N, _N, generator=generator, dtype=torch.float64), dim=-1)
        got = gyromidpoint(weights.to(device), x64, c64)
        want = stereographic.weighted_midpoint(x64[:, None], weights.to(device), k=-c64, reducedim=[2])
        midpoint = max(midpoint, max_abs_diff(got, stereographic.project(want, k=-c64, eps=RIM_MARGIN)))

    where = f"c in {curvatures}, |x| from 1e-8 to {1 - RIM_MARGIN:g} of the radius"
    return [
        verdict("hyperbolic: expmap0(logmap0(x)) float32", trip[torch.float32], ROUND_TRIP_TOLERANCE, where),
        verdict(
            "hyperbolic: expmap0(logmap0(x)) float64",
            trip[POINT_DTYPE],
            ROUND_TRIP_TOLERANCE,
            "the kernel's dtype for per-point maps; " + where,
        ),
        verdict(
            "hyperbolic: distance symmetry", symmetry, PROPERTY_TOLERANCE, "max |d(x,y) - d(y,x)|, float32"
        ),
        verdict("hyperbolic: distance zero diagonal", diagonal, 0.0, "max |d(x,x)|, float32"),
        verdict(
            "hyperbolic: distance vs geoopt",
            distance,
            DISTANCE_RELATIVE_TOLERANCE,
            "float32 against geoopt's dist in float64, |error| / max(d, 1), origin to rim",
        ),
        verdict(
            "hyperbolic: midpoint vs geoopt",
            midpoint,
            PROPERTY_TOLERANCE,
            "matmul gyromidpoint against geoopt's weighted_midpoint, float64",
        ),
    ]


# --- tiled ----------------------------------------------------------------------------------------

_TILED_CASES = (
    dict(causal=True, window=None, period=None, pad=False),
    dict(causal=False, window=3, period=None, pad=True),
    dict(causal=True, window=None, period=8, pad=True),
)


def check_tiled_full_budget(device: torch.device | str = "cpu") -> list[CheckResult]:
    """`tiled` with every tile exact (budget None, fusion concat) against `toroidal_attention` (reference)."""
    device = torch.device(device)
    depth, lam, max_len = 2, 0.5, 16
    error = 0.0
    for case in _TILED_CASES:
        kernel = build_kernel(
            "tiled",
            _HEADS,
            _WIDTH,
            depth=depth,
            lambda_distance=lam,
            window=case["window"],
            period=case["period"],
            max_len=max_len,
            fusion="concat",
            budget=None,
            tile_size=4,
        ).to(device)
        q, k, v = (_rand(_BATCH, _HEADS, _N, _WIDTH, device=device) for _ in range(3))
        padding = None
        if case["pad"]:
            padding = torch.ones(_BATCH, _N, dtype=torch.bool, device=device)
            padding[1, -3:] = False
        period = period_for(_N, period=case["period"], max_len=max_len, causal=case["causal"])
        with torch.no_grad():
            got = kernel(q, k, v, causal=case["causal"], key_padding_mask=padding)
            want = toroidal_attention(
                q,
                k,
                v,
                depth=depth,
                lambda_distance=lam,
                period=period,
                causal=case["causal"],
                window=case["window"],
                key_padding_mask=padding,
                backend="reference",
            )
        error = max(error, max_abs_diff(got, want))
    detail = f"{len(_TILED_CASES)} cases: causal, window, period < N, padding; D={depth}, N={_N}, tile 4"
    return [verdict("tiled: full budget is exact", error, KERNEL_TOLERANCE[torch.float32], detail)]


# --- the suite ---------------------------------------------------------------------------------


def mechanism_suite(mechanism: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The (group name, zero-argument check) pairs of `toroidal validate --mechanism NAME`, NAME != toroidal.

    ValueError for an unknown mechanism; ImportError (naming the install) when `hyperbolic`
    lacks geoopt.
    """
    get_mechanism(mechanism)
    device = torch.device(device)
    suite = [("kernel contract", lambda: check_kernel_contract(mechanism, device))]
    if mechanism == "standard":
        suite.append(("standard vs softmax", lambda: check_standard(device, dtype)))
    if mechanism == "hyperbolic":
        from toroidal.mechanisms.hyperbolic import geoopt_modules

        geoopt_modules()  # fail before running anything when geoopt is missing
        suite.append(("hyperbolic stability", lambda: check_hyperbolic_stability(device)))
        suite.append(("hyperbolic geometry", lambda: check_hyperbolic_geometry(device)))
    if mechanism == "tiled":
        suite.append(("tiled full budget", lambda: check_tiled_full_budget(device)))
    if mechanism == "alibi":
        suite.append(("alibi vs its bias", lambda: check_alibi(device, dtype)))
    return suite

"""`hyperbolic`: attention on the Poincaré ball of curvature -c (radius 1/sqrt(c)).

Per head, with `s` the call's scale (default e ** -0.5):

- queries, keys and values are mapped onto the ball with the exponential map at the origin,
  `x = proj(expmap0(s * u))`; the scale puts unit-normal inputs well inside the ball instead of
  on its rim, and `proj` pulls points farther out than (1 - RIM_MARGIN) of the radius back to it;
- the score of query i and key j is `-beta * d_c(q_i, k_j) + gamma` (beta and gamma per head);
- the softmax weights average the values either as the weighted gyromidpoint on the ball
  (`aggregation="midpoint"`) or in the tangent space at the origin (`"tangent"`), and the
  result comes back with `logmap0(.) / s`.

Under the row softmax gamma shifts every score of a row equally, so it changes no output.

The per-point manifold operations (expmap0, logmap0, proj, the conformal factor, Möbius scalar
multiplication, the curvature's parametrization) are geoopt's, run in float64: they cost O(N e),
and geoopt's float32 artanh (log(1 + x) - log(1 - x)) returns 0 for norms below 6e-8 (measured:
100% relative error at input norm 1e-8, 1e-3 at 1e-4). The all-pairs steps, O(N^2), run in float32
(float64 for float64 inputs) and are written here because geoopt's versions broadcast
(B, H, N_q, N_k, e) tensors: the distance (`pairwise_distance`) and the midpoint (two matmuls,
`gyromidpoint`); tests check both against geoopt.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from toroidal.geometry import position_allowed, sliding_window_that_bites
from toroidal.mechanisms.base import KernelModule, Mechanism, check_options
from toroidal.runtime.install import missing_module_message

HYPERBOLIC_OPTIONS = (
    "curvature",
    "learn_curvature",
    "beta",
    "learn_beta",
    "gamma",
    "learn_gamma",
    "aggregation",
)
AGGREGATIONS = ("midpoint", "tangent")
# Points stay within (1 - RIM_MARGIN) of the radius: geoopt's own float32 margin, which keeps
# 1 - c|x|^2 >= 8e-3 for the float32 distance stage.
RIM_MARGIN = 4e-3
POINT_DTYPE = torch.float64


def geoopt_modules():
    """(geoopt, geoopt's stereographic math module), imported on first use: geoopt is an optional extra."""
    try:
        with warnings.catch_warnings():
            # geoopt decorates its math with torch.jit.script, which torch deprecates; not ours to fix.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            import geoopt
            from geoopt.manifolds.stereographic import math as stereographic
    except ImportError:
        raise ImportError(f"the hyperbolic mechanism {missing_module_message('geoopt')}") from None
    return geoopt, stereographic


def pair_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the all-pairs stage: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_ball(u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tangent vectors at the origin (..., e) -> (points on the ball, clipped mask, norms before clipping).

    `clipped` (...,) marks points that the projection moved back inside the ball; the norms (...,)
    are in units of the radius, so 1 is the rim. Computed in the dtype of `u`.
    """
    _, stereographic = geoopt_modules()
    k = -c  # geoopt's sectional curvature
    raw = stereographic.expmap0(u, k=k)
    point = stereographic.project(raw, k=k, eps=RIM_MARGIN)
    clipped = (point != raw).any(dim=-1)
    return point, clipped, raw.detach().norm(dim=-1) * c.detach().sqrt()


def from_ball(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Points on the ball (..., e) -> tangent vectors at the origin (geoopt's logmap0)."""
    return geoopt_modules()[1].logmap0(x, k=-c)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Geodesic distances d_c between points on the ball: x (..., N_x, e), y (..., N_y, e) -> (..., N_x, N_y).

    d_c(x, y) = 2 / sqrt(c) * asinh(sqrt(c) |x - y| / sqrt((1 - c|x|^2)(1 - c|y|^2))), the same
    distance as geoopt's `2 artanh(sqrt(c) ||(-x) + y||) / sqrt(c)` but with no cancellation:
    artanh's argument comes within 1e-5 of 1 near the rim, while asinh's is a ratio of positive
    terms. `|x - y|` comes from `torch.cdist` without the matmul shortcut
    `|x|^2 + |y|^2 - 2<x, y>`, which cancels for nearby points; the direct form is exactly 0 on
    the diagonal, exactly symmetric, and has a finite (zero) gradient there. Measured in float32
    on points from the origin to the rim, as |error| / max(d, 1) against geoopt in float64:
    3e-6 here, 7e-4 for geoopt's `dist`, 0.35 with the matmul shortcut.
    """
    return (2 / c.sqrt()) * half_scaled_distance(x, y, c)


def half_scaled_distance(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sqrt(c) d_c(x, y) / 2 for all pairs: the asinh above (the kernel folds 2 / sqrt(c) into beta)."""
    gap = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    eps = torch.finfo(x.dtype).eps
    # 1 - c|x|^2 > 0 inside the ball; the floor only guards points a caller did not project.
    # c ** 0.25 on both sides: the same per-point factor for x and y keeps d(x, y) = d(y, x) exactly.
    factor_x = c.pow(0.25) * (1 - c * x.pow(2).sum(dim=-1)).clamp_min(eps).rsqrt()
    factor_y = c.pow(0.25) * (1 - c * y.pow(2).sum(dim=-1)).clamp_min(eps).rsqrt()
    return torch.asinh(gap * (factor_x[..., :, None] * factor_y[..., None, :]))


def gyromidpoint(weights: torch.Tensor, points: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Weighted gyromidpoints: weights (..., N_q, N_k) (rows sum to 1, or all 0), points (..., N_k, e).

    geoopt's `weighted_midpoint` formula, `0.5 (x) sum_j w_j lambda_j x_j / sum_j w_j (lambda_j - 1)`
    with lambda the conformal factor, done as two matmuls in the dtype of `weights`; the rest in
    the dtype of `points`. A row of zero weights gives the origin.
    """
    _, stereographic = geoopt_modules()
    k = -c
    conformal = stereographic.lambda_x(points, k=k, keepdim=True)  # (..., N_k, 1), >= 2
    numerator = weights @ (conformal * points).to(weights.dtype)
    # Rows with weights summing to 1 have a denominator >= 1; all-zero rows have 0.
    denominator = (weights @ (conformal - 1).to(weights.dtype)).clamp_min(0.5)
    klein_mean = (numerator / denominator).to(points.dtype)
    half = torch.tensor(0.5, dtype=points.dtype, device=points.device)
    midpoint = stereographic.mobius_scalar_mul(half, klein_mean, k=k)
    return stereographic.project(midpoint, k=k, eps=RIM_MARGIN)


def allowed_keys(causal, key_padding_mask, n_q, n_k, q_offset, device, sliding_window=None):
    """Boolean (B or 1, 1, N_q, N_k) mask of the keys each query may attend, or None for all of them."""
    allowed = None
    sliding_window = sliding_window_that_bites(sliding_window, n_q, n_k, q_offset, causal)
    if causal or sliding_window is not None:
        rows = torch.arange(n_q, device=device)[:, None] + q_offset
        keys = torch.arange(n_k, device=device)[None, :]
        allowed = position_allowed(rows, keys, causal, None, 1, sliding_window)[None, None]  # no period
    if key_padding_mask is not None:
        padding = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = padding if allowed is None else allowed & padding
    return allowed


def _check_values(curvature, beta, gamma, aggregation, flags: dict) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"hyperbolic option {name} must be true or false, got {value!r}")
    if isinstance(curvature, bool) or not (
        isinstance(curvature, (int, float)) and math.isfinite(curvature) and curvature > 0
    ):
        raise ValueError(f"hyperbolic option curvature must be a positive number, got {curvature!r}")
    for name, value in (("beta", beta), ("gamma", gamma)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"hyperbolic option {name} must be a finite number, got {value!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"hyperbolic option aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}"
        )


class HyperbolicKernel(KernelModule):
    """Attention by geodesic distance on the Poincaré ball (see the module docstring).

    Options: curvature c > 0 (default 1), beta (1) and gamma (0) per head, each fixed unless
    `learn_curvature` / `learn_beta` / `learn_gamma` is true; aggregation 'midpoint' or 'tangent'.
    `get_metrics()`: the largest norm a point reached on the ball before projection (in units of
    the radius), how many points (queries, keys, values) and how many values were projected back
    inside the ball, out of how many points, and the current curvature.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        *,
        curvature: float = 1.0,
        learn_curvature: bool = False,
        beta: float = 1.0,
        learn_beta: bool = False,
        gamma: float = 0.0,
        learn_gamma: bool = False,
        aggregation: str = "midpoint",
        **options,
    ):
        super().__init__()
        check_options("hyperbolic", options, HYPERBOLIC_OPTIONS)
        flags = {"learn_curvature": learn_curvature, "learn_beta": learn_beta, "learn_gamma": learn_gamma}
        _check_values(curvature, beta, gamma, aggregation, flags)
        geoopt, _ = geoopt_modules()
        # geoopt's ball holds c as softplus(parameter), so a learned curvature stays positive.
        self.ball = geoopt.PoincareBall(c=float(curvature), learnable=learn_curvature)
        self.learn_curvature, self.aggregation = learn_curvature, aggregation
        for name, value, learn in (("beta", beta, learn_beta), ("gamma", gamma, learn_gamma)):
            per_head = torch.full((heads, 1, 1), float(value))
            if learn:
                self.register_parameter(name, nn.Parameter(per_head))
            else:
                self.register_buffer(name, per_head)
        self.reset_metrics()

    def curvature(self) -> torch.Tensor:
        """c > 0 as a 0-dim tensor (detached unless learned, so `requires_grad_()` cannot unfreeze it)."""
        c = self.ball.c
        return c if self.learn_curvature else c.detach()

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        pairs = pair_dtype(q.dtype)
        s = q.shape[-1] ** -0.5 if scale is None else float(scale)
        c = self.curvature().to(POINT_DTYPE)
        (qb, q_clip, q_norm), (kb, k_clip, k_norm), (vb, v_clip, v_norm) = (
            to_ball(t.to(POINT_DTYPE) * s, c) for t in (q, k, v)
        )
        self._record((q_clip, k_clip, v_clip), (q_norm, k_norm, v_norm))

        # scores = gamma - beta * d_c = gamma - (2 beta / sqrt(c)) * half_scaled_distance, in one pass.
        slope = self.beta.to(pairs) * (-2 / c.to(pairs).sqrt())
        half = half_scaled_distance(qb.to(pairs), kb.to(pairs), c.to(pairs))
        scores = torch.addcmul(self.gamma.to(pairs), slope, half)
        n_q, n_k = q.shape[-2], k.shape[-2]
        allowed = allowed_keys(causal, key_padding_mask, n_q, n_k, q_offset, q.device, sliding_window)
        has_key = None
        if allowed is not None:
            scores.masked_fill_(~allowed, -math.inf)
        if key_padding_mask is not None:
            # Causal rows always see key 0 (q_offset >= 0): only padding can leave a row with no key.
            # Such rows get finite scores here (no NaN in softmax or its gradient) and zeros at the end.
            has_key = allowed.any(dim=-1, keepdim=True)
            scores.masked_fill_(~has_key, 0.0)
        weights = torch.softmax(scores, dim=-1)

        if self.aggregation == "midpoint":
            out = from_ball(gyromidpoint(weights, vb, c), c)
        else:
            out = weights @ from_ball(vb, c).to(pairs)
        out = out / s
        if has_key is not None:
            out = out.masked_fill(~has_key, 0.0)
        return out.to(q.dtype)

    @torch.no_grad()
    def _record(self, clipped, norms) -> None:
        """Accumulate the metrics as tensors (no device sync until `get_metrics()`)."""
        self._points += sum(mask.numel() for mask in clipped)
        self._clipped = self._clipped + sum(mask.sum() for mask in clipped)
        self._values_projected = self._values_projected + clipped[2].sum()
        peak = torch.stack([norm.max() if norm.numel() else norm.new_zeros(()) for norm in norms]).max()
        self._max_norm = torch.maximum(self._max_norm.to(peak.device), peak.float())

    def get_metrics(self) -> dict:
        return {
            "max_ball_norm": float(self._max_norm),
            "points": int(self._points),
            "points_clipped": int(self._clipped),
            "values_projected": int(self._values_projected),
            "curvature": float(self.curvature().detach()),
        }

    def reset_metrics(self) -> None:
        self._points = self._clipped = self._values_projected = 0
        self._max_norm = torch.zeros(())


MECHANISM = Mechanism(
    "hyperbolic",
    "attention on the Poincaré ball: scores -beta * geodesic distance, values at their gyromidpoint",
    HyperbolicKernel,
    accepts=HYPERBOLIC_OPTIONS,
)

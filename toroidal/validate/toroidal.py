"""The checks of toroidal attention itself: distances, shift invariance, causality, gradients,
rotary orthogonality, every backend against `reference` (values, gradients, padded rows), and in
float64 `torch.autograd.gradcheck` (and gradgradcheck) of every backend that takes float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toroidal.attention import ToroidalAttention
from toroidal.config import ToroidalConfig
from toroidal.functional import toroidal_attention
from toroidal.geometry import ring_distance, toroidal_distance
from toroidal.kernels import BackendUnavailable, backend_names, get_backend
from toroidal.rope import orthogonality_score
from toroidal.validate.report import (
    EXACT_TOLERANCE,
    FAIL,
    GRAD_NORM_BOUND,
    GRADCHECK_ATOL,
    GRADCHECK_RTOL,
    KERNEL_TOLERANCE,
    NO_LEAK_TOLERANCE,
    ORTHOGONAL_MAX_SCORE,
    PASS,
    PROPERTY_TOLERANCE,
    SKIP,
    CheckResult,
    max_abs_diff,
    reason_of,
    verdict,
)

# --- distances ---------------------------------------------------------------------------------

_PERIODS = (1, 2, 3, 7, 8, 16)


def check_geometry() -> list[CheckResult]:
    """Ring and toroidal distance: symmetry, identity, and wrap-around against a brute-force definition."""
    sym = ident = wrap = 0.0
    for period in _PERIODS:
        idx = torch.arange(-period, 2 * period)
        i, j = idx[:, None], idx[None, :]
        ring = ring_distance(i, j, period)
        sym = max(sym, float((ring - ring.T).abs().max()))
        ident = max(ident, float(ring.diagonal().abs().max()))
        # Distinct positions on the ring (i != j mod P) are never at distance 0.
        distinct = (i - j) % period != 0
        ident = max(ident, float(((ring == 0) & distinct).sum()))
        # Wrap-around: the shortest way round, min over windings of |i - j - kP|.
        windings = torch.arange(-3, 4)[:, None, None] * period
        brute = (i - j - windings).abs().amin(dim=0)
        wrap = max(wrap, float((ring - brute).abs().max()))
        if period >= 2:
            wrap = max(wrap, abs(ring_distance(0, period - 1, period) - 1))
        # Python ints follow the same definition as tensors.
        wrap = max(
            wrap, max(abs(ring_distance(a, b, period) - int(ring[a, b])) for a in range(3) for b in range(3))
        )
        depth = 4
        k = torch.arange(depth)
        delta = toroidal_distance(
            idx[:, None, None, None],
            k[None, :, None, None],
            idx[None, None, :, None],
            k[None, None, None, :],
            period,
            depth,
        )  # (n, D, n, D)
        sym = max(sym, float((delta - delta.permute(2, 3, 0, 1)).abs().max()))
        ident = max(ident, float(delta.diagonal(dim1=0, dim2=2).diagonal(dim1=0, dim2=1).abs().max()))
    return [
        verdict("distance: symmetry", sym, 0.0, f"ring, delta; P in {_PERIODS}"),
        verdict("distance: identity", ident, 0.0, "ring(i,i) = delta(x,x) = 0, else > 0"),
        verdict("distance: wrap-around", wrap, 0.0, "ring(i,j) = min_k |i-j-kP|"),
    ]


# --- module properties -------------------------------------------------------------------------


def _module(device: torch.device, **overrides) -> ToroidalAttention:
    """A small ToroidalAttention with randomized fusion weights (so fusion is not the identity)."""
    fields = dict(d_model=64, n_heads=4, depth=4, lambda_distance=0.5, max_len=32, fusion="low_rank")
    fields.update(overrides)
    module = ToroidalAttention(ToroidalConfig(**fields))
    with torch.no_grad():
        for param in module.fusion.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return module.to(device).eval()


def check_shift_invariance(
    device: torch.device | str = "cpu", backend: str = "auto", dtype: torch.dtype = torch.float32
) -> list[CheckResult]:
    """Bidirectional attention with P = N and periodic (or no) RoPE: rolling the input rolls the output.

    The property is exact: in float64 the tolerance is `EXACT_TOLERANCE` (rounding only).
    """
    device = torch.device(device)
    n, shifts = 12, (1, 5, 11)
    exact = dtype == torch.float64
    tolerance = EXACT_TOLERANCE if exact else PROPERTY_TOLERANCE
    results = []
    for rope, window in (("periodic", None), ("none", None), ("periodic", 3)):
        module = _module(device, rope=rope, window=window, causal=False, period=None, backend=backend)
        module = module.to(dtype)
        # Drawn on the CPU: the same inputs on every device.
        x = torch.randn(2, n, 64).to(device=device, dtype=dtype)
        with torch.no_grad():
            base, _ = module(x)
            error = max(
                max_abs_diff(module(torch.roll(x, s, dims=1))[0], torch.roll(base, s, dims=1)) for s in shifts
            )
        name = f"shift invariance: rope={rope}" + (f", window={window}" if window is not None else "")
        detail = f"N=P={n}, shifts {shifts}"
        if exact:
            name, detail = f"{name} (float64)", f"{detail}, backend {backend}"
        results.append(verdict(name, error, tolerance, detail))
    return results


def check_causal_no_leak(device: torch.device | str = "cpu", backend: str = "auto") -> list[CheckResult]:
    """Causal attention: changing tokens from position t on changes no output before t."""
    device = torch.device(device)
    n, t = 12, 7
    results = []
    for window in (None, 3):
        module = _module(device, causal=True, window=window, rope="standard", backend=backend)
        x = torch.randn(2, n, 64).to(device)
        changed = x.clone()
        changed[:, t:] = torch.randn(2, n - t, 64).to(device)
        with torch.no_grad():
            before, after = module(x)[0], module(changed)[0]
        error = max_abs_diff(before[:, :t], after[:, :t])
        name = "causal no-leak" + (f": window={window}" if window is not None else "")
        detail = f"N={n}, tokens {t}.. changed, P=32"
        if max_abs_diff(before[:, t:], after[:, t:]) == 0.0:  # the change must reach the future outputs
            results.append(
                CheckResult(name, FAIL, error, NO_LEAK_TOLERANCE, "vacuous: outputs ignore the input")
            )
        else:
            results.append(verdict(name, error, NO_LEAK_TOLERANCE, detail))
    return results


def check_module_gradients(device: torch.device | str = "cpu") -> list[CheckResult]:
    """Every fusion and rope mode, causal and not: parameter and input gradients finite and bounded."""
    device = torch.device(device)
    combos = (("low_rank", "standard"), ("attention", "orthogonal"), ("mean", "periodic"), ("concat", "none"))
    norms = {}
    for causal in (False, True):
        for fusion, rope in combos:
            module = _module(device, fusion=fusion, rope=rope, causal=causal, window=None if causal else 4)
            module.train()
            x = torch.randn(2, 10, 64).to(device).requires_grad_(True)
            mask = torch.ones(2, 10, dtype=torch.bool, device=device)
            mask[1, -3:] = False
            out, _ = module(x, attention_mask=mask)
            out.pow(2).mean().backward()
            grads = [p.grad for p in module.parameters() if p.grad is not None] + [x.grad]
            label = f"{fusion}/{rope}/{'causal' if causal else 'bidir'}"
            norms[label] = float(torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grads)))
    name = "module gradients"
    broken = [label for label, norm in norms.items() if not math.isfinite(norm)]
    if broken:
        return [CheckResult(name, FAIL, math.nan, GRAD_NORM_BOUND, f"non-finite gradients at {broken[0]}")]
    worst = max(norms, key=norms.get)
    detail = f"max grad norm of {len(norms)} configs, at {worst}"
    return [verdict(name, norms[worst], GRAD_NORM_BOUND, detail)]


def check_orthogonality() -> list[CheckResult]:
    """Orthogonality score of the RoPE bases: reported for 'standard', < 0.1 required for 'orthogonal'."""
    widths = (4, 8, 16, 32, 64)
    standard = orthogonality_score("standard", 16)
    orthogonal = max(orthogonality_score("orthogonal", w) for w in widths)
    return [
        CheckResult(
            "rope orthogonality: standard",
            PASS,
            standard,
            None,
            "informational: axes parallel (width 16)",
        ),
        verdict(
            "rope orthogonality: orthogonal", orthogonal, ORTHOGONAL_MAX_SCORE, f"max over widths {widths}"
        ),
    ]


def check_research_snippet(device: torch.device | str = "cpu") -> list[CheckResult]:
    """The original research code's usage runs unchanged: shapes, finite weights, rows summing to 1."""
    device = torch.device(device)
    attn = ToroidalAttention(
        d_model=512, n_heads=8, max_len=2048, depth=4, lambda_distance=0.1, fusion_mode="low_rank"
    ).to(device)
    with torch.no_grad():
        output, attn_weights = attn(torch.randn(2, 128, 512).to(device), return_attention=True)
    name = "research snippet"
    if tuple(output.shape) != (2, 128, 512) or attn_weights is None:
        shape = None if attn_weights is None else tuple(attn_weights.shape)
        return [CheckResult(name, FAIL, detail=f"output {tuple(output.shape)}, weights {shape}")]
    if not (torch.isfinite(output).all() and torch.isfinite(attn_weights).all()):
        return [CheckResult(name, FAIL, math.nan, PROPERTY_TOLERANCE, "non-finite output or weights")]
    error = float((attn_weights.double().sum(dim=-1) - 1).abs().max())
    detail = "max |weight row sum - 1|, output (2, 128, 512)"
    return [verdict(name, error, PROPERTY_TOLERANCE, detail)]


# --- backends ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCase:
    """One point of the backend grid. `pad`: None, 'right' (batch 1 loses its last 3 positions)
    or 'left' (batch 1 loses its first 2, which with causal leaves rows with nothing to attend).
    `n_queries` < n: decoding the last `n_queries` positions against all n keys."""

    n: int
    depth: int
    lam: float
    causal: bool
    window: int | None = None
    pad: str | None = None
    period: int | None = None
    n_queries: int | None = None

    def label(self) -> str:
        parts = [
            f"N={self.n}",
            f"D={self.depth}",
            f"λ={self.lam:g}",
            "causal" if self.causal else "bidir",
        ]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.pad:
            parts.append(f"pad={self.pad}")
        if self.period is not None:
            parts.append(f"P={self.period}")
        if self.n_queries is not None:
            parts.append(f"decode {self.n_queries}")
        return " ".join(parts)


# Most cases keep N*D = 32 platter-tokens so that compiling backends reuse one shape.
QUICK_CASES = (
    KernelCase(8, 4, 0.5, causal=False, pad="right"),
    KernelCase(8, 4, 1.0, causal=True, window=2, pad="left"),
    KernelCase(16, 2, 0.5, causal=True, window=5, period=12),
)
FULL_CASES = QUICK_CASES + (
    KernelCase(32, 1, 0.0, causal=False),  # plain attention
    KernelCase(8, 4, 0.5, causal=True),
    KernelCase(16, 2, 0.5, causal=False, window=3, pad="right"),
    KernelCase(16, 2, 0.2, causal=True, pad="right"),
    KernelCase(11, 3, 0.3, causal=False, pad="right"),  # odd sizes: L = 33
    KernelCase(16, 2, 0.5, causal=True, window=4, period=32, n_queries=1),
)
_WIDTH, _BATCH, _HEADS = 8, 2, 2


def _exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference's dtype for inputs of `dtype`: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _case_inputs(case: KernelCase, device: torch.device, dtype: torch.dtype):
    """Deterministic unit-scale q, k, v, padding mask and output cotangent for one case."""
    gen = torch.Generator().manual_seed(1000 + case.n * 10 + case.depth)
    n_q = case.n_queries or case.n
    e = case.depth * _WIDTH

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(_BATCH, _HEADS, n_q, e), rand(_BATCH, _HEADS, case.n, e), rand(_BATCH, _HEADS, case.n, e)
    mask = None
    if case.pad is not None:
        mask = torch.ones(_BATCH, case.n, dtype=torch.bool)
        if case.pad == "right":
            mask[1, -3:] = False
        else:
            mask[1, :2] = False
        mask = mask.to(device)
    cotangent = torch.randn(_BATCH, _HEADS, n_q, e, generator=gen).to(device, _exact_dtype(dtype))
    return q, k, v, mask, cotangent


def _attend(backend: str, case: KernelCase, q, k, v, mask):
    return toroidal_attention(
        q,
        k,
        v,
        depth=case.depth,
        lambda_distance=case.lam,
        period=case.period,
        causal=case.causal,
        window=case.window,
        key_padding_mask=mask,
        backend=backend,
        q_offset=case.n - (case.n_queries or case.n),
    )


def _forward(backend: str, case: KernelCase, inputs) -> torch.Tensor:
    q, k, v, mask, _ = inputs
    with torch.no_grad():
        out = _attend(backend, case, q, k, v, mask)
        return out.to(_exact_dtype(out.dtype))


def _gradients(backend: str, case: KernelCase, inputs) -> tuple[torch.Tensor, ...]:
    q, k, v, mask, cotangent = inputs
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        out = _attend(backend, case, *leaves, mask)
        return torch.autograd.grad((out.to(cotangent.dtype) * cotangent).sum(), leaves)


@dataclass
class _Tally:
    """Worst error over the cases a backend ran, and why the others were skipped."""

    error: float = 0.0
    worst: str = ""
    ran: int = 0
    skipped: int = 0
    skip_reason: str = ""
    failure: str = ""

    def add(self, error: float, case: KernelCase) -> None:
        self.ran += 1
        worse = math.isnan(error) or error > self.error
        if not self.worst or (worse and not math.isnan(self.error)):  # a NaN stays the worst
            self.error, self.worst = error, case.label()

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reason = self.skip_reason or reason

    def fail(self, message: str, case: KernelCase) -> None:
        self.ran += 1
        self.failure = self.failure or f"{case.label()}: {message}"

    def result(self, name: str, tolerance: float, total: int) -> CheckResult:
        if self.ran == 0:
            return CheckResult(name, SKIP, None, tolerance, self.skip_reason)
        detail = (
            f"{self.ran}/{total} cases, worst: {self.worst}" if self.worst else f"{self.ran}/{total} cases"
        )
        if self.skipped:
            detail += f"; {self.skipped} skipped: {self.skip_reason}"
        if self.failure:
            return CheckResult(name, FAIL, self.error if self.worst else None, tolerance, self.failure)
        return verdict(name, self.error, tolerance, detail)


def _unavailable(error: BackendUnavailable, name: str) -> str:
    """The backend's own reason, without the "backend 'x' unavailable:" the row name already says."""
    text, prefix = str(error), f"backend {name!r} unavailable: "
    return text[len(prefix) :] if text.startswith(prefix) else text




def selected_backends(backends) -> list[str]:
    names = backend_names()
    if backends is None:
        return [name for name in names if name != "reference"]
    for name in backends:
        get_backend(name)  # unknown name: ValueError listing the registered ones
    return [name for name in backends if name != "reference"]


def check_backends(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: tuple[KernelCase, ...] = FULL_CASES,
    backends: list[str] | None = None,
) -> list[CheckResult]:
    """Every backend (or those named) against `reference`: max abs error of values and of q, k, v gradients.

    A backend that cannot serve a case (BackendUnavailable: device, dtype, gradients...)
    is skipped for it with its own reason; one that is forward-only here gets its values
    checked and its gradients skipped.
    """
    device, tolerance = torch.device(device), KERNEL_TOLERANCE[dtype]
    names = selected_backends(backends)
    references = []
    for case in cases:
        inputs = _case_inputs(case, device, dtype)
        exact = tuple(
            t.to(_exact_dtype(dtype)) if t is not None and t.is_floating_point() else t for t in inputs
        )
        references.append((inputs, _forward("reference", case, exact), _gradients("reference", case, exact)))
    results = []
    for name in names:
        values, grads = _Tally(), _Tally()
        for case, (inputs, ref_out, ref_grads) in zip(cases, references, strict=True):
            try:
                values.add(max_abs_diff(_forward(name, case, inputs), ref_out), case)
            except BackendUnavailable as error:
                values.skip(_unavailable(error, name))
            except Exception as error:  # a crashing backend is a failing backend
                values.fail(reason_of(error), case)
            try:
                got = _gradients(name, case, inputs)
                grads.add(max(max_abs_diff(g, r) for g, r in zip(got, ref_grads, strict=True)), case)
            except BackendUnavailable as error:
                grads.skip(_unavailable(error, name))
            except Exception as error:
                grads.fail(reason_of(error), case)
        results.append(values.result(f"backend {name}: values", tolerance, len(cases)))
        results.append(grads.result(f"backend {name}: gradients", tolerance, len(cases)))
    return results


def check_padded_rows(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, backends: list[str] | None = None
) -> list[CheckResult]:
    """Rows with nothing to attend (a fully padded batch, causal rows before padding) give zeros, no NaN."""
    device = torch.device(device)
    case = KernelCase(8, 4, 0.5, causal=True)
    q, k, v, _, cotangent = _case_inputs(case, device, dtype)
    mask = torch.ones(_BATCH, case.n, dtype=torch.bool)
    mask[0, :3] = False  # causal rows 0-2 of batch 0 see only padding
    mask[1, :] = False  # batch 1 has no real token at all
    mask = mask.to(device)
    empty = torch.zeros(_BATCH, 1, case.n, 1, dtype=torch.bool, device=device)
    empty[0, :, :3] = True
    empty[1] = True
    inputs = (q, k, v, mask, cotangent)
    results = []
    for name in ["reference"] + selected_backends(backends):
        label = f"padded rows: {name}"
        detail = "max |out| on empty rows"
        try:
            out = _forward(name, case, inputs)
        except BackendUnavailable as error:
            results.append(CheckResult(label, SKIP, None, NO_LEAK_TOLERANCE, _unavailable(error, name)))
            continue
        except Exception as error:
            results.append(CheckResult(label, FAIL, None, NO_LEAK_TOLERANCE, reason_of(error)))
            continue
        if not torch.isfinite(out).all():
            results.append(
                CheckResult(label, FAIL, math.nan, NO_LEAK_TOLERANCE, "NaN or infinity in the output")
            )
            continue
        error = float(out.masked_select(empty).abs().max())
        try:
            grads = _gradients(name, case, inputs)
            if not all(torch.isfinite(g).all() for g in grads):
                results.append(
                    CheckResult(label, FAIL, error, NO_LEAK_TOLERANCE, "NaN or infinity in gradients")
                )
                continue
            detail += ", grads finite"
        except BackendUnavailable as unavailable:
            detail += f"; grads skipped: {_unavailable(unavailable, name)}"
        except Exception as crash:
            results.append(CheckResult(label, FAIL, error, NO_LEAK_TOLERANCE, reason_of(crash)))
            continue
        results.append(verdict(label, error, NO_LEAK_TOLERANCE, detail))
    return results


# --- float64: gradcheck -------------------------------------------------------------------------

# Small enough for finite differences of every input (2 x 1 x 5 x 4 each), and together they cover
# a wrapping ring with a window and rows with nothing to see, padding, and decoding.
GRADCHECK_CASES = (
    KernelCase(5, 2, 0.7, causal=True, window=1, pad="left", period=4),
    KernelCase(5, 2, 0.5, causal=False, pad="right"),
    KernelCase(6, 2, 0.5, causal=True, period=8),
    KernelCase(5, 2, 0.5, causal=True, window=2, period=8, n_queries=2),
)


def _gradcheck_inputs(case: KernelCase, device: torch.device):
    gen = torch.Generator().manual_seed(2000 + case.n * 10 + case.depth)
    n_q, e = case.n_queries or case.n, case.depth * 2

    def leaf(n):
        return torch.randn(2, 1, n, e, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)

    mask = None
    if case.pad is not None:  # as in `_case_inputs`: batch 1 loses its last 3 or first 2 positions
        mask = torch.ones(2, case.n, dtype=torch.bool)
        mask[1, -3:] = case.pad != "right"
        mask[1, :2] = case.pad != "left"
        mask = mask.to(device)
    return (leaf(n_q), leaf(case.n), leaf(case.n)), mask


def _gradcheck_one(name: str, case: KernelCase, device: torch.device, second_order: bool) -> None:
    """Raises (GradcheckError, BackendUnavailable...) unless the backend's gradients check out."""
    leaves, mask = _gradcheck_inputs(case, device)

    def attend(q, k, v):
        return _attend(name, case, q, k, v, mask)

    tolerances = dict(atol=GRADCHECK_ATOL, rtol=GRADCHECK_RTOL)
    torch.autograd.gradcheck(attend, leaves, **tolerances)
    if second_order:
        torch.autograd.gradgradcheck(attend, leaves, **tolerances)


def check_gradcheck(
    device: torch.device | str = "cpu", backends: list[str] | None = None
) -> list[CheckResult]:
    """`torch.autograd.gradcheck` in float64 of `reference` and every selected backend that takes
    float64 (gradgradcheck too where a backend claims double backward), one row per backend."""
    device = torch.device(device)
    results = []
    for name in ["reference"] + selected_backends(backends):
        second_order = get_backend(name).double_backward
        label = f"gradcheck{' + gradgradcheck' if second_order else ''}: {name}"
        ran, skipped, failure = 0, [], ""
        for case in GRADCHECK_CASES:
            try:
                _gradcheck_one(name, case, device, second_order)
                ran += 1
            except BackendUnavailable as error:
                skipped.append(_unavailable(error, name))
            except Exception as error:  # GradcheckError, or a crash: either way the gradients are wrong
                ran += 1
                failure = failure or f"{case.label()}: {reason_of(error)}"
        detail = f"{ran}/{len(GRADCHECK_CASES)} float64 cases"
        detail += f", atol {GRADCHECK_ATOL:g}, rtol {GRADCHECK_RTOL:g}"
        if skipped:
            detail += f"; {len(skipped)} skipped: {skipped[0]}"
        if failure:
            results.append(CheckResult(label, FAIL, None, None, failure))
        elif ran == 0:
            results.append(CheckResult(label, SKIP, None, None, skipped[0]))
        else:
            results.append(CheckResult(label, PASS, None, None, detail))
    return results


# --- the suite ---------------------------------------------------------------------------------

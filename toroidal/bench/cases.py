"""What a sweep measures: `BenchCase` (one row), `BenchSweep` (the axes), and what a case costs
before it runs: the backend it would run, the bytes it would materialize, its FLOPs, its baselines."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

from toroidal.config import ATTENTION_OPTIONS
from toroidal.functional import backend_for_shape
from toroidal.kernels import backend_names
from toroidal.mechanisms import get_mechanism
from toroidal.runtime import memory
from toroidal.runtime.devices import DTYPES
from toroidal.runtime.timing import NOISY

MODES = ("fwd", "fwd+bwd", "stream")  # stream: one decoding step, see toroidal.bench.stream
BACKWARD_FLOP_FACTOR = 3.5  # fwd+bwd = forward + 2.5x forward (FlashAttention's convention)
# Kernel options that are sweep axes of their own (--depth, --lambda, ...), never --option values.
AXIS_OPTIONS = frozenset(ATTENTION_OPTIONS)


@dataclass(frozen=True)
class BenchCase:
    """One row of a sweep: a backend on one shape and torus. `period=None` means P = N."""

    backend: str
    seq_len: int
    depth: int
    batch: int
    heads: int
    d_model: int
    dtype: str = "fp32"
    mode: str = "fwd"
    causal: bool = True
    window: int | None = None
    lambda_distance: float = 0.1
    period: int | None = None
    device: str = "cpu"
    mechanism: str = "toroidal"  # see toroidal.mechanisms; "toroidal" times `toroidal_attention`
    options: tuple[tuple[str, object], ...] = ()  # the mechanism's own options, sorted by name
    ring_world_size: int | None = None  # W: `ring_attention` on W processes (toroidal.bench.ring)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def platter_tokens(self) -> int:
        """L = N*D."""
        return self.seq_len * self.depth

    @property
    def width(self) -> int:
        """w = e/D, the platter width."""
        return self.head_dim // self.depth

    @property
    def training(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def options_label(self) -> str | None:
        """The options as `name=value,...` (None without options): one hashable, readable key field."""
        return ",".join(f"{name}={value}" for name, value in self.options) or None

    def mechanism_kwargs(self) -> dict:
        """Keywords of the mechanism's kernel builder: the torus axes it accepts, then its options."""
        accepted = get_mechanism(self.mechanism).accepts
        axes = {**self.kernel_kwargs(), "max_len": self.period or self.seq_len}
        return {**{k: v for k, v in axes.items() if k in accepted}, **dict(self.options)}

    def kernel_kwargs(self) -> dict:
        """The keyword arguments of `toroidal_attention` for this row."""
        return dict(
            depth=self.depth,
            lambda_distance=self.lambda_distance,
            period=self.period,
            causal=self.causal,
            window=self.window,
            backend=self.backend,
        )

    def problem(self) -> str | None:
        """Why this shape cannot exist (a row to skip), or None."""
        if self.d_model % self.heads:
            return f"d_model {self.d_model} is not divisible by heads {self.heads}"
        if self.head_dim % self.depth:
            return f"depth {self.depth} does not divide the head dim {self.head_dim}"
        return None

    def key(self) -> dict:
        """The row's identifying fields (`toroidal.bench.rows.KEY_FIELDS`)."""
        return {
            "mechanism": self.mechanism,
            "options": self.options_label,
            "backend": self.backend,
            "ring_world_size": self.ring_world_size,
            "device": self.device,
            "dtype": self.dtype,
            "mode": self.mode,
            "causal": self.causal,
            "window": self.window,
            "lambda": self.lambda_distance,
            "period": self.period,
            "batch": self.batch,
            "heads": self.heads,
            "d_model": self.d_model,
            "head_dim": self.head_dim if not self.d_model % self.heads else None,
            "depth": self.depth,
            "seq_len": self.seq_len,
        }


def sweep_options(mechanism: str) -> tuple[str, ...]:
    """The options of `mechanism` a sweep may vary. The toroidal rows time the bare kernel
    `toroidal_attention` (no fusion), whose every knob is an axis: none."""
    if mechanism == "toroidal":
        return ()
    return tuple(name for name in get_mechanism(mechanism).accepts if name not in AXIS_OPTIONS)


@dataclass
class BenchSweep:
    """Axes of a benchmark sweep (lists) and how to measure. Give `d_model` or `head_dim`, not both."""

    backend: list[str] = field(default_factory=lambda: ["auto"])
    seq_len: list[int] = field(default_factory=lambda: [1024])
    depth: list[int] = field(default_factory=lambda: [4])
    batch: list[int] = field(default_factory=lambda: [1])
    heads: list[int] = field(default_factory=lambda: [8])
    d_model: list[int] | None = None
    head_dim: list[int] | None = None
    dtype: list[str] = field(default_factory=lambda: ["fp32"])
    mode: list[str] = field(default_factory=lambda: ["fwd"])
    causal: list[bool] = field(default_factory=lambda: [True])
    window: list[int | None] = field(default_factory=lambda: [None])
    lambda_distance: list[float] = field(default_factory=lambda: [0.1])
    period: list[int | None] = field(default_factory=lambda: [None])
    mechanism: list[str] = field(default_factory=lambda: ["toroidal"])
    options: dict[str, list] = field(default_factory=dict)  # mechanism option -> values to sweep
    device: str = "cpu"
    warmup: int = 3  # one warm-up left the first row of a sweep up to 37% slow on CPU
    repeats: int = 5  # the fewest timed runs per row
    threads: int | None = None
    memory_budget_gb: float | None = None  # skip rows whose materialized scores would exceed it
    isolate: bool | None = None  # CPU rows in forked workers; None: wherever it is possible
    paired: bool = True  # baselines timed with each row, alternating (see toroidal.bench.sweep)
    baselines: bool = True  # False: no SDPA baselines, no ratios (scaling runs where SDPA is too slow)
    ring_world_size: list[int] = field(default_factory=list)  # extra `ring` rows on W processes each
    # Seconds of timed runs per row: after `repeats` runs, repeat until the spread (IQR / median) of
    # the row's and its paired baselines' runs is below `noisy`, at most this long (0: `repeats` runs).
    max_time: float = 3.0
    noisy: float = NOISY  # a row whose spread stays above it is marked noisy

    def __post_init__(self) -> None:
        if self.d_model is not None and self.head_dim is not None:
            raise ValueError("give d_model or head_dim, not both")
        if self.d_model is None and self.head_dim is None:
            self.d_model = [512]
        known = {"auto", *backend_names()}
        for name in self.backend:
            if name not in known:
                raise ValueError(f"unknown backend {name!r}; choose from {', '.join(sorted(known))}")
        for name in self.dtype:
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
        for name in self.mode:
            if name not in MODES:
                raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
        for name in self.mechanism:
            get_mechanism(name)  # raises ValueError naming the registered ones
        axes = set(self.options) & AXIS_OPTIONS
        if axes:
            raise ValueError(
                f"option(s) {', '.join(sorted(axes))}: sweep axes, not mechanism options; use their own flags"
            )
        unused = set(self.options) - {option for name in self.mechanism for option in sweep_options(name)}
        if unused:
            raise ValueError(
                f"option(s) {', '.join(sorted(unused))} are not accepted by "
                f"mechanism(s) {', '.join(self.mechanism)}"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if not 0 <= self.max_time < float("inf") or not 0 < self.noisy < float("inf"):
            raise ValueError(f"max_time must be >= 0 and noisy > 0, got {self.max_time:g} and {self.noisy:g}")
        if any(world < 1 for world in self.ring_world_size):
            raise ValueError(f"ring world sizes must be >= 1, got {self.ring_world_size}")

    def _variants(self) -> list[tuple[str, str, tuple]]:
        """(mechanism, backend, options) triples: backends only for mechanisms that take one,
        and the cartesian product of only the options each mechanism accepts."""
        variants = []
        for mechanism in self.mechanism:
            accepted = get_mechanism(mechanism).accepts
            backends = self.backend if mechanism == "toroidal" or "backend" in accepted else ["-"]
            names = sorted(name for name in self.options if name in sweep_options(mechanism))
            for values in itertools.product(*(self.options[name] for name in names)):
                options = tuple(zip(names, values, strict=True))
                variants += [(mechanism, backend, options) for backend in backends]
        return variants

    def cases(self) -> list[BenchCase]:
        """Every combination, backends innermost so that rows of one shape sit together."""
        widths = (
            [("d_model", v) for v in self.d_model]
            if self.d_model
            else [("head_dim", v) for v in self.head_dim]
        )
        grid = itertools.product(
            self.dtype,
            self.mode,
            self.causal,
            self.window,
            self.lambda_distance,
            self.period,
            self.batch,
            self.heads,
            widths,
            self.depth,
            self.seq_len,
            self._variants(),
        )
        cases = []
        for dtype, mode, causal, window, lam, period, batch, heads, (kind, size), depth, n, variant in grid:
            mechanism, backend, options = variant
            d_model = size if kind == "d_model" else size * heads
            cases.append(
                BenchCase(
                    backend,
                    n,
                    depth,
                    batch,
                    heads,
                    d_model,
                    dtype,
                    mode,
                    causal,
                    window,
                    lam,
                    period,
                    self.device,
                    mechanism,
                    options,
                )
            )
        return self._with_ring_rows(cases)

    def _with_ring_rows(self, cases: list[BenchCase]) -> list[BenchCase]:
        """After each shape's rows, one toroidal `ring` row per world size (rows of a shape are adjacent)."""
        if not self.ring_world_size or "toroidal" not in self.mechanism:
            return cases
        per_shape, out = len(self._variants()), []
        for start in range(0, len(cases), per_shape):
            shape = cases[start : start + per_shape]
            out += shape
            if shape[0].mode in ("fwd", "fwd+bwd"):  # ring rows time a training or inference step
                ring = replace(shape[0], backend="ring", mechanism="toroidal", options=())
                out += [replace(ring, ring_world_size=world) for world in self.ring_world_size]
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lambda"] = data.pop("lambda_distance")
        return data


# --- which backend runs, what it would materialize, what it computes ------------------------------


def case_backend(case: BenchCase) -> str:
    """The backend a case runs (auto resolved), from stride-0 stand-ins: nothing is allocated or computed.

    A mechanism that takes no backend runs itself: its name is returned.
    """
    if case.mechanism != "toroidal" and "backend" not in get_mechanism(case.mechanism).accepts:
        return case.mechanism
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    return backend_for_shape(
        shape, device=case.device, dtype=DTYPES[case.dtype], training=case.training, **case.kernel_kwargs()
    )


def case_shape(case: BenchCase) -> memory.AttentionShape:
    return memory.AttentionShape(
        case.batch, case.heads, case.seq_len, case.depth, case.head_dim, case.dtype, case.training
    )


def materialized_bytes(backend: str, case: BenchCase) -> int:
    """Rough peak bytes of the (L x L) tensors a backend materializes; 0 for the tiled kernels.

    reference: about four (B, H, L, L) float32 tensors live at once (scores, masked
    scores, exp, weights; more kept for backward), plus the (L, L) bias. sdpa: the cached
    (L, L) additive mask plus the int64 index grids and float32 bias it is built from.
    """
    return memory.materialized_bytes(backend, case_shape(case))


def case_estimate(chosen: str, case: BenchCase) -> memory.Estimate | None:
    """Estimated peak memory of a toroidal kernel row (None for other mechanisms, ring and stream rows)."""
    if case.mechanism != "toroidal" or case.ring_world_size is not None or case.mode == "stream":
        return None
    return memory.attention_call(chosen, case_shape(case))


def attention_flops(case: BenchCase) -> float:
    """Effective FLOPs of one call, FlashAttention's convention on the platter-token problem.

    Forward: QK^T and PV are two (L x L x w) matmuls of 2 FLOPs per multiply-add,
    4*B*H*L*L*w, halved when causal (the masked half is not work). fwd+bwd counts 3.5x
    the forward (backward = 2.5x forward). A window or the bias is not discounted, so a
    windowed kernel that skips tiles shows a higher effective rate.
    """
    flops = 4.0 * case.batch * case.heads * case.platter_tokens**2 * case.width
    if case.causal:
        flops /= 2
    return flops * (BACKWARD_FLOP_FACTOR if case.training else 1.0)


@dataclass(frozen=True)
class SdpaCall:
    """A plain scaled_dot_product_attention baseline: (B, H, tokens, width), no mask but is_causal."""

    batch: int
    heads: int
    tokens: int
    width: int
    dtype: str
    mode: str
    causal: bool


def baseline_calls(case: BenchCase) -> dict[str, SdpaCall]:
    """The two plain-SDPA baselines of a row: on the L platter-tokens of width w, on the N tokens."""
    return {
        "sdpa_torus": SdpaCall(
            case.batch, case.heads, case.platter_tokens, case.width, case.dtype, case.mode, case.causal
        ),
        "sdpa_standard": SdpaCall(
            case.batch, case.heads, case.seq_len, case.head_dim, case.dtype, case.mode, case.causal
        ),
    }

"""`ToroidalConfig`: every knob of toroidal attention, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from toroidal.kernels import backend_names

ROPE_MODES = ("standard", "orthogonal", "periodic", "none")
FUSION_MODES = ("low_rank", "attention", "mean", "concat")
APPROXIMATIONS = ("fft",)  # see toroidal.fft

# The option names of the torus, written once. TORUS_OPTIONS are the `ToroidalConfig` fields a
# kernel module takes: shapes and causality come with each call, rotary encoding and dropout
# belong to the layer around the kernel.
TORUS_OPTIONS = (
    "depth", "lambda_distance", "period", "window", "fusion", "fusion_rank", "backend", "max_len",
)  # fmt: skip
FUSION_OPTIONS = ("fusion", "fusion_rank")  # depth fusion (its weights depend on them and on depth)
# The attention's own options, depth fusion aside: what sweeps vary as axes of their own.
ATTENTION_OPTIONS = tuple(name for name in TORUS_OPTIONS if name not in FUSION_OPTIONS)
# The torus options a run takes as flags: max_len is its sequence length.
TORUS_FLAGS = tuple(name for name in TORUS_OPTIONS if name != "max_len")


def period_for(n_keys: int, *, period: int | None, max_len: int, causal: bool) -> int:
    """THE ring period rule: `period` if set, else `max_len` for causal attention (so training,
    prefill and decoding compute the same function), else the key length `n_keys`."""
    if period is not None:
        return period
    return max_len if causal else n_keys


def _fail(field: str, value, constraint: str) -> None:
    raise ValueError(f"ToroidalConfig.{field}={value!r}: {constraint}")


@dataclass
class ToroidalConfig:
    """Configuration of one toroidal attention layer.

    `period=None` means: the key length for bidirectional attention, `max_len` for
    causal attention (so training, prefill and decoding compute the same function).
    `window=None` means no circular window.
    """

    d_model: int = 512
    n_heads: int = 8
    depth: int = 4
    lambda_distance: float = 0.1
    period: int | None = None
    causal: bool = False
    window: int | None = None
    rope: str = "standard"
    rope_base: float = 10000.0
    fusion: str = "low_rank"
    fusion_rank: int | None = None
    backend: str = "auto"
    max_len: int = 2048
    dropout: float = 0.0
    bias: bool = True
    approximation: str | None = None  # "fft": O(N log N) content-free circulant mixing (toroidal.fft)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "depth", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "must be a positive integer")
        if self.d_model % self.n_heads:
            _fail("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if self.head_dim % self.depth:
            _fail("depth", self.depth, f"must divide the head dimension {self.head_dim} (d_model / n_heads)")
        if self.rope not in ROPE_MODES:
            _fail("rope", self.rope, f"must be one of {', '.join(ROPE_MODES)}")
        if self.rope != "none" and self.platter_width % 2:
            _fail(
                "rope",
                self.rope,
                f"needs an even platter width, got head_dim/depth = {self.platter_width}; "
                "change depth or use rope='none'",
            )
        if not self.lambda_distance >= 0:
            _fail("lambda_distance", self.lambda_distance, "must be >= 0")
        if self.period is not None and (
            isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1
        ):
            _fail("period", self.period, "must be None or an integer >= 1")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0
        ):
            _fail("window", self.window, "must be None or an integer >= 0")
        if self.fusion not in FUSION_MODES:
            _fail("fusion", self.fusion, f"must be one of {', '.join(FUSION_MODES)}")
        if self.fusion_rank is not None and (
            isinstance(self.fusion_rank, bool)
            or not isinstance(self.fusion_rank, int)
            or self.fusion_rank < 1
        ):
            _fail("fusion_rank", self.fusion_rank, "must be None or an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be in [0, 1)")
        if not self.rope_base > 1.0:
            _fail("rope_base", self.rope_base, "must be > 1")
        if self.approximation is not None and self.approximation not in APPROXIMATIONS:
            _fail("approximation", self.approximation, f"must be None or one of {', '.join(APPROXIMATIONS)}")
        if self.backend != "auto" and self.backend not in backend_names():
            _fail("backend", self.backend, f"must be 'auto' or one of {', '.join(backend_names())}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def platter_width(self) -> int:
        return self.head_dim // self.depth

    @property
    def resolved_fusion_rank(self) -> int:
        return self.fusion_rank if self.fusion_rank is not None else max(1, self.depth // 4)

    def period_for(self, n_keys: int, causal: bool | None = None) -> int:
        """The ring period P for `n_keys` keys (`period_for` above); `causal` None: this config's flag.

        A kernel in a host model passes the call's causal flag: the host decides causality.
        """
        causal = self.causal if causal is None else causal
        return period_for(n_keys, period=self.period, max_len=self.max_len, causal=causal)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ToroidalConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ToroidalConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

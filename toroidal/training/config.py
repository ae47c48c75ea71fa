"""`TrainConfig`: every option of a training run (the `toroidal train` flags, in snake_case)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from toroidal.config import TORUS_FLAGS
from toroidal.mechanisms.adaptive import adaptive_run
from toroidal.training.data import DataOptions, parse_dataset_spec
from toroidal.training.errors import SetupError
from toroidal.training.mechanism import (
    attention_label,
    check_mechanism_options,
    kernel_options,
    resolve_mechanism,
)
from toroidal.training.models import POSITIONS
from toroidal.training.tokenization import parse_tokenizer_spec

PRECISIONS = ("fp32", "bf16", "fp16")
LOGGERS = ("csv", "tensorboard", "wandb")
DEFAULT_STEPS = 200
# Options that may change when resuming: they do not change what is computed.
RESUMABLE_CHANGES = ("save_every", "log", "device")


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"
    position: str = "rope"  # a preset's position encoding: rope (its own) or none (no rotary: NoPE)
    attention: str | None = None  # the old name of `mechanism`: toroidal or baseline (= standard)
    mechanism: str | None = None  # a registered mechanism; None: from `attention`, else toroidal
    mechanism_options: dict = field(default_factory=dict)  # options of a mechanism other than toroidal
    adaptive_depth: bool = False  # the `adaptive` mechanism (toroidal.mechanisms.adaptive): a learned depth
    min_depth: int | None = None  # its fewest platters (None: 1); sets its min_depth option
    depth: int = 2
    lambda_distance: float = 0.1
    period: int | None = None  # None: the ring is the training context (P = seq_len)
    window: int | None = None
    fusion: str = "low_rank"
    fusion_rank: int | None = None
    backend: str = "auto"
    layers: list[int] | None = None  # None: every layer
    freeze_base: bool = False
    grad_checkpointing: bool = False
    # data
    dataset: str = "periodic"
    data_period: int = 8
    data_vocab: int = 16
    passkey_digits: int = 5
    tokenizer: str = "auto"  # bytes for presets, the model's own for local and hub models
    seq_len: int = 128
    batch_size: int = 8
    # optimization
    steps: int | None = None  # None with tokens None: DEFAULT_STEPS
    tokens: int | None = None  # a token budget instead of steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_accum: int = 1
    clip: float = 1.0  # 0: no clipping
    precision: str = "fp32"
    seed: int = 0
    # evaluation, checkpoints, logging
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: no intermediate checkpoints (nothing to resume from)
    log: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.adaptive_depth:
            try:
                self.mechanism, self.mechanism_options = adaptive_run(
                    self.mechanism, self.mechanism_options, self.min_depth
                )
            except ValueError as error:
                fix = "set the mechanism and min_depth once (--adaptive-depth means --mechanism adaptive)"
                raise SetupError(f"--adaptive-depth: {error}", fix) from None
        self.mechanism = resolve_mechanism(self.attention, self.mechanism)
        self.attention = attention_label(self.mechanism)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, option: str, value, rule: str) -> None:
            if not ok:
                raise SetupError(f"--{option.replace('_', '-')} {value}: {rule}")

        parse_dataset_spec(self.dataset)
        parse_tokenizer_spec(self.tokenizer)
        need(
            isinstance(self.mechanism_options, dict),
            "mechanism_options",
            self.mechanism_options,
            "must be a mapping of option names to values",
        )
        check_mechanism_options(self.mechanism, self.mechanism_options)
        need(
            self.precision in PRECISIONS,
            "precision",
            self.precision,
            f"must be one of {', '.join(PRECISIONS)}",
        )
        need(self.log is None or self.log in LOGGERS, "log", self.log, f"must be one of {', '.join(LOGGERS)}")
        need(self.position in POSITIONS, "position", self.position, f"must be one of {', '.join(POSITIONS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "data_period", "data_vocab"):
            need(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        need(self.passkey_digits >= 1, "passkey_digits", self.passkey_digits, "must be >= 1")
        adaptive = self.min_depth is None or self.adaptive_depth
        need(adaptive, "min_depth", self.min_depth, "needs --adaptive-depth")
        for name in ("warmup_steps", "eval_every", "save_every"):
            need(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        need(
            self.steps is None or self.tokens is None,
            "tokens",
            self.tokens,
            "give --steps or --tokens, not both",
        )
        need(self.steps is None or self.steps >= 1, "steps", self.steps, "must be >= 1")
        need(self.tokens is None or self.tokens >= 1, "tokens", self.tokens, "must be >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be a positive number")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        need(self.clip >= 0, "clip", self.clip, "must be >= 0 (0: no clipping)")
        if self.layers is not None:
            need(len(self.layers) > 0, "layers", self.layers, "must name at least one layer")
            need(
                all(layer >= 0 for layer in self.layers), "layers", self.layers, "must be layer indices >= 0"
            )

    def total_steps(self, world_size: int = 1) -> int:
        """Optimizer steps: --steps, or enough steps to train on --tokens tokens."""
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step(world_size)))
        return self.steps if self.steps is not None else DEFAULT_STEPS

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world_size

    def data_options(self) -> DataOptions:
        return DataOptions(
            seq_len=self.seq_len,
            data_period=self.data_period,
            data_vocab=self.data_vocab,
            passkey_digits=self.passkey_digits,
            seed=self.seed,
        )

    def toroidal_options(self) -> dict:
        return {key: getattr(self, key) for key in TORUS_FLAGS}

    def kernel_options(self) -> dict:
        """The options of a mechanism other than toroidal (see `toroidal.training.mechanism`)."""
        return kernel_options(self.mechanism, self.toroidal_options(), self.mechanism_options, self.seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SetupError(f"unknown training option(s) {', '.join(unknown)}")
        return cls(**data)

    def resume_conflicts(self, saved: TrainConfig) -> list[str]:
        """Options that differ from the run being resumed and would change its result."""
        mine, theirs = self.to_dict(), saved.to_dict()
        return [key for key in mine if key not in RESUMABLE_CHANGES and mine[key] != theirs[key]]

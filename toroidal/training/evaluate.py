"""Evaluating a trained run (`checkpoint`) or a model (preset, folder, hub name) on a dataset.

    result = evaluate(EvalConfig(checkpoint="runs/demo", dataset="text:test.txt"))
    result.metrics  # loss, perplexity, bits_per_token, bits_per_byte, tokens_per_s, peak_memory_mb, ...

The evaluation set: the `test` stream of synthetic datasets (never seen in training), the
whole file for text:PATH, the test (else validation) split of a hub dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from toroidal.training.data import DataOptions, load_eval_text, make_dataset, parse_dataset_spec
from toroidal.training.distributed import DistInfo
from toroidal.training.errors import SetupError
from toroidal.training.loop import resolve_device
from toroidal.training.metrics import Precision, evaluate_lm, peak_memory_mb
from toroidal.training.models import (
    add_toroidal,
    build_model,
    check_layers,
    make_toroidal_config,
    max_positions,
    source_and_tokenizer,
)
from toroidal.training.runs import load_run, read_train_config

# Options a checkpoint's own training run supplies unless given.
RUN_DEFAULTS = ("dataset", "data_period", "data_vocab", "passkey_digits", "seq_len", "batch_size", "seed")


@dataclass
class EvalConfig:
    checkpoint: str | None = None  # a `toroidal train` output folder
    model: str | None = None  # otherwise: a preset, model folder or hub name
    attention: str = "baseline"
    depth: int = 2
    lambda_distance: float = 0.1
    period: int | None = None
    window: int | None = None
    fusion: str = "low_rank"
    fusion_rank: int | None = None
    backend: str = "auto"
    layers: list[int] | None = None
    dataset: str = "periodic"
    data_period: int = 8
    data_vocab: int = 16
    passkey_digits: int = 5
    tokenizer: str = "auto"
    seq_len: int = 128
    batch_size: int = 8
    max_batches: int | None = None  # None: all of a text set, 16 batches of synthetic data
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise SetupError("give either a checkpoint or a model", "use --checkpoint DIR or --model NAME")
        if self.attention not in ("toroidal", "baseline"):
            raise SetupError(f"--attention {self.attention}: must be toroidal or baseline")
        parse_dataset_spec(self.dataset)
        for name in ("seq_len", "batch_size", "data_period", "data_vocab", "passkey_digits"):
            if getattr(self, name) < 1:
                raise SetupError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.max_batches is not None and self.max_batches < 1:
            raise SetupError(f"--max-batches {self.max_batches}: must be >= 1")

    def data_options(self) -> DataOptions:
        return DataOptions(self.seq_len, self.data_period, self.data_vocab, self.passkey_digits, self.seed)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class EvalResult:
    config: dict  # the resolved configuration (for the result record)
    metrics: dict
    device: torch.device


def run_defaults(checkpoint: str) -> dict:
    """The data options of the run in `checkpoint`, the defaults for evaluating it."""
    config, _ = read_train_config(checkpoint)
    return {key: getattr(config, key) for key in RUN_DEFAULTS}


def _model_and_tokenizer(config: EvalConfig):
    """(model, tokenizer, attention, toroidal config or None, toroidal layers)."""
    if config.checkpoint is not None:
        run = load_run(config.checkpoint)
        return run.model, run.tokenizer, run.config.attention, run.toroidal, run.layers or []
    source, tokenizer = source_and_tokenizer(config.model, config.tokenizer)
    model = build_model(source, tokenizer, config.seq_len, config.seed)
    layers = check_layers(model, config.layers)
    toroidal = None
    if config.attention == "toroidal":
        options = {key: getattr(config, key) for key in ("depth", "lambda_distance", "period", "window")}
        options.update(fusion=config.fusion, fusion_rank=config.fusion_rank, backend=config.backend)
        toroidal = make_toroidal_config(options, config.seq_len)
        layers = add_toroidal(model, toroidal, layers)
    return model.eval(), tokenizer, config.attention, toroidal, layers if toroidal is not None else []


def evaluate(config: EvalConfig, progress=None) -> EvalResult:
    """Measure the model of `config` on its dataset. `progress(done, total)` after each batch."""
    device = resolve_device(config.device, DistInfo())
    if config.precision != "fp32" and device.type != "cuda":
        raise SetupError(f"--precision {config.precision} needs a CUDA device", "use --precision fp32 on CPU")
    spec = parse_dataset_spec(config.dataset)
    text = load_eval_text(spec) if spec.is_text else None  # before the model: fail fast on a bad path
    model, tokenizer, attention, toroidal, layers = _model_and_tokenizer(config)
    limit = max_positions(model.config)
    if limit is not None and config.seq_len > limit:
        raise SetupError(f"the model has {limit} positions, fewer than --seq-len {config.seq_len}")
    dataset = make_dataset(spec, config.data_options(), "test", tokenizer, text)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    metrics = evaluate_lm(
        model,
        dataset,
        batch_size=config.batch_size,
        max_batches=config.max_batches,
        device=device,
        precision=Precision(config.precision),
        progress=progress,
    )
    metrics["peak_memory_mb"], metrics["memory_kind"] = peak_memory_mb(device)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    resolved = {
        **asdict(config),
        "attention": attention,
        "toroidal": toroidal.to_dict() if toroidal is not None else None,
        "toroidal_layers": layers,
        "tokenizer": tokenizer.kind,
        "device": str(device),
    }
    return EvalResult(resolved, metrics, device)

"""Evaluating a trained run (`checkpoint`) or a model (preset, folder, hub name) on a dataset.

    result = evaluate(EvalConfig(checkpoint="runs/demo", dataset="text:test.txt"))
    result.metrics  # loss, perplexity, bits_per_token, bits_per_byte, tokens_per_s, peak_memory_mb, ...

The evaluation set (`split`, default heldout): the `test` stream of synthetic datasets (never
seen in training), the text `train` held out for text:PATH and code:DIR, the test (else
validation) split of a hub dataset; `split="all"` scores all of a text. `max_tokens` scores the
first ceil(max_tokens / seq_len) samples at any batch size. `result.scored` says what was scored:
dataset, split, seq_len, samples, tokens and a fingerprint of the token ids (`TokenFingerprint`).
With `streaming=True` the metrics also hold `streaming_<metric>`: the same samples scored token
by token on constant-size states (`toroidal.training.streaming_eval`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from toroidal.config import TORUS_FLAGS
from toroidal.training.data import (
    DataOptions,
    check_eval_split,
    eval_text,
    make_dataset,
    parse_dataset_spec,
    synthetic_eval_split,
)
from toroidal.training.distributed import DistInfo
from toroidal.training.errors import SetupError
from toroidal.training.loop import resolve_device
from toroidal.training.mechanism import (
    add_mechanism,
    attention_label,
    check_mechanism_options,
    kernel_options,
    mechanism_record,
    reset_mechanism_metrics,
    resolve_mechanism,
)
from toroidal.training.metrics import Precision, TokenFingerprint, evaluate_lm, peak_memory_mb, sample_count
from toroidal.training.models import (
    add_toroidal,
    build_model,
    check_layers,
    make_toroidal_config,
    max_positions,
    source_and_tokenizer,
)
from toroidal.training.runs import load_run, read_train_config
from toroidal.training.streaming_eval import (
    check_streaming_model,
    check_streaming_options,
    streaming_metrics,
)

# Options a checkpoint's own training run supplies unless given.
RUN_DEFAULTS = ("dataset", "data_period", "data_vocab", "passkey_digits", "seq_len", "batch_size", "seed")


@dataclass
class EvalConfig:
    checkpoint: str | None = None  # a `toroidal train` output folder
    model: str | None = None  # otherwise: a preset, model folder or hub name
    position: str = "rope"  # with a preset: rope (its own encoding) or none (no rotary); a checkpoint's own
    attention: str | None = None  # the old name of `mechanism`: toroidal or baseline (= standard)
    mechanism: str | None = None  # with model: a registered mechanism; None: from attention, else standard
    mechanism_options: dict = field(default_factory=dict)  # options of a mechanism other than toroidal
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
    max_tokens: int | None = None  # instead: the first ceil(max_tokens / seq_len) samples, any batch size
    split: str = "heldout"  # heldout (not trained on), all (a text's whole), train
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    streaming: bool = False  # also score token by token on LatentKV states (toroidal.training.streaming_eval)
    latent_size: int = 64
    update: str = "linear"

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise SetupError("give either a checkpoint or a model", "use --checkpoint DIR or --model NAME")
        self.mechanism = resolve_mechanism(self.attention, self.mechanism, default="standard")
        self.attention = attention_label(self.mechanism)
        check_mechanism_options(self.mechanism, self.mechanism_options)
        check_eval_split(parse_dataset_spec(self.dataset), self.split)
        for name in ("seq_len", "batch_size", "data_period", "data_vocab", "passkey_digits"):
            if getattr(self, name) < 1:
                raise SetupError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.max_batches is not None and self.max_batches < 1:
            raise SetupError(f"--max-batches {self.max_batches}: must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SetupError(f"--max-tokens {self.max_tokens}: must be >= 1")
        if self.max_tokens is not None and self.max_batches is not None:
            raise SetupError(
                "--max-tokens and --max-batches both given",
                "use --max-tokens (the same text at any batch size) or --max-batches, not both",
            )
        if self.streaming:
            check_streaming_options(self.latent_size, self.update)

    def data_options(self) -> DataOptions:
        return DataOptions(self.seq_len, self.data_period, self.data_vocab, self.passkey_digits, self.seed)

    def max_samples(self) -> int | None:
        """The samples a token budget scores (None: no budget)."""
        return None if self.max_tokens is None else math.ceil(self.max_tokens / self.seq_len)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class EvalResult:
    config: dict  # the resolved configuration (for the result record)
    metrics: dict
    device: torch.device
    mechanism: dict | None = None  # name, options, layers and kernel metrics (mechanism_record)
    scored: dict | None = None  # dataset, split, seq_len, samples, tokens, fingerprint


def run_defaults(checkpoint: str) -> dict:
    """The data options of the run in `checkpoint`, the defaults for evaluating it."""
    config, _ = read_train_config(checkpoint)
    return {key: getattr(config, key) for key in RUN_DEFAULTS}


def _model_and_tokenizer(config: EvalConfig):
    """(model, tokenizer, mechanism, toroidal config or None, mechanism layers, other kernel options)."""
    if config.checkpoint is not None:
        run = load_run(config.checkpoint)
        return run.model, run.tokenizer, run.mechanism, run.toroidal, run.layers or [], run.mechanism_options
    source, tokenizer = source_and_tokenizer(config.model, config.tokenizer)
    model = build_model(source, tokenizer, config.seq_len, config.seed, config.position)
    layers = check_layers(model, config.layers)
    toroidal = kernel = None
    options = {key: getattr(config, key) for key in TORUS_FLAGS}
    if config.mechanism == "toroidal":
        toroidal = make_toroidal_config(options, config.seq_len)
        layers = add_toroidal(model, toroidal, layers)
    elif config.mechanism != "standard":
        kernel = kernel_options(config.mechanism, options, config.mechanism_options, config.seq_len)
        layers = add_mechanism(model, config.mechanism, kernel, layers)
    layers = layers if config.mechanism != "standard" else []
    return model.eval(), tokenizer, config.mechanism, toroidal, layers, kernel


def evaluate(config: EvalConfig, progress=None, before_scoring=None) -> EvalResult:
    """Measure the model of `config` on its dataset. `progress(done, total)` after each batch;
    `before_scoring(scored)` once the samples are known, with `scored` but no fingerprint yet
    (it may raise to stop before the work)."""
    device = resolve_device(config.device, DistInfo())
    if config.precision != "fp32" and device.type != "cuda":
        raise SetupError(f"--precision {config.precision} needs a CUDA device", "use --precision fp32 on CPU")
    spec = parse_dataset_spec(config.dataset)
    if spec.is_text:  # before the model: fail fast on a bad path
        text, split = eval_text(spec, config.split)
    else:
        text, split = None, synthetic_eval_split(config.split)
    model, tokenizer, mechanism, toroidal, layers, kernel = _model_and_tokenizer(config)
    if config.streaming:
        check_streaming_model(model)  # before the work, not after it
    limit = max_positions(model.config)
    if limit is not None and config.seq_len > limit:
        raise SetupError(f"the model has {limit} positions, fewer than --seq-len {config.seq_len}")
    dataset = make_dataset(spec, config.data_options(), split, tokenizer, text)
    samples = sample_count(dataset, config.batch_size, config.max_batches, config.max_samples())
    scored = {
        "dataset": str(spec),
        "split": split,
        "seq_len": config.seq_len,
        "samples": samples,
        "tokens": samples * config.seq_len,
        "fingerprint": None,
    }
    if before_scoring is not None:
        before_scoring(dict(scored))
    fingerprint = TokenFingerprint()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    reset_mechanism_metrics(model)
    metrics = evaluate_lm(
        model,
        dataset,
        batch_size=config.batch_size,
        max_batches=config.max_batches,
        max_samples=config.max_samples(),
        device=device,
        precision=Precision(config.precision),
        progress=progress,
        fingerprint=fingerprint,
    )
    scored.update(tokens=metrics["tokens"], fingerprint=fingerprint.hexdigest())
    options = toroidal.to_dict() if toroidal is not None else kernel
    mechanism_summary = mechanism_record(model, mechanism, options, layers)  # measured over evaluate_lm
    if config.streaming:
        streamed = streaming_metrics(
            model,
            dataset,
            latent_size=config.latent_size,
            update=config.update,
            seed=config.seed,
            progress=progress,
            batch_size=config.batch_size,
            max_batches=config.max_batches,
            max_samples=config.max_samples(),
            device=device,
            precision=Precision(config.precision),
        )
        metrics.update(streamed)
    metrics["peak_memory_mb"], metrics["memory_kind"] = peak_memory_mb(device)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    resolved = {
        **asdict(config),
        "attention": attention_label(mechanism),
        "mechanism": mechanism,
        "mechanism_kernel_options": kernel,
        "mechanism_layers": layers,
        "toroidal": toroidal.to_dict() if toroidal is not None else None,
        "toroidal_layers": layers if toroidal is not None else [],
        "tokenizer": tokenizer.kind,
        "device": str(device),
    }
    return EvalResult(resolved, metrics, device, mechanism_summary, scored)

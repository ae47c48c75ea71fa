"""Evaluating a trained run (`checkpoint`) or a model (preset, folder, hub name) on a dataset.

    result = evaluate(EvalConfig(checkpoint="runs/demo", dataset="text:test.txt"))
    result.metrics  # loss, perplexity, bits_per_token, bits_per_byte, tokens_per_s, peak_memory_mb, ...

The evaluation set (`split`, default heldout): the `test` stream of synthetic datasets (never
seen in training), the text `train` held out for text:PATH and code:DIR, the test (else
validation) split of a hub dataset; `split="all"` scores all of a text. `max_tokens` scores the
first ceil(max_tokens / seq_len) samples at any batch size. `result.scored` says what was scored:
dataset, split, seq_len, samples, tokens and a fingerprint of the token ids (`TokenFingerprint`).

Several window lengths (`lengths=[128, 256, 512]`, length extrapolation): one model, each length
scored as `seq_len` alone would score it, into `result.rows` (seq_len, metrics, scored, mechanism
metrics); `result.summary` holds the run's training length and the model's stated positions.
On a text, windows of every length tile the text from its first token, so with `max_tokens` N
each length scores the first N tokens as ceil(N / length) windows: the same tokens wherever every
length divides N; elsewhere the last window runs up to length - 1 tokens past N. A text too short
for the budget is scored in whole windows of each length (each row's tail shorter than a window is
left out). `summary["same_text"]` says whether every row scored the same tokens (None: synthetic
data, generated at each length). Lengths past the model's positions are scored wherever the
positions are computed (`length_refusal`).
With `streaming=True` the metrics also hold `streaming_<metric>`: the same samples scored token
by token on constant-size states (`toroidal.training.streaming_eval`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from toroidal.config import TORUS_FLAGS
from toroidal.integrations.transformers import length_refusal
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
from toroidal.training.metrics import (
    Precision,
    TokenFingerprint,
    evaluate_lm,
    peak_memory_mb,
    sample_count,
    token_losses,
)
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
    lengths: list[int] | None = None  # several window lengths, each scored as seq_len alone (module doc)
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
        if self.lengths is not None:
            self._check_lengths()

    def _check_lengths(self) -> None:
        """Several lengths: sorted, each >= 1 and given once; `seq_len` becomes the shortest (the
        ring length of a `model`'s mechanism). One length is `seq_len` alone."""
        lengths = list(self.lengths)
        bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if not lengths or bad:
            raise SetupError(f"--seq-len {bad[0] if bad else ''}: every length must be an integer >= 1")
        twice = sorted({n for n in lengths if lengths.count(n) > 1})
        if twice:
            raise SetupError(f"--seq-len {twice[0]} is given twice", "list each length once")
        if self.streaming and len(lengths) > 1:
            raise SetupError("--streaming scores one length", "give --seq-len one length with --streaming")
        self.lengths = sorted(lengths) if len(lengths) > 1 else None
        self.seq_len = min(lengths)

    def data_options(self, seq_len: int | None = None) -> DataOptions:
        seq_len = self.seq_len if seq_len is None else seq_len
        return DataOptions(seq_len, self.data_period, self.data_vocab, self.passkey_digits, self.seed)

    def max_samples(self, seq_len: int | None = None) -> int | None:
        """The samples a token budget scores at `seq_len` (default: this config's; None: no budget)."""
        seq_len = self.seq_len if seq_len is None else seq_len
        return None if self.max_tokens is None else math.ceil(self.max_tokens / seq_len)

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
    # Several lengths: metrics and scored are None; a row per length (seq_len, metrics, scored,
    # mechanism_metrics) and the summary (training_seq_len, model_positions, same_text).
    rows: list[dict] | None = None
    summary: dict | None = None


def run_defaults(checkpoint: str) -> dict:
    """The data options of the run in `checkpoint`, the defaults for evaluating it."""
    config, _ = read_train_config(checkpoint)
    return {key: getattr(config, key) for key in RUN_DEFAULTS}


def _model_and_tokenizer(config: EvalConfig):
    """(model, tokenizer, mechanism, toroidal config or None, mechanism layers, other kernel options,
    the run's training length or None)."""
    if config.checkpoint is not None:
        run = load_run(config.checkpoint)
        layers, trained = run.layers or [], run.config.seq_len
        return run.model, run.tokenizer, run.mechanism, run.toroidal, layers, run.mechanism_options, trained
    source, tokenizer = source_and_tokenizer(config.model, config.tokenizer)
    # No length check here: `length_refusal` decides per length (RoPE computes past the stated positions).
    model = build_model(source, tokenizer, None, config.seed, config.position)
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
    return model.eval(), tokenizer, config.mechanism, toroidal, layers, kernel, None


def _refuse_lengths(model, lengths: list[int], device: torch.device, precision: str) -> None:
    """A SetupError, before any scoring, naming the first length the model cannot score."""
    dtype = Precision(precision).dtype or torch.float32
    for length in lengths:
        reason = length_refusal(model, length, device.type, dtype)
        if reason is not None:
            fix = f"drop --seq-len {length} and longer" if len(lengths) > 1 else "use a shorter --seq-len"
            raise SetupError(f"cannot score --seq-len {length}: {reason}", fix)


def _datasets(spec, config: EvalConfig, split: str, tokenizer, text, lengths: list[int]) -> list:
    """A dataset per length; a text is tokenized once and cut into windows of each length."""
    first = make_dataset(spec, config.data_options(lengths[0]), split, tokenizer, text)
    if spec.is_text:
        return [first] + [first.at_seq_len(n) for n in lengths[1:]]
    return [first] + [make_dataset(spec, config.data_options(n), split, tokenizer, text) for n in lengths[1:]]


def evaluate(config: EvalConfig, progress=None, before_scoring=None) -> EvalResult:
    """Measure the model of `config` on its dataset, at each of `config.lengths` when given.
    `progress(done, total)` after each batch (samples, over all lengths); `before_scoring(scored)`
    once per length when the samples are known, before any is scored, with `scored` but no
    fingerprint yet (it may raise to stop before the work)."""
    device = resolve_device(config.device, DistInfo())
    if config.precision != "fp32" and device.type != "cuda":
        raise SetupError(f"--precision {config.precision} needs a CUDA device", "use --precision fp32 on CPU")
    spec = parse_dataset_spec(config.dataset)
    if spec.is_text:  # before the model: fail fast on a bad path
        text, split = eval_text(spec, config.split)
    else:
        text, split = None, synthetic_eval_split(config.split)
    model, tokenizer, mechanism, toroidal, layers, kernel, trained = _model_and_tokenizer(config)
    if config.streaming:
        check_streaming_model(model)  # before the work, not after it
    lengths = config.lengths or [config.seq_len]
    _refuse_lengths(model, lengths, device, config.precision)
    datasets = _datasets(spec, config, split, tokenizer, text, lengths)
    planned = []
    for length, dataset in zip(lengths, datasets, strict=True):
        samples = sample_count(dataset, config.batch_size, config.max_batches, config.max_samples(length))
        planned.append(
            {
                "dataset": str(spec),
                "split": split,
                "seq_len": length,
                "samples": samples,
                "tokens": samples * length,
                "fingerprint": None,
            }
        )
    if before_scoring is not None:
        for scored in planned:
            before_scoring(dict(scored))
    options = toroidal.to_dict() if toroidal is not None else kernel
    total, done_before, rows = sum(scored["samples"] for scored in planned), 0, []
    model.to(device)
    if config.lengths is not None:  # the first length's tokens/s without the first call's set-up costs
        with torch.no_grad():
            token_losses(model, datasets[0].batch([0]).to(device), Precision(config.precision), device)
    for scored, dataset in zip(planned, datasets, strict=True):
        offset = done_before
        step = None if progress is None else (lambda done, _, offset=offset: progress(offset + done, total))
        metrics = _score(model, dataset, config, scored, device, step)
        rows.append({"seq_len": scored["seq_len"], "metrics": metrics, "scored": scored})
        rows[-1]["mechanism"] = mechanism_record(model, mechanism, options, layers)  # measured over it
        rows[-1]["peak"] = peak_memory_mb(device)
        done_before += scored["samples"]
    if config.streaming:
        streamed = streaming_metrics(
            model,
            datasets[0],
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
        rows[0]["metrics"].update(streamed)
        rows[0]["peak"] = peak_memory_mb(device)
    for row in rows:
        row["metrics"]["peak_memory_mb"], row["metrics"]["memory_kind"] = row.pop("peak")
        row["metrics"]["parameters"] = sum(p.numel() for p in model.parameters())
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
    if config.lengths is None:  # one length: the result as it always was
        del resolved["lengths"]
        row = rows[0]
        return EvalResult(resolved, row["metrics"], device, row["mechanism"], row["scored"])
    for row in rows:  # the mechanism's name, options and layers once; its kernels' metrics per length
        row["mechanism_metrics"] = row.pop("mechanism")["metrics_mean"]
    record = mechanism_record(model, mechanism, options, layers)
    summary = {
        "training_seq_len": trained,
        "model_positions": max_positions(model.config),
        # text: windows of every length from its first token, so equal counts are the same tokens
        "same_text": len({row["scored"]["tokens"] for row in rows}) == 1 if spec.is_text else None,
    }
    shared = {key: record[key] for key in ("name", "options", "layers")}
    return EvalResult(resolved, None, device, shared, None, rows, summary)


def _score(model, dataset, config: EvalConfig, scored: dict, device: torch.device, progress) -> dict:
    """The metrics of one length (`scored` gets the tokens and fingerprint); the kernels' metrics are
    reset first, so that `mechanism_record` after it measures this length alone."""
    fingerprint = TokenFingerprint()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_mechanism_metrics(model)
    metrics = evaluate_lm(
        model,
        dataset,
        batch_size=config.batch_size,
        max_batches=config.max_batches,
        max_samples=config.max_samples(scored["seq_len"]),
        device=device,
        precision=Precision(config.precision),
        progress=progress,
        fingerprint=fingerprint,
    )
    scored.update(tokens=metrics["tokens"], fingerprint=fingerprint.hexdigest())
    return metrics

"""The training loop: AdamW, warmup + cosine, accumulation, clipping, mixed precision, DDP, resume.

    result = train(TrainConfig(dataset="periodic", steps=100), "runs/demo", progress=print)

Reproducibility. The samples of every step are a function of (seed, step) (see
`data.train_batch`), the learning rate a function of the step, and the torch RNG is
reseeded from (seed, rank, step) before every step. A checkpoint therefore needs only the
model, the optimizer (and the fp16 GradScaler): resuming from it computes exactly what the
uninterrupted run computes.

The library never prints: `progress(ProgressEvent)` is called on rank 0 at the start, after
every step, evaluation and checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toroidal.integrations.transformers import length_refusal
from toroidal.mechanisms.adaptive import adaptive_metrics, auxiliary_loss, reset_adaptive_metrics
from toroidal.runtime.devices import DeviceError, parse_device
from toroidal.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from toroidal.training.config import TrainConfig
from toroidal.training.data import (
    load_train_texts,
    make_dataset,
    parse_dataset_spec,
    passkey_corpus,
    train_batch,
)
from toroidal.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.frozen import FrozenBase, base_identity, save_tensors
from toroidal.training.loggers import check_logger, open_logger
from toroidal.training.mechanism import add_mechanism, mechanism_record, reset_mechanism_metrics
from toroidal.training.metrics import Precision, evaluate_lm, token_losses
from toroidal.training.models import (
    add_toroidal,
    build_model,
    check_layers,
    freeze_base,
    make_toroidal_config,
    resolve_model,
    source_tokenizer,
)
from toroidal.training.runs import (
    MODEL_DIR,
    RESCUED,
    TOKENIZER_DIR,
    TRAIN_CONFIG,
    check_savable,
    holds_run,
    read_train_config,
    save_mechanism,
    save_model,
    save_tokenizer,
    save_toroidal,
    write_json,
)
from toroidal.training.tokenization import (
    BpeTokenizer,
    ByteTokenizer,
    load_tokenizer,
    parse_tokenizer_spec,
)

VALIDATION_KEYS = ("loss", "perplexity", "bits_per_token", "bits_per_byte", "passkey_accuracy")


@dataclass(frozen=True)
class ProgressEvent:
    kind: str  # start | step | eval | checkpoint | done
    step: int  # optimizer steps done
    total_steps: int
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    config: dict  # the resolved configuration (for the result record)
    payload: dict  # the measured payload of metrics.json
    run_dir: Path
    is_main: bool  # rank 0: the process that writes files and renders
    device: torch.device
    stopped: bool = False  # `should_stop` ended the run early: its last checkpoint is where to resume


# --- pieces -----------------------------------------------------------------------------------------


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63 - 1)


def resolve_device(spec: str, dist: DistInfo) -> torch.device:
    """'auto' (CUDA if there is one), 'cpu', 'cuda' or 'cuda:N'; one GPU per process under torchrun."""
    try:
        device = parse_device(spec, allow_auto=True)
    except DeviceError as error:
        raise SetupError(error.message, error.fix) from None
    if device.type == "cuda" and (dist.active or device.index is None):
        device = torch.device("cuda", dist.local_rank if dist.active else torch.cuda.current_device())
    return device


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _make_tokenizer(
    kind: str, vocab: int | None, source, texts, config: TrainConfig, run_dir: Path, dist: DistInfo
):
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "model":
        if source.kind == "preset":
            raise SetupError(
                f"--tokenizer model needs a local or hub model, not preset {source.name!r}",
                "use --tokenizer bytes or bpe:VOCAB",
            )
        return source_tokenizer(source)
    # bpe: rank 0 trains it on the training text and saves it with the run; the others read it back.
    if dist.is_main:
        if texts is not None:
            lines = texts["train"].splitlines(keepends=True)
        elif config.dataset == "passkey":
            lines = passkey_corpus(config.data_options())
        else:
            raise SetupError(
                f"--tokenizer bpe:{vocab} needs text data, not --dataset {config.dataset}",
                "use --tokenizer bytes",
            )
        tokenizer = BpeTokenizer.train(lines, vocab)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, run_dir)
    barrier(dist)
    return tokenizer if dist.is_main else load_tokenizer(run_dir / TOKENIZER_DIR)


def _check_folder(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    if not resume:
        if holds_run(run_dir):
            raise SetupError(
                f"{run_dir} already holds a training run",
                "pass --resume to continue it, or choose another --out",
            )
        if run_dir.is_dir() and any(run_dir.iterdir()):  # the run's files would overwrite the user's
            raise SetupError(f"{run_dir} is not empty", "give --out a new or empty folder for the run")
        return
    if not (run_dir / TRAIN_CONFIG).is_file():
        raise SetupError(f"nothing to resume: {run_dir} holds no training run", "run without --resume")
    if latest_checkpoint(run_dir) is None and (run_dir / MODEL_DIR).exists():
        # A finished run without checkpoints; one stopped before its first step restarts at step 0.
        raise SetupError(
            f"nothing to resume: {run_dir} is a finished run with no checkpoint (--save-every was 0)",
            "train with --save-every N to be able to resume, or start a new run in another --out",
        )
    saved, _ = read_train_config(run_dir)
    conflicts = config.resume_conflicts(saved)
    if conflicts:
        shown = ", ".join(f"{key}={getattr(saved, key)!r}" for key in conflicts)
        raise SetupError(f"--resume: the run was started with {shown}", "resume with the same options")


@dataclass
class _Setup:
    model: torch.nn.Module
    tokenizer: object
    train_set: object
    val_set: object
    toroidal: object
    layers: list[int]
    params: int
    trainable: int
    tokenizer_kind: str
    mechanism_options: dict | None = None  # the built options of a mechanism other than toroidal/standard
    frozen: FrozenBase | None = None  # --freeze-base on a pretrained model: the run saves what it trains


def _setup(config: TrainConfig, run_dir: Path, resume: bool, dist: DistInfo) -> _Setup:
    spec = parse_dataset_spec(config.dataset)
    source = resolve_model(config.model)
    if config.mechanism == "standard" and config.layers is not None and not config.freeze_base:
        raise SetupError(
            "--layers has no effect with --mechanism standard", "add --freeze-base, or drop --layers"
        )
    kind, vocab = parse_tokenizer_spec(config.tokenizer)
    if kind == "auto":
        kind = "bytes" if source.kind == "preset" else "model"
    texts = load_train_texts(spec) if spec.is_text else None
    if resume and (run_dir / TOKENIZER_DIR).is_dir():
        tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    else:
        tokenizer = _make_tokenizer(kind, vocab, source, texts, config, run_dir, dist)
    options = config.data_options()
    train_set = make_dataset(spec, options, "train", tokenizer, texts and texts["train"])
    val_set = make_dataset(spec, options, "validation", tokenizer, texts and texts["validation"])

    model = build_model(source, tokenizer, config.seq_len, config.seed, config.position)
    base_keys = frozenset(model.state_dict())  # before any mechanism adds its tensors
    layers = check_layers(model, config.layers)
    toroidal, kernel_options = None, None
    if config.mechanism == "toroidal":
        toroidal = make_toroidal_config(config.toroidal_options(), config.seq_len)
        layers = add_toroidal(model, toroidal, layers)
    elif config.mechanism != "standard":
        kernel_options = config.kernel_options()
        layers = add_mechanism(model, config.mechanism, kernel_options, layers)
    refusal = length_refusal(model, config.seq_len)
    if refusal is not None:
        raise SetupError(f"--seq-len {config.seq_len}: {refusal}", "use a shorter --seq-len or other layers")
    trainable = freeze_base(model, layers) if config.freeze_base else None
    frozen = None
    if config.freeze_base and source.kind != "preset":  # a preset's base is its seed: saved whole
        frozen = FrozenBase(base_identity(source, model), base_keys)
        if resume:
            _check_same_base(run_dir, frozen.identity)
    check_savable(model, frozen)  # before training, not after it
    params = sum(p.numel() for p in model.parameters())
    if config.grad_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise SetupError(
                f"model {config.model!r} does not support gradient checkpointing", "drop --grad-checkpointing"
            )
        # transformers 5 renamed it; older releases only have the first name.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _Setup(
        model, tokenizer, train_set, val_set, toroidal, layers, params, trainable or params, kind,
        mechanism_options=kernel_options, frozen=frozen,
    )  # fmt: skip


def _check_same_base(run_dir: Path, identity: dict) -> None:
    """--resume on a frozen base: the base must be the one the run started from."""
    _, info = read_train_config(run_dir)
    started = (info.get("resolved") or {}).get("base")
    if started is not None and started != identity:
        where = started.get("path") or started.get("name")
        sha = f" (SHA-256 {started['sha256']})" if started.get("sha256") else ""
        raise SetupError(
            f"--resume: the base model differs from the one the run started from, {where}{sha}",
            "resume with the same base model",
        )


def _write_run_files(run_dir: Path, config: TrainConfig, setup: _Setup, resolved: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if setup.tokenizer_kind != "bpe":  # bpe was saved when it was trained
        save_tokenizer(setup.tokenizer, run_dir)
    if setup.toroidal is not None:
        save_toroidal(run_dir, setup.toroidal, setup.layers)
    if setup.mechanism_options is not None:
        save_mechanism(run_dir, config.mechanism, setup.mechanism_options, setup.layers)
    write_json(run_dir / TRAIN_CONFIG, {"config": config.to_dict(), "resolved": resolved})


def _train_step(
    model, setup: _Setup, optimizer, scaler, config: TrainConfig, step: int, dist, device, precision
):
    """One optimizer step over grad_accum micro-batches; returns (mean loss over ranks, grad norm)."""
    total = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        ids = train_batch(
            setup.train_set,
            config.seed,
            step,
            micro,
            config.grad_accum,
            config.batch_size,
            dist.rank,
            dist.world,
        ).to(device)
        last = micro == config.grad_accum - 1
        # DDP averages gradients on the last micro-batch only.
        with model.no_sync() if dist.active and not last else contextlib.nullcontext():
            auxiliary_loss(model)  # drop penalties of recomputed forwards (gradient checkpointing)
            losses, _ = token_losses(model, ids, precision, device)
            loss = losses.mean()
            penalty = auxiliary_loss(model)  # adaptive depth's compute penalty (None without one)
            scaler.scale((loss if penalty is None else loss + penalty) / config.grad_accum).backward()
        total += loss.detach()
    grad_norm = None
    if config.clip > 0:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    (loss_sum,) = all_reduce_sum([float(total) / config.grad_accum], dist, device)
    return loss_sum / dist.world, grad_norm


def _validation(setup: _Setup, config: TrainConfig, device, precision, dist) -> dict:
    metrics = evaluate_lm(
        setup.model,
        setup.val_set,
        batch_size=config.batch_size,
        max_batches=config.eval_batches,
        device=device,
        precision=precision,
        dist=dist,
    )
    return {key: metrics[key] for key in VALIDATION_KEYS if key in metrics}


# --- the run -----------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train as `config` says into `run_dir` (resume its last checkpoint with `resume`).

    `should_stop()` is asked before every step; True ends the run there with a checkpoint of
    the steps done (the model folder is written only by a finished run)."""
    run_dir = Path(run_dir)
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    dist = init_distributed(wants_cuda)
    devices = list(range(torch.cuda.device_count())) if wants_cuda else []
    try:
        # The run reseeds torch at every step: fork the RNG so the caller's stream is left as it was.
        with torch.random.fork_rng(devices=devices):
            return _train(config, run_dir, resume, progress if dist.is_main else None, dist, should_stop)
    finally:
        shutdown(dist)


def _stop_requested(should_stop, dist: DistInfo, device) -> bool:
    """Whether to stop now, agreed by every rank (a signal may reach them at different steps)."""
    wanted = should_stop is not None and bool(should_stop())
    if not dist.active:
        return wanted
    (count,) = all_reduce_sum([float(wanted)], dist, device)
    return count > 0


def _train(
    config: TrainConfig, run_dir: Path, resume: bool, progress, dist: DistInfo, should_stop=None
) -> TrainResult:
    emit = progress or (lambda event: None)
    device = resolve_device(config.device, dist)
    if config.precision != "fp32" and device.type != "cuda":
        raise SetupError(f"--precision {config.precision} needs a CUDA device", "use --precision fp32 on CPU")
    check_logger(config.log)
    _check_folder(run_dir, config, resume)
    barrier(dist)  # every rank has checked the folder before rank 0 writes into it

    setup = _setup(config, run_dir, resume, dist)
    total_steps = config.total_steps(dist.world)
    resolved = {
        "world_size": dist.world,
        "total_steps": total_steps,
        "tokens_per_step": config.tokens_per_step(dist.world),
        "device": str(device),
        "tokenizer": setup.tokenizer_kind,
        "vocab_size": setup.tokenizer.vocab_size,
        "toroidal_layers": setup.layers if setup.toroidal is not None else [],
        "toroidal": setup.toroidal.to_dict() if setup.toroidal is not None else None,
        "mechanism_layers": setup.layers if config.mechanism != "standard" else [],
        "mechanism_kernel_options": setup.mechanism_options,
    }
    if setup.frozen is not None:  # what the saved parameters belong to
        resolved["base"] = setup.frozen.identity
    model = setup.model.to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    precision = Precision(config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "history": [], "evals": []}
    checkpoint = latest_checkpoint(run_dir) if resume else None
    trained = set(setup.frozen.trained_state(model)) if setup.frozen is not None else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, trained)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    resumed_from = state["step"]
    if dist.is_main and not resume:
        _write_run_files(run_dir, config, setup, resolved)
    barrier(dist)
    wrapped = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = (
        open_logger(config.log, run_dir, {**config.to_dict(), **resolved}, resumed_from)
        if dist.is_main
        else None
    )
    emit(ProgressEvent("start", state["step"], total_steps, {"resumed_from": resumed_from}))
    started, tokens_before = time.perf_counter(), state["tokens"]
    stopped = False
    try:
        while state["step"] < total_steps:
            if _stop_requested(should_stop, dist, device):
                stopped = True
                break
            step = state["step"]
            lr = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(_step_seed(config.seed, dist.rank, step))
            reset_adaptive_metrics(model)  # the step's own depth choices (this rank's)
            loss, grad_norm = _train_step(
                wrapped, setup, optimizer, scaler, config, step, dist, device, precision
            )
            state["step"], state["tokens"] = step + 1, state["tokens"] + config.tokens_per_step(dist.world)
            entry = {
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "tokens": state["tokens"],
                "grad_norm": grad_norm,
                **adaptive_metrics(model),  # mean_depth, compute_saved with adaptive depth
            }
            state["history"].append(entry)
            seconds = time.perf_counter() - started
            speed = (state["tokens"] - tokens_before) / seconds if seconds > 0 else None
            emit(ProgressEvent("step", step + 1, total_steps, {**entry, "tokens_per_s": speed}))
            if logger is not None:
                scalars = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": speed}
                scalars.update({f"train/{key}": value for key, value in adaptive_metrics(model).items()})
                logger.log(step + 1, scalars)

            done = step + 1 == total_steps
            if done or (config.eval_every and (step + 1) % config.eval_every == 0):
                if done:  # the mechanism's metrics of the run: those of its final validation pass
                    reset_mechanism_metrics(model)
                val = _validation(setup, config, device, precision, dist)
                state["evals"].append({"step": step + 1, "tokens": state["tokens"], **val})
                emit(ProgressEvent("eval", step + 1, total_steps, val))
                if logger is not None:
                    logger.log(step + 1, {f"val/{key}": value for key, value in val.items()})
            if config.save_every and (step + 1) % config.save_every == 0:
                state["elapsed"] += time.perf_counter() - started
                started, tokens_before = time.perf_counter(), state["tokens"]
                if dist.is_main:
                    state["scaler"] = scaler.state_dict() if scaler.is_enabled() else None
                    path = _save_checkpoint(run_dir, step + 1, model, optimizer, state, setup)
                    emit(ProgressEvent("checkpoint", step + 1, total_steps, {"path": str(path)}))
                barrier(dist)
    finally:
        if logger is not None:
            logger.close()
    state["elapsed"] += time.perf_counter() - started
    saved = config.save_every and state["step"] % config.save_every == 0
    if dist.is_main and stopped and state["step"] > resumed_from and not saved:
        state["scaler"] = scaler.state_dict() if scaler.is_enabled() else None
        path = _save_checkpoint(run_dir, state["step"], model, optimizer, state, setup)
        emit(ProgressEvent("checkpoint", state["step"], total_steps, {"path": str(path)}))
    failed = None
    if dist.is_main and not stopped:
        try:
            save_model(model, run_dir, setup.frozen)
        except Exception as error:  # never lose a finished run: keep what it trained
            failed = _rescue(model, setup, run_dir, error)
    barrier(dist)
    if failed is not None:
        raise failed

    payload = _payload(state, setup, config, resolved, resumed_from)
    emit(ProgressEvent("done", state["step"], total_steps, payload["final"]))
    return TrainResult({**config.to_dict(), **resolved}, payload, run_dir, dist.is_main, device, stopped)


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, setup: _Setup) -> Path:
    tensors = setup.frozen.trained_state(model) if setup.frozen is not None else None
    return save_checkpoint(run_dir, step, model, optimizer, state, tensors=tensors)


def _rescue(model, setup: _Setup, run_dir: Path, error: Exception) -> CheckpointError:
    """After the model could not be saved: write its trained tensors (safetensors), and the error to raise."""
    if setup.frozen is not None:
        tensors = setup.frozen.trained_state(model)
    else:
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    path = Path(run_dir) / RESCUED
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    try:
        save_tensors(tensors, path)
    except Exception as second:  # nothing more can be kept
        return CheckpointError(
            f"cannot save the trained model into {run_dir}: {reason}; nor its trained tensors: {second}"
        )
    return CheckpointError(
        f"cannot save the trained model into {Path(run_dir) / MODEL_DIR}: {reason}; "
        f"its {len(tensors)} trained tensors are in {path} (safetensors, state-dict names)"
    )


def _payload(state: dict, setup: _Setup, config: TrainConfig, resolved: dict, resumed_from: int) -> dict:
    last_eval = state["evals"][-1] if state["evals"] else {}
    history = state["history"]
    final = {
        "step": state["step"],
        "tokens": state["tokens"],
        "train_loss": history[-1]["loss"] if history else None,
        **{f"val_{key}": last_eval.get(key) for key in VALIDATION_KEYS if key in last_eval},
    }
    elapsed = state["elapsed"]
    return {
        "final": final,
        "loss_curve": history,
        "validation": state["evals"],
        "model": {
            "source": config.model,
            "attention": config.attention,
            "mechanism": config.mechanism,
            "parameters": setup.params,
            "trainable_parameters": setup.trainable,
            "toroidal_layers": resolved["toroidal_layers"],
        },
        "mechanism": mechanism_record(
            setup.model,
            config.mechanism,
            resolved["toroidal"] or setup.mechanism_options,  # the options it was built with
            resolved["mechanism_layers"],
        ),
        "resumed_from_step": resumed_from,
        # Timings: the only fields that differ between two runs of the same command and seed.
        "timing": {
            "wall_time_s": elapsed,
            "tokens_per_s": state["tokens"] / elapsed if elapsed > 0 else None,
        },
    }

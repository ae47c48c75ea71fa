"""Memory estimates of a training or evaluation run, from its config: no weights are read or built.

The host model's shape comes from its config (a preset, a model folder's config.json, a run
folder's saved model config, or the hub's config file when the user named a hub model); its
parameter count from building it on the `meta` device, which allocates nothing. The formulas
are in `toroidal.runtime.memory`.

    fit = train_footprint(TrainConfig(model="small", seq_len=1024, batch_size=16))
    fit.estimate.total, fit.device, fit.at(batch=4, seq_len=1024)
"""

from __future__ import annotations

from pathlib import Path

import torch

from toroidal.config import TORUS_FLAGS, period_for
from toroidal.functional import backend_for_shape
from toroidal.kernels import BackendUnavailable
from toroidal.runtime import memory
from toroidal.training.config import TrainConfig
from toroidal.training.distributed import DistInfo
from toroidal.training.errors import SetupError
from toroidal.training.hub import trust_remote_code


def _hf_config(source, vocab: int | None):
    from transformers import AutoConfig

    from toroidal.training.models import quiet_transformers

    try:
        with quiet_transformers():
            if source.kind == "preset":
                fields = dict(source.preset)
                return AutoConfig.for_model(fields.pop("family"), **fields, vocab_size=vocab)
            if source.kind == "gguf":  # the config a GGUF file states, without its quantization
                config = AutoConfig.from_pretrained(source.name, gguf_file=source.file)
                config.__dict__.pop("quantization_config", None)
                return config
            return AutoConfig.from_pretrained(source.name, trust_remote_code=trust_remote_code())
    except Exception as error:  # unknown family, unreadable config.json: the run itself says it better
        raise SetupError(f"cannot load the model {source.path}: {error}") from None


def _meta_model(config):
    """The model built on the meta device: real parameter shapes, no memory."""
    from transformers import AutoModelForCausalLM

    from toroidal.training.models import quiet_transformers

    with quiet_transformers(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code())


def model_shape(config, model) -> memory.ModelShape:
    """A transformers config (and its meta model) as the shape the estimate needs."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return memory.ModelShape(
        hidden=hidden,
        layers=config.num_hidden_layers,
        heads=heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        intermediate=intermediate or 4 * hidden,
        vocab=model.get_input_embeddings().num_embeddings,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def _chosen_backend(
    shape: memory.ModelShape, options: dict, batch: int, seq_len: int, training: bool, device
):
    """The backend toroidal layers will run (auto resolved as the kernel resolves it)."""
    # Causal language models: max_len is the context.
    period = period_for(seq_len, period=options.get("period"), max_len=seq_len, causal=True)
    backend = options.get("backend", "auto")
    try:
        return backend_for_shape(
            (batch, shape.heads, seq_len, shape.head_dim), device=str(device), training=training,
            backend=backend, depth=options["depth"], lambda_distance=options.get("lambda_distance", 0.1),
            period=period, causal=True, window=options.get("window"),
        )  # fmt: skip
    except (BackendUnavailable, ValueError):  # the run will say why; estimate as for the named backend
        return backend if backend != "auto" else "reference"


def _toroidal(shape, options, layers, batch, seq_len, training, device) -> memory.ToroidalLayers:
    count = shape.layers if layers is None else len(set(layers))
    backend = _chosen_backend(shape, options, batch, seq_len, training, device)
    return memory.ToroidalLayers(count, options["depth"], backend)


def _trainable(model, layers: list[int] | None) -> int:
    """Parameters of the chosen layers' attention modules (what --freeze-base trains)."""
    from toroidal.integrations.transformers import attention_modules

    modules = attention_modules(model)
    chosen = modules if layers is None else {i: m for i, m in modules.items() if i in layers}
    return sum(p.numel() for m in chosen.values() for p in m.parameters())


def _vocab(tokenizer_spec: str, source) -> int | None:
    """The tokenizer's vocabulary where it decides the embedding size (presets), else None."""
    from toroidal.training.tokenization import ByteTokenizer, parse_tokenizer_spec

    kind, bpe_vocab = parse_tokenizer_spec(tokenizer_spec)
    if source.kind != "preset":
        return None  # the model's own embeddings
    return bpe_vocab if kind == "bpe" else ByteTokenizer.vocab_size


def train_footprint(config: TrainConfig) -> memory.Footprint:
    """Estimated peak memory of one training step of `config`, per process."""
    from toroidal.training.loop import resolve_device
    from toroidal.training.models import resolve_model

    device = resolve_device(config.device, DistInfo())
    source = resolve_model(config.model)
    hf_config = _hf_config(source, _vocab(config.tokenizer, source))
    meta = _meta_model(hf_config)
    shape = model_shape(hf_config, meta)
    trainable = _trainable(meta, config.layers) if config.freeze_base else None
    options = config.toroidal_options()

    def at(batch: int, seq_len: int) -> memory.Estimate:
        toroidal = None
        if config.attention == "toroidal":
            toroidal = _toroidal(shape, options, config.layers, batch, seq_len, True, device)
        return memory.model_training(
            shape,
            batch=batch,
            seq_len=seq_len,
            toroidal=toroidal,
            trainable=trainable,
            mixed_precision=config.precision != "fp32",
            grad_checkpointing=config.grad_checkpointing,
        )

    return memory.Footprint(
        at(config.batch_size, config.seq_len), device, config.batch_size, config.seq_len, at
    )


def eval_footprint(config) -> memory.Footprint:
    """Estimated peak memory of evaluating `config` (an `EvalConfig`): a forward pass per batch."""
    from toroidal.training.loop import resolve_device
    from toroidal.training.models import ModelSource, resolve_model
    from toroidal.training.runs import finished_run, read_toroidal

    device = resolve_device(config.device, DistInfo())
    if config.checkpoint is not None:
        run = Path(config.checkpoint)
        trained, folder = finished_run(run)
        source = ModelSource("local", str(folder))
        attention, layers = trained.attention, trained.layers
        options = trained.toroidal_options()
        if attention == "toroidal":
            saved, layers = read_toroidal(run)
            options.update(depth=saved.depth, backend=saved.backend, period=saved.period, window=saved.window)
        vocab = None
    else:
        source = resolve_model(config.model)
        attention, layers = config.attention, config.layers
        options = {key: getattr(config, key) for key in TORUS_FLAGS}
        vocab = _vocab(config.tokenizer, source)
    hf_config = _hf_config(source, vocab)
    shape = model_shape(hf_config, _meta_model(hf_config))

    def at(batch: int, seq_len: int) -> memory.Estimate:
        toroidal = None
        if attention == "toroidal":
            toroidal = _toroidal(shape, options, layers, batch, seq_len, False, device)
        return memory.model_inference(
            shape, batch=batch, seq_len=seq_len, toroidal=toroidal, mixed_precision=config.precision != "fp32"
        )

    return memory.Footprint(
        at(config.batch_size, config.seq_len), device, config.batch_size, config.seq_len, at
    )

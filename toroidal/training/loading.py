"""The model of a long-context evaluation: a `toroidal train` run or a causal LM, toroidal or not.

    loaded = load_model(ModelSpec(checkpoint="runs/pk"))                      # as trained
    loaded = load_model(ModelSpec(checkpoint="runs/pk", attention="baseline"))  # same weights, host attention
    loaded = load_model(ModelSpec(pretrained="micro", depth=2, layers=[1]))   # a preset, toroidal layer 1

A checkpoint trained with toroidal attention keeps its structure (depth, fusion, layers: its
fusion weights depend on them); the runtime options lambda, period, window and backend may be
changed. Any other model gets toroidal attention with the given options (defaults below).

`mechanism` picks another registered mechanism (`toroidal.mechanisms`): `standard` is the
baseline, `toroidal` the above, any other runs its kernel in the chosen layers with the torus
options it accepts and `mechanism_options`. A checkpoint trained with such a mechanism runs it
as trained (or the host attention with attention='baseline').
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.integrations.transformers import (
    FUSION_ATTR,
    apply_toroidal,
    load_toroidal_weights,
    remove_mechanism,
    remove_toroidal,
    toroidal_layers,
)
from toroidal.training.errors import SetupError
from toroidal.training.mechanism import add_mechanism, kernel_options, resolve_mechanism
from toroidal.training.models import (
    add_toroidal,
    build_model,
    check_layers,
    make_toroidal_config,
    max_positions,
    source_and_tokenizer,
)
from toroidal.training.runs import TOKENIZER_DIR, TRAIN_CONFIG, load_run
from toroidal.training.tokenization import (
    KIND_FILE,
    ByteTokenizer,
    load_model_tokenizer,
    load_tokenizer,
)

ATTENTIONS = ("auto", "toroidal", "baseline")
TOROIDAL_DEFAULTS = {"depth": 2, "lambda_distance": 0.1, "fusion": "low_rank", "backend": "auto"}
# Options that change no weight: a trained toroidal checkpoint may run with other values.
RUNTIME_OPTIONS = ("lambda_distance", "period", "window", "backend")
STRUCTURE_OPTIONS = ("depth", "fusion", "fusion_rank", "layers")
DEFAULT_MAX_LEN = 2048  # the ring period of models that state no length


@dataclass(frozen=True)
class ModelSpec:
    """What to evaluate. Toroidal options left None take the checkpoint's values or the defaults."""

    checkpoint: str | None = None  # a `toroidal train` run folder
    pretrained: str | None = None  # or a preset, model folder or hub name
    attention: str = "auto"  # auto: a checkpoint as trained, other models toroidal
    depth: int | None = None
    lambda_distance: float | None = None
    period: int | None = None
    window: int | None = None
    fusion: str | None = None
    fusion_rank: int | None = None
    backend: str | None = None
    layers: list[int] | None = None
    tokenizer: str = "auto"  # with pretrained: bytes, model or auto (bytes for presets)
    seed: int = 0  # a preset's random initialization
    max_len: int | None = None  # ring period when none is given; None: the model's positions
    mechanism: str | None = None  # a registered mechanism; None: as `attention` says
    mechanism_options: dict = field(default_factory=dict)  # options of a mechanism other than toroidal

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.pretrained is None):
            raise SetupError("give either a checkpoint or a model", "use --checkpoint DIR or --model NAME")
        if self.attention not in ATTENTIONS:
            raise SetupError(f"attention {self.attention!r}: must be one of {', '.join(ATTENTIONS)}")
        if self.mechanism is not None:  # standard and toroidal are what attention says already
            name = resolve_mechanism(None if self.attention == "auto" else self.attention, self.mechanism)
            if name in ("standard", "toroidal"):
                object.__setattr__(self, "attention", "baseline" if name == "standard" else "toroidal")
                object.__setattr__(self, "mechanism", None)

    def given(self, names) -> dict:
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a toroidal tokenizer (tokenization.py): bytes, bpe or the model's own
    attention: str  # toroidal | baseline | another mechanism's name
    toroidal: ToroidalConfig | None
    layers: list[int]
    source: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The model as a result record states it."""
        return {
            **self.source,
            "attention": self.attention,
            "toroidal": self.toroidal.to_dict() if self.toroidal is not None else None,
            "toroidal_layers": self.layers if self.toroidal is not None else [],
            "mechanism_layers": self.layers,
            "tokenizer": self.tokenizer.kind,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


# --- tokenizers ---------------------------------------------------------------------------------------


def load_tokenizer_for(
    checkpoint: str | None = None, pretrained: str | None = None, tokenizer: str | None = None
):
    """The tokenizer a model is evaluated with, without loading the model (bytes when none is named).

    `tokenizer` may also be a saved tokenizer folder or a run folder (for task generators).
    """
    if tokenizer not in (None, "", "auto"):
        path = Path(str(tokenizer)).expanduser()
        if (path / KIND_FILE).is_file():
            return load_tokenizer(path)
        if (path / TRAIN_CONFIG).is_file():
            return load_tokenizer(path / TOKENIZER_DIR)
    if checkpoint:
        return load_tokenizer(Path(checkpoint) / TOKENIZER_DIR)
    if pretrained:
        return source_and_tokenizer(str(pretrained), str(tokenizer or "auto"))[1]
    if tokenizer in (None, "", "auto", "bytes"):
        return ByteTokenizer()
    return load_model_tokenizer(str(tokenizer))


# --- models -------------------------------------------------------------------------------------------


def _toroidal_config(spec: ModelSpec, max_len: int) -> ToroidalConfig:
    options = {**TOROIDAL_DEFAULTS, **spec.given((*RUNTIME_OPTIONS, *STRUCTURE_OPTIONS))}
    return make_toroidal_config(options, max_len)


def _retune(model: nn.Module, trained: ToroidalConfig, layers: list[int], spec: ModelSpec) -> ToroidalConfig:
    """Rebuild the toroidal layers with other runtime options, keeping the trained fusion weights."""
    changed = spec.given(RUNTIME_OPTIONS)
    if not changed:
        return trained
    try:
        config = dataclasses.replace(trained, **changed)
    except ValueError as error:
        raise SetupError(str(error), "fix the toroidal option") from None
    fusion = {k: v for k, v in model.state_dict().items() if f".{FUSION_ATTR}." in k}
    remove_toroidal(model)
    apply_toroidal(model, config, layers)
    load_toroidal_weights(model, fusion)
    return config


def _other_mechanism(model, tokenizer, spec: ModelSpec, max_len: int, source: dict) -> LoadedModel:
    """The model running `spec.mechanism` (neither standard nor toroidal) in `spec.layers`."""
    torus = {**TOROIDAL_DEFAULTS, **spec.given((*RUNTIME_OPTIONS, "depth", "fusion", "fusion_rank"))}
    options = kernel_options(spec.mechanism, torus, spec.mechanism_options, max_len)
    layers = add_mechanism(model, spec.mechanism, options, check_layers(model, spec.layers))
    return LoadedModel(model.eval(), tokenizer, spec.mechanism, None, layers, {**source, "options": options})


def _from_trained_mechanism(run, spec: ModelSpec, source: dict) -> LoadedModel:
    """A checkpoint trained with a mechanism other than standard and toroidal (or a toroidal one asked
    to run another): as trained, or baseline."""
    if spec.attention == "baseline":
        remove_mechanism(run.model)
        return LoadedModel(run.model, run.tokenizer, "baseline", None, [], source)
    if spec.attention == "toroidal" or spec.mechanism not in (None, run.mechanism):
        raise SetupError(
            f"checkpoint {spec.checkpoint} was trained with mechanism {run.mechanism!r}",
            "evaluate it as trained, or with attention=baseline",
        )
    source = {**source, "options": run.mechanism_options}
    return LoadedModel(run.model, run.tokenizer, run.mechanism, None, run.layers or [], source)


def _from_checkpoint(spec: ModelSpec) -> LoadedModel:
    run = load_run(spec.checkpoint)
    model, source = run.model, {"checkpoint": str(spec.checkpoint), "trained_attention": run.config.attention}
    if run.mechanism not in ("toroidal", "standard") or (run.toroidal is not None and spec.mechanism):
        return _from_trained_mechanism(run, spec, source)
    if run.toroidal is not None:
        if spec.attention == "baseline":
            remove_toroidal(model)
            return LoadedModel(model, run.tokenizer, "baseline", None, [], source)
        fixed = spec.given(STRUCTURE_OPTIONS)
        if fixed:
            name = next(iter(fixed))
            raise SetupError(
                f"{name} cannot change a toroidal checkpoint (its fusion weights depend on it)",
                "only lambda, period, window and backend may differ from training",
            )
        config = _retune(model, run.toroidal, run.layers, spec)
        return LoadedModel(model, run.tokenizer, "toroidal", config, toroidal_layers(model), source)
    if spec.mechanism is not None:
        return _other_mechanism(model, run.tokenizer, spec, run.config.seq_len, source)
    if spec.attention != "toroidal":
        return LoadedModel(model, run.tokenizer, "baseline", None, [], source)
    config = _toroidal_config(spec, run.config.seq_len)
    layers = add_toroidal(model, config, check_layers(model, spec.layers))
    return LoadedModel(model.eval(), run.tokenizer, "toroidal", config, layers, source)


def _from_pretrained(spec: ModelSpec) -> LoadedModel:
    source, tokenizer = source_and_tokenizer(spec.pretrained, spec.tokenizer)
    model = build_model(source, tokenizer, seq_len=1, seed=spec.seed)
    described = {"model": str(source.path) if source.file else source.name, "model_kind": source.kind}
    if spec.attention == "baseline":
        return LoadedModel(model.eval(), tokenizer, "baseline", None, [], described)
    max_len = spec.max_len or max_positions(model.config) or DEFAULT_MAX_LEN
    if spec.mechanism is not None:
        return _other_mechanism(model, tokenizer, spec, max_len, described)
    config = _toroidal_config(spec, max_len)
    layers = add_toroidal(model, config, check_layers(model, spec.layers))
    return LoadedModel(model.eval(), tokenizer, "toroidal", config, layers, described)


def load_model(spec: ModelSpec) -> LoadedModel:
    """The model of `spec` in eval mode, on the CPU, with its tokenizer. Raises SetupError."""
    return _from_checkpoint(spec) if spec.checkpoint is not None else _from_pretrained(spec)

"""Host models of a run: presets (YAML, built from a config: no download), local folders, hub names.

A preset is a mapping with `family` (a transformers model type: llama, gpt2, phi, ...) and
that family's config fields; the vocabulary and special token ids come from the tokenizer.
`tiny` is built in, so the default model needs no files at all.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toroidal.config import ToroidalConfig
from toroidal.integrations.transformers import (
    FUSION_ATTR,
    KERNEL_ATTR,
    apply_toroidal,
    attention_modules,
    load_mechanism_weights,
    load_toroidal_weights,
    max_positions,
    toroidal_layers,
)
from toroidal.runtime.install import config_folders
from toroidal.training.data import check_seed
from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.gguf_files import SUFFIX as GGUF_SUFFIX
from toroidal.training.gguf_files import check_gguf, gguf_files
from toroidal.training.hub import require_hub, trust_remote_code
from toroidal.training.tokenization import ByteTokenizer, load_model_tokenizer, parse_tokenizer_spec

# A small Llama: 128 wide, 4 layers, grouped queries (4 heads, 2 key/value heads).
TINY = {
    "family": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "max_position_embeddings": 1024,
}
BUILTIN_PRESETS = {"tiny": TINY}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a preset (its mapping), a local folder, a hub name, or a GGUF file
    (`name` its folder, `file` its name)."""

    kind: str  # preset | local | hub | gguf
    name: str
    preset: dict | None = None
    file: str | None = None  # gguf: the file in folder `name`

    @property
    def path(self) -> Path:
        """The model's folder, or its GGUF file."""
        return Path(self.name) / self.file if self.file else Path(self.name)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "preset": self.preset, "file": self.file}


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars, load reports or warnings from transformers (the library never prints)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def preset_names() -> list[str]:
    names = set(BUILTIN_PRESETS)
    for folder in config_folders("models"):  # ./configs/models first, then the shipped ones
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.y*ml"))
    return sorted(names)


def _read_preset(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise SetupError(f"cannot read model preset {path}: {error}", "fix the YAML file") from None
    if not isinstance(data, dict) or not isinstance(data.get("family"), str):
        raise SetupError(
            f"model preset {path} must be a mapping with a 'family' (e.g. llama)", "fix the YAML file"
        )
    return data


def resolve_model(spec: str) -> ModelSource:
    """A `--model` value: preset name or YAML file, local model folder, else a hub name (if reachable)."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SetupError(f"model preset {spec} does not exist", "pass a YAML file or a preset name")
        return ModelSource("preset", path.stem, _read_preset(path))
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise SetupError(f"model file {spec} does not exist", "pass an existing .gguf file")
        return _gguf_source(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = gguf_files(path)
            if len(found) == 1:  # a folder holding one GGUF model
                return _gguf_source(found[0])
            if found:
                names = ", ".join(p.name for p in found)
                raise SetupError(f"{spec} holds several GGUF files ({names})", "pass one of them as --model")
            raise SetupError(
                f"{spec} is not a model folder (no config.json)",
                "pass a folder written by save_pretrained, a .gguf file, or a preset name",
            )
        return ModelSource("local", str(path))
    if path.parent == Path("."):
        for folder in config_folders("models"):
            for suffix in (".yaml", ".yml"):
                if (folder / f"{spec}{suffix}").is_file():
                    return ModelSource("preset", spec, _read_preset(folder / f"{spec}{suffix}"))
        if spec in BUILTIN_PRESETS:
            return ModelSource("preset", spec, dict(BUILTIN_PRESETS[spec]))
    if path.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec):
        raise SetupError(
            f"unknown model {spec!r}: not a preset, a model folder or a hub name",
            f"use a preset ({', '.join(preset_names())}) or a folder written by save_pretrained",
        )
    # Checked here, before anything (the tokenizer, the config) is downloaded.
    require_hub(f"model {spec!r}", f"offline, use a preset ({', '.join(preset_names())}) or a local folder")
    return ModelSource("hub", spec)


def source_and_tokenizer(name: str, tokenizer_spec: str):
    """(model source, tokenizer) for a model not trained by `toroidal train`.

    `auto` means bytes for presets (they have no tokenizer) and the model's own otherwise;
    a BPE tokenizer only exists inside a training run.
    """
    kind, _ = parse_tokenizer_spec(tokenizer_spec)
    source = resolve_model(name)
    if kind == "auto":
        kind = "bytes" if source.kind == "preset" else "model"
    if kind == "bpe":
        raise SetupError(
            "a BPE tokenizer is trained by `toroidal train`", "evaluate that run with --checkpoint"
        )
    if kind == "model" and source.kind == "preset":
        raise SetupError(f"preset {source.name!r} has no tokenizer of its own", "use --tokenizer bytes")
    return source, ByteTokenizer() if kind == "bytes" else source_tokenizer(source)


def source_tokenizer(source: ModelSource):
    """The tokenizer of a local, hub or GGUF model (a GGUF file carries its own)."""
    with quiet_transformers():
        return load_model_tokenizer(source.name, gguf_file=source.file)


def _gguf_source(path: Path) -> ModelSource:
    check_gguf(path)  # readable, and of an architecture transformers loads: before anything is built
    return ModelSource("gguf", str(path.parent), file=path.name)


def _token_ids(tokenizer) -> dict:
    return {
        "pad_token_id": tokenizer.pad_id,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
    }


def build_model(
    source: ModelSource,
    tokenizer,
    seq_len: int | None,
    seed: int,
    position: str = "rope",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The host model (sdpa attention), initialized from `seed` for presets; `position` (presets
    only): `rope`, the family's own encoding, or `none`, no rotary encoding (`remove_rotary`).
    A preset must state `seq_len` positions; None: no check (eval asks `length_refusal` per length).
    `dtype`: a GGUF model's weights are dequantized to it (None: float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if position != "rope" and source.kind != "preset":
        raise SetupError(
            f"--position {position} builds a preset without its rotary encoding; {source.name} is pretrained",
            "use a preset (e.g. tiny), or --position rope",
        )
    if source.kind == "preset":
        fields = dict(source.preset)
        family = fields.pop("family")
        try:
            with quiet_transformers():
                config = AutoConfig.for_model(
                    family, **fields, vocab_size=tokenizer.vocab_size, **_token_ids(tokenizer)
                )
        except (ValueError, TypeError, KeyError) as error:
            raise SetupError(f"model preset {source.name!r}: {error}", "fix the preset YAML") from None
        limit = max_positions(config)
        if seq_len is not None and limit is not None and limit < seq_len:
            raise SetupError(
                f"model {source.name!r} has {limit} positions, fewer than --seq-len {seq_len}",
                f"use --seq-len {limit} or less",
            )
        check_seed(seed)
        torch.manual_seed(seed)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        set_position(model, position, f"preset {source.name!r}")
        return model
    try:
        with quiet_transformers():
            if source.kind == "gguf":
                model = load_gguf_model(source, dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    source.name, attn_implementation="sdpa", trust_remote_code=trust_remote_code()
                )
    except Exception as error:  # missing files, unknown architecture, corrupt weights: one line each
        raise SetupError(
            f"cannot load model {source.path}: {_first_line(error)}", "check the model name, folder or file"
        ) from None
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > vocab:
        raise SetupError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, model {source.name} only {vocab} embeddings",
            "use --tokenizer model",
        )
    return model


def load_gguf_model(source: ModelSource, dtype: torch.dtype | None = None) -> nn.Module:
    """A GGUF file as an ordinary float model (float32 unless `dtype`): dequantized by transformers,
    then without the quantization it remembers, so that `save_pretrained` writes it like any model."""
    from transformers import AutoModelForCausalLM

    options = {}
    try:  # ask for dense weights: never GGUF blocks kept packed for a matmul kernel
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantize
        pass
    # The GGUF reader draws its own progress bar on stderr, past transformers' switch for bars.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(
            source.name,
            gguf_file=source.file,
            dtype=dtype or torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code(),
            **options,
        )
    # What may remain of the loading: the weights are plain tensors now, nothing is quantized.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


# --- position encoding -------------------------------------------------------------------------------

POSITIONS = ("rope", "none")  # the host's rotary encoding, or none at all (NoPE)


class NoRotary(nn.Module):
    """Stands in for a host's rotary embedding: cos = 1 and sin = 0 of its shape, so that the host's
    `apply_rotary_pos_emb` leaves q and k exactly as they are (no position encoding at all)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim  # the dims the replaced embedding rotated

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        shape = (*position_ids.shape, self.dim)
        return x.new_ones(shape), x.new_zeros(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def remove_rotary(model: nn.Module) -> int:
    """Replace every rotary embedding module (`rotary_emb`, holding `inv_freq`) by `NoRotary`; returns
    how many. Llama-family hosts compute cos and sin once per forward there and rotate q and k in
    every layer with them."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            sizes = {b.numel() for key, b in child.named_buffers(recurse=False) if key == "inv_freq"}
            if name == "rotary_emb" and len(sizes) == 1:
                setattr(parent, name, NoRotary(2 * sizes.pop()))
                replaced += 1
    return replaced


def set_position(model: nn.Module, position: str, what: str) -> None:
    """Apply a `position` choice (`POSITIONS`) to a freshly built or loaded host; SetupError if impossible."""
    if position not in POSITIONS:
        raise SetupError(f"--position {position}: must be one of {', '.join(POSITIONS)}")
    if position == "none" and not remove_rotary(model):
        raise SetupError(
            f"--position none: {what} ({type(model).__name__}) has no rotary embedding to remove",
            "use a Llama-family preset (llama, mistral, qwen2), or --position rope",
        )


# --- toroidal attention ------------------------------------------------------------------------------


def make_toroidal_config(options: dict, seq_len: int) -> ToroidalConfig:
    """Kernel-mode config: the host keeps its rotary encoding; causal period P = period or seq_len."""
    try:
        return ToroidalConfig(
            depth=options["depth"],
            lambda_distance=options["lambda_distance"],
            period=options.get("period"),
            window=options.get("window"),
            fusion=options.get("fusion", "low_rank"),
            fusion_rank=options.get("fusion_rank"),
            backend=options.get("backend", "auto"),
            max_len=seq_len,
            rope="none",
        )
    except ValueError as error:
        raise SetupError(str(error), "fix the toroidal option") from None


def add_toroidal(model: nn.Module, config: ToroidalConfig, layers: list[int] | None) -> list[int]:
    """Toroidal attention in `layers` (None: all); returns the layers it runs in."""
    try:
        apply_toroidal(model, config, layers)
    except ValueError as error:
        raise SetupError(str(error), "change --depth or --layers") from None
    return toroidal_layers(model)


def check_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    """The chosen attention layers, checked against the model."""
    available = sorted(attention_modules(model))
    if layers is None:
        return available
    bad = [layer for layer in layers if layer not in available]
    if bad:
        raise SetupError(
            f"--layers {bad[0]} does not exist: the model has layers {available[0]}..{available[-1]}",
            "pick layer indices in that range",
        )
    return sorted(set(layers))


def freeze_base(model: nn.Module, layers: list[int]) -> int:
    """Train only the attention modules of `layers` (q, k, v, output projections and depth fusion).

    As in the Phi-2 experiments: the host's embeddings, MLPs, norms, LM head and other
    layers keep their weights. Returns the number of trainable parameters.
    """
    modules = attention_modules(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers:
        for param in modules[layer].parameters():
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint_model(
    folder: Path,
    toroidal: ToroidalConfig | None,
    layers: list[int] | None,
    mechanism: tuple[str, dict] | None = None,
    position: str = "rope",
) -> nn.Module:
    """A model saved by a run (`save_pretrained`), toroidal layers re-applied and fusion weights loaded.

    `position`: the run's (`none`: its rotary embedding removed again, before any layer is attached).

    `mechanism` (name, options): another mechanism's kernels, re-applied in `layers` with
    their weights loaded. Every weight must be in the file with its shape: transformers would
    silently initialize missing ones at random, which is never what evaluating a checkpoint means.
    """
    from transformers import AutoModelForCausalLM

    from toroidal.training.mechanism import add_mechanism

    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder,
                attn_implementation="sdpa",
                trust_remote_code=trust_remote_code(),
                output_loading_info=True,
            )
    except Exception as error:  # corrupt weights, unknown architecture, size mismatch
        raise CheckpointError(f"cannot load the model in {folder}: {_first_line(error)}") from None
    attached = FUSION_ATTR if toroidal is not None else KERNEL_ATTR if mechanism is not None else None
    unexpected = [k for k in info.get("unexpected_keys", ()) if attached is None or f".{attached}." not in k]
    wrong = (
        sorted(info.get("missing_keys", ()))
        + sorted(unexpected)
        + sorted(map(str, info.get("mismatched_keys", ())))
    )
    if wrong:
        raise CheckpointError(
            f"the weights in {folder} do not match its config.json (e.g. {wrong[0]}): "
            "a checkpoint of another architecture or an edited config",
        )
    try:
        set_position(model, position, f"the model in {folder}")
    except SetupError as error:
        raise CheckpointError(error.message) from None
    if toroidal is not None:
        add_toroidal(model, toroidal, layers)
        try:
            load_toroidal_weights(model, folder)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"cannot load the toroidal weights in {folder}: {error}") from None
        except Exception as error:  # safetensors raises its own type for corrupt files
            raise CheckpointError(f"cannot read the weights in {folder}: {_first_line(error)}") from None
    if mechanism is not None:
        add_mechanism(model, *mechanism, layers)
        try:
            load_mechanism_weights(model, folder)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"cannot load the mechanism weights in {folder}: {error}") from None
        except Exception as error:  # safetensors raises its own type for corrupt files
            raise CheckpointError(f"cannot read the weights in {folder}: {_first_line(error)}") from None
    return model.eval()

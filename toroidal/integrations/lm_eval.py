"""The `toroidal` model type of lm-evaluation-harness (an HFLM subclass; see README).

    python -m toroidal.integrations.lm_eval --model toroidal \\
        --model_args checkpoint=runs/pk --tasks toroidal_passkey_1024 --include_path configs/tasks

`model_args`: checkpoint=DIR or pretrained=NAME|PATH (a model folder, or a GGUF file: pretrained=PATH.gguf
or pretrained=FOLDER,gguf=NAME.gguf); attention=auto|toroidal|baseline or
mechanism=NAME with its options; the toroidal options (depth, lambda, period, window, fusion,
fusion_rank, backend, layers=0;2); tokenizer, seed, device, dtype, batch_size, max_length, and
HFLM's own. Only model loading and the tokenizer are ours (`as_hf_tokenizer` gives the byte and
BPE tokenizers of `toroidal train` as a `PreTrainedTokenizerFast` with the same ids).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

from toroidal.mechanisms import get_mechanism
from toroidal.runtime import devices
from toroidal.training.loading import LoadedModel, ModelSpec, load_model

MODEL_NAME = "toroidal"
# HFLM arguments that make sense for a model built here (the others load models from names).
HFLM_OPTIONS = (
    "max_batch_size",
    "logits_cache",
    "truncation",
    "softmax_dtype",
    "mixed_precision_dtype",
    "add_bos_token",
    "prefix_token_id",
)
WRAPPER_OPTIONS = ("device", "batch_size", "max_length", "dtype")
# torch's spellings (float32, float16, bfloat16), then the short names of the one dtype table.
DTYPES = {**{str(dtype).removeprefix("torch."): dtype for dtype in devices.DTYPES.values()}, **devices.DTYPES}
_SPEC_ALIASES = {"lambda": "lambda_distance", "model": "pretrained"}


# --- tokenizers ---------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (ByteLevel's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _byte_backend():
    """A `tokenizers` Tokenizer giving every UTF-8 byte its value as id, as ByteTokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from toroidal.training.tokenization import SPECIALS

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIALS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    return tokenizer


def as_hf_tokenizer(tokenizer, name: str = "toroidal"):
    """A transformers tokenizer (what HFLM needs) for a tokenizer of `toroidal.training.tokenization`."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer.kind == "model":
        return tokenizer.tokenizer
    backend = _byte_backend() if tokenizer.kind == "bytes" else tokenizer.tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        name_or_path=f"{name}-{tokenizer.kind}",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


# --- arguments ----------------------------------------------------------------------------------------


def _layers(value) -> list[int] | None:
    """'all', an int, or '0;2' / '0+2' / '0 2' (commas separate lm-eval's model_args)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all", "none")):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    try:
        return [int(item) for item in re.split(r"[;+\s]+", str(value).strip()) if item]
    except ValueError:
        raise ValueError(f"layers={value!r}: give layer indices such as layers=0;2") from None


def _optional_int(value, name: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: must be an integer or none")
    return value


def spec_from_args(args: dict) -> ModelSpec:
    """A ModelSpec from lm-eval model arguments (already typed by lm-eval's parser)."""
    args = {_SPEC_ALIASES.get(key, key): value for key, value in args.items()}
    gguf = args.pop("gguf", None)
    if gguf not in (None, ""):  # a GGUF file named apart from its folder
        if args.get("pretrained") in (None, ""):
            raise ValueError(f"gguf={gguf}: give its folder as pretrained=FOLDER")
        args["pretrained"] = str(Path(str(args["pretrained"])) / str(gguf))
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    mechanism = args.get("mechanism")
    if mechanism not in (None, "", "standard", "toroidal"):  # its own options are model arguments
        own = [key for key in get_mechanism(str(mechanism)).accepts if key in args and key not in known]
        args["mechanism_options"] = {key: args.pop(key) for key in own}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(
            f"unknown toroidal model argument(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known | {'lambda', 'gguf', *HFLM_OPTIONS, *WRAPPER_OPTIONS}))}"
        )
    for name in ("period", "window", "fusion_rank", "depth", "max_len", "seed"):
        if name in args:
            args[name] = _optional_int(args[name], name)
    if "layers" in args:
        args["layers"] = _layers(args["layers"])
    for name in ("checkpoint", "pretrained", "tokenizer", "fusion", "backend", "attention", "mechanism"):
        if args.get(name) is not None:
            args[name] = str(args[name])
    if args.get("lambda_distance") is not None:
        args["lambda_distance"] = float(args["lambda_distance"])
    return ModelSpec(**{key: value for key, value in args.items() if value is not None})


def _device(value) -> torch.device:
    """auto / cpu / cuda[:N]; a CUDA device this machine lacks falls back to auto, as HFLM does."""
    text = str(value or "auto").strip().lower()
    if text != "auto" and text != "cpu" and not (text.startswith("cuda") and torch.cuda.is_available()):
        text = "auto"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


# --- the model ----------------------------------------------------------------------------------------


class ToroidalLM(HFLM):
    """lm-eval's HFLM around a toroidal (or baseline) model built by `toroidal.longcontext.load_model`."""

    def __init__(
        self,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        dtype: str | None = None,
        loaded: LoadedModel | None = None,
        **args,
    ) -> None:
        hflm_args = {key: args.pop(key) for key in list(args) if key in HFLM_OPTIONS}
        if loaded is None:
            spec_args = dict(args)
            if max_length is not None:
                spec_args.setdefault("max_len", max_length)  # the ring period when none is given
            loaded = load_model(spec_from_args(spec_args))
        elif args:
            raise ValueError(f"unknown ToroidalLM arguments {sorted(args)} next to a loaded model")
        model = loaded.model.to(_device(device))
        if dtype not in (None, "auto"):
            if str(dtype) not in DTYPES:
                raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
            model = model.to(DTYPES[str(dtype)])
        self.loaded = loaded
        super().__init__(
            pretrained=model,
            backend="causal",
            tokenizer=as_hf_tokenizer(loaded.tokenizer),
            batch_size=batch_size if batch_size is not None else 1,
            max_length=max_length,
            **hflm_args,
        )

    def get_model_info(self) -> dict:
        """What lm-eval records about the model (HFLM's own would ask the hub for a revision)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "toroidal_model": self.loaded.describe(),
        }


def build_lm(spec: ModelSpec, **hflm_args) -> ToroidalLM:
    """A ToroidalLM for `spec` (`hflm_args`: device, batch_size, max_length, dtype, HFLM options)."""
    return ToroidalLM(loaded=load_model(spec), **hflm_args)


def register() -> None:
    """Register `toroidal` in lm-eval's model registry (idempotent)."""
    if model_registry.get(MODEL_NAME, None) is None:
        register_model(MODEL_NAME)(ToroidalLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the `toroidal` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run the registered module's copy, not this __main__ one (one class in the registry).
    from toroidal.integrations.lm_eval import main as _main

    _main()
else:
    register()

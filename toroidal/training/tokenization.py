"""Tokenizers of a run: `bytes` (fixed), `bpe:VOCAB` (trained on the training text), `model` (the host's).

Every tokenizer encodes text to a 1D LongTensor without special tokens, decodes ids back,
knows its vocabulary size and pad id, and saves itself into a folder that `load_tokenizer`
reads back (`toroidal_tokenizer.json` names the kind; bpe adds `tokenizer.json`, model
tokenizers their Hugging Face files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.hub import trust_remote_code

KIND_FILE = "toroidal_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>")
_BLOCK_LINES, _BATCH_BLOCKS = 64, 64  # encoding a corpus: lines per block, blocks per call


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <pad>, <bos>, <eos>: nothing to train, nothing unknown."""

    kind = "bytes"
    vocab_size = 256 + len(SPECIALS)
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> torch.Tensor:
        data = bytearray(text.encode("utf-8"))
        if not data:  # frombuffer refuses an empty buffer
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save(self, folder: Path) -> None:
        _write_kind(folder, {"kind": self.kind, "vocab_size": self.vocab_size})


class BpeTokenizer:
    """Byte-level BPE from the `tokenizers` library (GPT-2 style pre-tokenization)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(t) for t in SPECIALS)

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int) -> BpeTokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(lines, trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> torch.Tensor:
        return _encode_lines(text, lambda batch: [e.ids for e in self.tokenizer.encode_batch(batch)])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        _write_kind(folder, {"kind": self.kind, "vocab_size": self.vocab_size})


class ModelTokenizer:
    """A Hugging Face tokenizer (the model's own), used without added special tokens."""

    kind = "model"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> torch.Tensor:
        def encode_batch(batch: list[str]) -> list[list[int]]:
            return self.tokenizer(batch, add_special_tokens=False)["input_ids"]

        return _encode_lines(text, encode_batch)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))
        _write_kind(folder, {"kind": self.kind, "vocab_size": self.vocab_size})


def _encode_lines(text: str, encode_batch) -> torch.Tensor:
    """Encode a corpus in blocks of whole lines, many blocks per call (the tokenizers run them in parallel).

    Blocks start at line starts, where byte-level pre-tokenization splits anyway, so the ids
    are those of encoding the whole text at once (up to how runs of blank lines group).
    """
    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i : i + _BLOCK_LINES]) for i in range(0, len(lines), _BLOCK_LINES)]
    ids: list[int] = []
    for start in range(0, len(blocks), _BATCH_BLOCKS):
        for row in encode_batch(blocks[start : start + _BATCH_BLOCKS]):
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def _write_kind(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KIND_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# --- specs ---------------------------------------------------------------------------------------


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """'bytes', 'bpe:VOCAB', 'model' or 'auto' -> (kind, bpe vocabulary size or None)."""
    text = spec.strip().lower()
    if text in ("bytes", "model", "auto"):
        return text, None
    match = re.fullmatch(r"bpe:(\d+)", text)
    if match:
        vocab = int(match.group(1))
        if vocab < 256 + len(SPECIALS):
            raise SetupError(
                f"tokenizer {spec!r}: a byte-level BPE needs a vocabulary of at least {256 + len(SPECIALS)}",
                "use e.g. --tokenizer bpe:1024",
            )
        return "bpe", vocab
    raise SetupError(
        f"unknown tokenizer {spec!r}", "use --tokenizer bytes, bpe:VOCAB (e.g. bpe:1024) or model"
    )


def load_model_tokenizer(
    source: str, local_only: bool = False, gguf_file: str | None = None
) -> ModelTokenizer:
    """The tokenizer of a local model folder or hub model, or of GGUF file `gguf_file` in folder `source`."""
    from transformers import AutoTokenizer

    options = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code(), local_files_only=local_only, **options
        )
    except Exception as error:  # missing files, corrupt ones (a GGUF's converter raises its own types)
        if not gguf_file and not isinstance(error, (OSError, ValueError)):
            raise
        where = Path(source) / gguf_file if gguf_file else source
        text = str(error).strip()
        raise SetupError(
            f"cannot load the tokenizer of {where}: {text.splitlines()[0] if text else type(error).__name__}",
            "use --tokenizer bytes or bpe:VOCAB",
        ) from None
    return ModelTokenizer(tokenizer)


def load_tokenizer(folder: str | Path):
    """A tokenizer saved with `.save(folder)`."""
    folder = Path(folder)
    try:
        info = json.loads((folder / KIND_FILE).read_text(encoding="utf-8"))
        kind = info["kind"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder} holds no saved tokenizer ({KIND_FILE} is missing)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / KIND_FILE} is corrupt: {error}") from None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer

        try:
            return BpeTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")))
        except Exception as error:  # the Rust library raises its own exception type
            raise CheckpointError(f"cannot read the BPE tokenizer in {folder}: {error}") from None
    if kind == "model":
        try:
            return load_model_tokenizer(str(folder), local_only=True)
        except SetupError as error:
            raise CheckpointError(error.message) from None
    raise CheckpointError(f"{folder / KIND_FILE}: unknown tokenizer kind {kind!r}")

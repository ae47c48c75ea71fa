"""Datasets of a run: token sequences of length seq_len + 1 (inputs [:-1], targets [1:]).

Specs (the `--dataset` option):

    periodic            a random pattern of `data_period` tokens repeated (an in-context copy task)
    sinusoidal          sums of 1-3 random sines quantized to `data_vocab` levels
    passkey             a random number hidden in filler text, asked for at the end
    text:PATH           a local text file (train: first 90%, validation: last 10%)
    code:DIR[:EXT,...]  the source files of a local repository, split by file
    wikitext2           WikiText-2 (raw) from the Hugging Face hub
    hf:NAME[:CONFIG]    any hub dataset with a text column

Evaluation (`EVAL_SPLITS`) scores the held-out part by default: the validation text of text:PATH
and code:DIR, the `test` stream of synthetic data, a hub set's test (else validation) split.

Every sample is a pure function of (seed, split, index), and the training order a pure
function of (seed, step), so a resumed run sees exactly the data an uninterrupted one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from toroidal.runtime.install import missing_module_message
from toroidal.training.errors import SetupError
from toroidal.training.hub import require_hub
from toroidal.training.text_files import (
    code_files,
    load_code_texts,
    parse_code_spec,
    read_code,
    read_text_file,
    split_text,
)

SYNTHETIC = ("periodic", "sinusoidal", "passkey")
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
# `toroidal eval --split`: heldout (what `train` did not train on), all (text only), train.
EVAL_SPLITS = ("heldout", "all", "train")
OFFLINE_TEXT_FIX = (
    "offline, use --dataset text:PATH with a local file (e.g. text:wikitext-2/valid.txt)"
)
SPEC_HELP = "use periodic, sinusoidal, passkey, text:PATH, code:DIR[:EXT,...], wikitext2 or hf:NAME[:CONFIG]"


@dataclass(frozen=True)
class DataSpec:
    kind: str  # periodic | sinusoidal | passkey | text | code | hf
    path: str | None = None  # text, code
    name: str | None = None  # hf
    config: str | None = None  # hf
    extensions: tuple[str, ...] | None = None  # code: None means code_data.DEFAULT_EXTENSIONS

    @property
    def is_text(self) -> bool:
        return self.kind in ("text", "code", "hf")

    def __str__(self) -> str:
        if self.kind == "text":
            return f"text:{self.path}"
        if self.kind == "code":
            return f"code:{self.path}" + (f":{','.join(self.extensions)}" if self.extensions else "")
        if self.kind == "hf":
            return f"hf:{self.name}" + (f":{self.config}" if self.config else "")
        return self.kind


def parse_dataset_spec(spec: str) -> DataSpec:
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind in SYNTHETIC and not rest:
        return DataSpec(kind)
    if kind == "wikitext2" and not rest:
        return DataSpec("hf", name="wikitext", config="wikitext-2-raw-v1")
    if kind == "text" and rest:
        return DataSpec("text", path=rest)
    if kind == "code" and rest:
        path, extensions = parse_code_spec(rest)
        return DataSpec("code", path=path, extensions=extensions)
    if kind == "hf" and rest:
        name, _, config = rest.partition(":")
        if name:
            return DataSpec("hf", name=name, config=config or None)
    raise SetupError(f"unknown dataset {spec!r}", SPEC_HELP)


@dataclass(frozen=True)
class DataOptions:
    seq_len: int = 128
    data_period: int = 8  # periodic: pattern length
    data_vocab: int = 16  # periodic, sinusoidal: token ids 0..data_vocab-1
    passkey_digits: int = 5
    seed: int = 0

    def __post_init__(self):
        check_seed(self.seed)
        if not 1 <= self.passkey_digits <= MAX_PASSKEY_DIGITS:  # keys are drawn as int64
            raise SetupError(
                f"--passkey-digits {self.passkey_digits} is out of range",
                f"use 1 to {MAX_PASSKEY_DIGITS} digits",
            )


MAX_PASSKEY_DIGITS = 18
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise SetupError(f"--seed {seed} is out of range", f"use a seed from 0 to {MAX_SEED}")


# --- seeded randomness -----------------------------------------------------------------------------


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (a cheap, stable mix)."""
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(value)


# --- datasets --------------------------------------------------------------------------------------


class LMDataset:
    """Samples of seq_len + 1 token ids. `size` None: unbounded (synthetic data)."""

    size: int | None = None
    bytes_per_token: float | None = None  # for bits per byte; None when tokens are not text

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def sample(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, indices) -> torch.Tensor:
        return torch.stack([self.sample(int(i)) for i in indices])


class PeriodicDataset(LMDataset):
    """A fresh random pattern per sample, repeated from a random phase: after one period, predictable."""

    def __init__(self, options: DataOptions, split: str):
        super().__init__(options.seq_len)
        self.period, self.vocab = options.data_period, options.data_vocab
        self.key = (options.seed, SPLIT_CODES[split])

    def sample(self, index: int) -> torch.Tensor:
        g = _generator(*self.key, index)
        pattern = torch.randint(0, self.vocab, (self.period,), generator=g)
        phase = int(torch.randint(0, self.period, (1,), generator=g))
        repeats = math.ceil((self.seq_len + 1 + phase) / self.period)
        return pattern.repeat(repeats)[phase : phase + self.seq_len + 1]


class SinusoidalDataset(LMDataset):
    """Sums of 1-3 sines (periods 4-64 tokens, random phases and amplitudes) quantized to `vocab` levels."""

    def __init__(self, options: DataOptions, split: str):
        super().__init__(options.seq_len)
        self.vocab = options.data_vocab
        self.key = (options.seed, SPLIT_CODES[split])

    def sample(self, index: int) -> torch.Tensor:
        g = _generator(*self.key, index)
        parts = int(torch.randint(1, 4, (1,), generator=g))
        periods = 4.0 + 60.0 * torch.rand(parts, generator=g, dtype=torch.float64)
        phases = 2 * math.pi * torch.rand(parts, generator=g, dtype=torch.float64)
        amplitudes = 0.5 + 0.5 * torch.rand(parts, generator=g, dtype=torch.float64)
        t = torch.arange(self.seq_len + 1, dtype=torch.float64)[:, None]
        wave = (amplitudes * torch.sin(2 * math.pi * t / periods + phases)).sum(-1) / amplitudes.sum()
        return torch.round((wave + 1) / 2 * (self.vocab - 1)).long().clamp(0, self.vocab - 1)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


class PasskeyDataset(LMDataset):
    """Filler text with "The pass key is NNNNN." at a random depth, ending in the question and answer.

    Layout (tokens): filler[:a] + key sentence + filler[a:...] + question + answer, exactly
    seq_len + 1 tokens; the answer tokens are the last `answer_length` ones.
    """

    def __init__(self, options: DataOptions, split: str, tokenizer):
        super().__init__(options.seq_len)
        self.digits, self.tokenizer = options.passkey_digits, tokenizer
        self.key = (options.seed, SPLIT_CODES[split])
        self.filler = tokenizer.encode(FILLER * (options.seq_len // 16 + 2))
        self.question = tokenizer.encode(QUESTION)
        ids, _ = self.sample_with_answer(0)  # checks the layout fits seq_len
        self.bytes_per_token = len(tokenizer.decode(ids).encode("utf-8")) / len(ids)

    def passkey(self, index: int) -> str:
        g = _generator(*self.key, index)
        low = 10 ** (self.digits - 1)
        return str(int(torch.randint(low, 10 * low, (1,), generator=g)))

    def sample_with_answer(self, index: int) -> tuple[torch.Tensor, int]:
        key = self.passkey(index)
        key_ids = self.tokenizer.encode(" " + KEY_SENTENCE.format(key=key))
        answer = self.tokenizer.encode(ANSWER.format(key=key))
        fill = self.seq_len + 1 - len(key_ids) - len(self.question) - len(answer)
        if fill < 0:
            raise SetupError(
                f"passkey samples need --seq-len {self.seq_len - fill} or more, got {self.seq_len}",
                "raise --seq-len or lower --passkey-digits",
            )
        g = _generator(*self.key, index, 1)
        depth = int(torch.randint(0, fill + 1, (1,), generator=g))
        parts = [self.filler[:depth], key_ids, self.filler[depth:fill], self.question, answer]
        return torch.cat(parts), len(answer)

    def sample(self, index: int) -> torch.Tensor:
        return self.sample_with_answer(index)[0]


class TextDataset(LMDataset):
    """Consecutive chunks of a token stream (stride seq_len: each token is predicted once)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, n_bytes: int, name: str):
        super().__init__(seq_len)
        self.tokens, self.n_bytes, self.name = tokens, n_bytes, name
        self.size = max(0, (len(tokens) - 1) // seq_len)
        self.bytes_per_token = n_bytes / max(1, len(tokens))
        if self.size == 0:
            raise SetupError(
                f"{name} has {len(tokens)} tokens, too few for one sample of --seq-len {seq_len}",
                "use a longer text or a shorter --seq-len",
            )

    def sample(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def at_seq_len(self, seq_len: int) -> TextDataset:
        """The same token stream in chunks of `seq_len` (tokenized once, scored at several lengths)."""
        return TextDataset(self.tokens, seq_len, self.n_bytes, self.name)


# --- text sources ----------------------------------------------------------------------------------


def _join_rows(rows) -> str:
    return "".join(row if row.endswith("\n") else row + "\n" for row in rows if isinstance(row, str))


def _hub_texts(spec: DataSpec) -> dict[str, str]:
    """Every split of a hub dataset as one text (rows joined by newlines)."""
    label = "--dataset wikitext2" if spec.name == "wikitext" else f"--dataset {spec}"
    require_hub(label, OFFLINE_TEXT_FIX)
    try:
        import datasets
    except ImportError:
        raise SetupError(f"{label} {missing_module_message('datasets')}") from None
    try:
        loaded = datasets.load_dataset(spec.name, spec.config)
    except Exception as error:  # network, unknown name, bad config: all one line for the user
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SetupError(f"cannot load {label}: {message}", OFFLINE_TEXT_FIX) from None
    texts = {}
    for split, table in loaded.items():
        columns = [
            name for name, feature in table.features.items() if getattr(feature, "dtype", "") == "string"
        ]
        if not columns:
            raise SetupError(f"{label} has no text column", "use a dataset with a 'text' column")
        texts[split] = _join_rows(table["text" if "text" in columns else columns[0]])
    return texts


def _pick(texts: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((texts[name] for name in names if name in texts), None)


def load_train_texts(spec: DataSpec) -> dict[str, str]:
    """{'train': ..., 'validation': ...} for a text dataset."""
    if spec.kind == "text":
        train, validation = split_text(read_text_file(spec.path))
        return {"train": train, "validation": validation}
    if spec.kind == "code":
        return load_code_texts(spec.path, spec.extensions)
    texts = _hub_texts(spec)
    train = _pick(texts, ("train",)) or next(iter(texts.values()))
    validation = _pick(texts, ("validation", "valid", "test"))
    if validation is None:
        train, validation = split_text(train)
    return {"train": train, "validation": validation}


def check_eval_split(spec: DataSpec, split: str) -> None:
    """SetupError for an unknown `--split`, or `all` of an endless synthetic stream."""
    if split not in EVAL_SPLITS:
        raise SetupError(f"--split {split!r} is not one of {', '.join(EVAL_SPLITS)}")
    if split == "all" and not spec.is_text:
        raise SetupError(
            f"--split all: {spec} is an endless stream", "use --split heldout (its test stream) or train"
        )


def synthetic_eval_split(split: str) -> str:
    """The stream a synthetic dataset's evaluation reads: `test` for heldout, else `train`."""
    return "train" if split == "train" else "test"


def eval_text(spec: DataSpec, split: str = "heldout") -> tuple[str, str]:
    """(text, the split's name) of a text dataset for `split` (EVAL_SPLITS).

    heldout: the validation text `train` held out (text:PATH, code:DIR), a hub set's test (else
    validation) split; train: what `train` trained on; all: the whole file, every file or split.
    """
    check_eval_split(spec, split)
    if not spec.is_text:
        raise ValueError(f"{spec} is not a text dataset: it has no text to load")
    if spec.kind == "text" and split == "all":
        return read_text_file(spec.path), "all"
    if spec.kind == "code" and split == "all":
        return read_code(code_files(spec.path, spec.extensions)), "all"
    if spec.kind in ("text", "code") or split == "train":
        texts = load_train_texts(spec)
        return (texts["train"], "train") if split == "train" else (texts["validation"], "heldout")
    texts = _hub_texts(spec)
    if split == "all":
        return "".join(texts.values()), "all"
    name = next((name for name in ("test", "validation", "valid") if name in texts), None)
    if name is not None:
        return texts[name], name
    train = _pick(texts, ("train",)) or next(iter(texts.values()))
    return split_text(train)[1], "heldout"


def load_eval_text(spec: DataSpec, split: str = "heldout") -> str:
    """The evaluation text of `split` (see `eval_text`): by default what training held out."""
    return eval_text(spec, split)[0]


def passkey_corpus(options: DataOptions, samples: int = 256) -> list[str]:
    """Passkey-style text lines to train a BPE tokenizer on (filler, key sentences, questions)."""
    lines = [FILLER]
    for index in range(samples):
        g = _generator(options.seed, 99, index)
        key = str(int(torch.randint(0, 10**options.passkey_digits, (1,), generator=g)))
        lines.append(KEY_SENTENCE.format(key=key) + QUESTION + ANSWER.format(key=key) + "\n")
    return lines


# --- building --------------------------------------------------------------------------------------


def _check_synthetic_vocab(spec: DataSpec, options: DataOptions, tokenizer) -> None:
    if spec.kind in ("periodic", "sinusoidal") and options.data_vocab > tokenizer.vocab_size:
        raise SetupError(
            f"--data-vocab {options.data_vocab} exceeds the tokenizer's vocabulary ({tokenizer.vocab_size})",
            f"use --data-vocab {tokenizer.vocab_size} or less",
        )


def make_dataset(spec: DataSpec, options: DataOptions, split: str, tokenizer, text: str | None = None):
    """One split of a dataset; text datasets take their (already loaded) text."""
    _check_synthetic_vocab(spec, options, tokenizer)
    if spec.kind == "periodic":
        return PeriodicDataset(options, split)
    if spec.kind == "sinusoidal":
        return SinusoidalDataset(options, split)
    if spec.kind == "passkey":
        return PasskeyDataset(options, split, tokenizer)
    tokens = tokenizer.encode(text)
    return TextDataset(tokens, options.seq_len, len(text.encode("utf-8")), f"the {split} split of {spec}")


# --- order ------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=_generator(seed, 7, epoch))


def sample_index(dataset: LMDataset, position: int, seed: int) -> int:
    """The dataset index at `position` of the training stream: reshuffled every epoch, by seed."""
    if dataset.size is None:
        return position
    epoch, offset = divmod(position, dataset.size)
    return int(_permutation(dataset.size, seed, epoch)[offset])


def train_batch(
    dataset, seed: int, step: int, micro: int, grad_accum: int, batch_size: int, rank: int, world: int
):
    """The micro-batch `micro` of optimizer step `step` on `rank`.

    Positions are laid out so that the samples of one optimizer step are the same for any
    split into ranks and micro-batches (e.g. 2 ranks x 2 = 1 rank x 4 = 2 micro-batches x 2).
    """
    first = ((step * grad_accum + micro) * world + rank) * batch_size
    return dataset.batch(sample_index(dataset, first + i, seed) for i in range(batch_size))

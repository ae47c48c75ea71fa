"""Generated pass-key and needle-in-a-haystack documents, `context_tokens` long in the model's tokenizer.

A pure function of (seed, index), so every model sees the same documents; lm-eval calls the
`*_dataset` functions from the task YAMLs in configs/tasks/toroidal. Document fields: input,
target, continuation (" " + key), context_tokens, depth (0 = start, 1 = end).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from toroidal.training.data import FILLER, DataOptions, PasskeyDataset
from toroidal.training.errors import SetupError

NEEDLE = " One of the special magic numbers for {word} is: {number}."
NEEDLE_QUESTION = " What is the special magic number for {word}? The special magic number for {word} is"
_WORD_LIST = (
    "apple anchor badger beacon cactus canyon dolphin ember falcon fjord garnet glacier harbor hazel "
    "iris jasper kettle lantern maple meadow nectar nickel orchid otter pepper quartz raven saffron "
    "tundra umber velvet walnut willow yarrow zephyr cobalt lagoon marble pebble thistle"
)
WORDS = tuple(_WORD_LIST.split())  # the keys of needles
DEPTH_STEPS = 11  # needle depths 0%, 10%, ..., 100%, in turn
SPLIT = "test"  # the passkey stream training never sees


@lru_cache(maxsize=8)
def _tokenizer(checkpoint: str | None, pretrained: str | None, tokenizer: str | None):
    from toroidal.training.loading import load_tokenizer_for

    return load_tokenizer_for(checkpoint, pretrained, tokenizer)


def tokenizer_from_metadata(metadata: dict):
    """The tokenizer named by lm-eval metadata (the model arguments); bytes when none is named."""
    pretrained = metadata.get("pretrained") or metadata.get("model")
    tokenizer = metadata.get("tokenizer")
    return _tokenizer(
        _text(metadata.get("checkpoint")), _text(pretrained), _text(tokenizer) if tokenizer else None
    )


def _text(value) -> str | None:
    return None if value in (None, "") else str(value)


def _number(g: torch.Generator, digits: int) -> str:
    low = 10 ** (digits - 1)
    return str(int(torch.randint(low, 10 * low, (1,), generator=g)))


# --- documents ----------------------------------------------------------------------------------------


def passkey_docs(tokenizer, context_tokens: int, num_docs: int, seed: int = 0, digits: int = 5) -> list[dict]:
    """The training passkey layout (toroidal.training.data.PasskeyDataset) at `context_tokens` tokens."""
    options = DataOptions(seq_len=context_tokens - 1, passkey_digits=digits, seed=seed)
    try:
        dataset = PasskeyDataset(options, SPLIT, tokenizer)
    except SetupError:
        raise SetupError(
            f"passkey samples do not fit in {context_tokens} tokens", "choose longer --lengths"
        ) from None
    docs = []
    for index in range(num_docs):
        ids, answer = dataset.sample_with_answer(index)
        key = dataset.passkey(index)
        docs.append(_doc(tokenizer.decode(ids[:-answer]), key, context_tokens, depth=None))
    return docs


def _doc(prompt: str, key: str, context_tokens: int, depth: float | None) -> dict:
    return {
        "input": prompt,
        "target": key,
        "continuation": " " + key,
        "context_tokens": context_tokens,
        "depth": depth,
    }


def needle_docs(
    tokenizer, context_tokens: int, num_docs: int, seed: int = 0, needles: int = 1, digits: int = 7
) -> list[dict]:
    """`needles` sentences "One of the special magic numbers for WORD is: N." in filler; one is asked for.

    The asked needle's depth steps through 0%, 10%, ..., 100%; the others (distractors
    with other words) sit at random depths.
    """
    filler = tokenizer.encode(FILLER * (context_tokens // 16 + 2))
    docs = []
    for index in range(num_docs):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + needles) * 1_000_003 + index) % 2**63)
        words = [WORDS[int(i)] for i in torch.randperm(len(WORDS), generator=g)[:needles]]
        numbers = [_number(g, digits) for _ in words]
        depths = [(index % DEPTH_STEPS) / (DEPTH_STEPS - 1)]
        depths += [float(torch.rand(1, generator=g)) for _ in words[1:]]
        inserts = [
            tokenizer.encode(NEEDLE.format(word=w, number=n)) for w, n in zip(words, numbers, strict=True)
        ]
        question = tokenizer.encode(NEEDLE_QUESTION.format(word=words[0]))
        answer = tokenizer.encode(" " + numbers[0])
        budget = context_tokens - len(question) - len(answer) - sum(len(ids) for ids in inserts)
        if budget < 0:
            raise SetupError(
                f"needle samples with {needles} needle(s) need more than {context_tokens} tokens",
                "choose longer --lengths",
            )
        haystack = filler[:budget]
        cuts = sorted(zip((round(d * budget) for d in depths), range(needles), strict=True))
        pieces, start = [], 0
        for cut, which in cuts:
            pieces += [haystack[start:cut], inserts[which]]
            start = cut
        pieces += [haystack[start:], question]
        prompt = tokenizer.decode(torch.cat(pieces))
        docs.append(_doc(prompt, numbers[0], context_tokens, depth=depths[0]))
    return docs


# --- lm-eval entry points (custom_dataset) --------------------------------------------------------------


def _as_dataset(docs: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _check(context_tokens, num_docs) -> tuple[int, int]:
    for name, value in (("context_tokens", context_tokens), ("num_docs", num_docs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SetupError(f"task dataset_kwargs {name}={value!r}: must be a positive integer")
    return context_tokens, num_docs


def passkey_dataset(
    context_tokens: int, num_docs: int = 100, data_seed: int = 0, key_digits: int = 5, **metadata
):
    """custom_dataset of the passkey tasks."""
    context_tokens, num_docs = _check(context_tokens, num_docs)
    tokenizer = tokenizer_from_metadata(metadata)
    return _as_dataset(passkey_docs(tokenizer, context_tokens, num_docs, data_seed, key_digits))


def needle_dataset(
    context_tokens: int,
    num_docs: int = 100,
    data_seed: int = 0,
    needles: int = 1,
    key_digits: int = 7,
    **metadata,
):
    """custom_dataset of the needle tasks (`needles` > 1: distractor needles with other words)."""
    context_tokens, num_docs = _check(context_tokens, num_docs)
    tokenizer = tokenizer_from_metadata(metadata)
    return _as_dataset(needle_docs(tokenizer, context_tokens, num_docs, data_seed, needles, key_digits))

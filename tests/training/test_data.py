"""Training data and tokenizers: dataset specs, synthetic samples, passkey layout, text splits, order."""

from __future__ import annotations

import pytest
import torch

from toroidal.training.data import (
    DataOptions,
    PasskeyDataset,
    PeriodicDataset,
    SinusoidalDataset,
    TextDataset,
    load_eval_text,
    load_train_texts,
    make_dataset,
    parse_dataset_spec,
    split_text,
    train_batch,
)
from toroidal.training.errors import CheckpointError, SetupError
from toroidal.training.tokenization import (
    BpeTokenizer,
    ByteTokenizer,
    load_tokenizer,
    parse_tokenizer_spec,
)

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7}.\n" for i in range(400))


@pytest.fixture
def offline(monkeypatch):
    """The hub is never reached from tests: offline mode makes the probe answer at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- specs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "detail"),
    [
        ("periodic", "periodic", None),
        ("Sinusoidal", "sinusoidal", None),
        ("passkey", "passkey", None),
        ("text:../data/a.txt", "text", "../data/a.txt"),
        ("text:C:/odd:name.txt", "text", "C:/odd:name.txt"),
        ("wikitext2", "hf", "wikitext"),
        ("hf:roneneldan/TinyStories", "hf", "roneneldan/TinyStories"),
    ],
)
def test_dataset_specs(spec, kind, detail):
    parsed = parse_dataset_spec(spec)
    assert parsed.kind == kind
    assert detail in (None, parsed.path, parsed.name)


def test_hf_spec_with_config():
    spec = parse_dataset_spec("hf:wikitext:wikitext-103-raw-v1")
    assert (spec.name, spec.config, str(spec)) == (
        "wikitext",
        "wikitext-103-raw-v1",
        "hf:wikitext:wikitext-103-raw-v1",
    )


@pytest.mark.parametrize("spec", ["", "imagenet", "text:", "hf:", "periodic:3", "wikitext2:x"])
def test_bad_dataset_specs_name_the_choices(spec):
    with pytest.raises(SetupError) as caught:
        parse_dataset_spec(spec)
    assert "text:PATH" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "parsed"), [("bytes", ("bytes", None)), ("BPE:512", ("bpe", 512)), ("model", ("model", None))]
)
def test_tokenizer_specs(spec, parsed):
    assert parse_tokenizer_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["bpe", "bpe:12", "bpe:x", "sentencepiece"])
def test_bad_tokenizer_specs(spec):
    with pytest.raises(SetupError):
        parse_tokenizer_spec(spec)


# --- synthetic data --------------------------------------------------------------------------------


def test_periodic_samples_repeat_with_their_period():
    data = PeriodicDataset(DataOptions(seq_len=64, data_period=5, data_vocab=16), "train")
    for index in range(5):
        ids = data.sample(index)
        assert ids.shape == (65,) and int(ids.max()) < 16
        assert torch.equal(ids[5:], ids[:-5])
    assert not torch.equal(data.sample(0), data.sample(1))
    assert torch.equal(data.sample(3), data.sample(3))  # a pure function of the index


def test_splits_and_seeds_give_different_samples():
    options = DataOptions(seq_len=32)
    train, val = PeriodicDataset(options, "train"), PeriodicDataset(options, "validation")
    other_seed = PeriodicDataset(DataOptions(seq_len=32, seed=1), "train")
    assert not torch.equal(train.sample(0), val.sample(0))
    assert not torch.equal(train.sample(0), other_seed.sample(0))


def test_sinusoidal_samples_are_quantized_waves():
    data = SinusoidalDataset(DataOptions(seq_len=128, data_vocab=32), "train")
    ids = data.batch(range(8))
    assert ids.shape == (8, 129) and int(ids.min()) >= 0 and int(ids.max()) < 32
    # A wave moves in small steps: neighbouring tokens are close (unlike uniform noise).
    assert (ids[:, 1:] - ids[:, :-1]).abs().float().mean() < 6


def test_passkey_sample_hides_the_key_and_ends_with_its_answer():
    tokenizer = ByteTokenizer()
    data = PasskeyDataset(DataOptions(seq_len=200, passkey_digits=5), "train", tokenizer)
    keys = set()
    for index in range(6):
        ids, answer = data.sample_with_answer(index)
        key = data.passkey(index)
        keys.add(key)
        text = tokenizer.decode(ids)
        assert ids.shape == (201,) and len(key) == 5
        assert f"The pass key is {key}. Remember it." in text
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        assert tokenizer.decode(ids[-answer:]) == f" {key}"
        assert text.count(key) == 3  # twice in the hidden sentence, once as the answer
    assert len(keys) > 1
    depths = {tokenizer.decode(data.sample(i)).index("The pass key") for i in range(6)}
    assert len(depths) > 1  # the key sits at random depths


def test_passkey_with_a_bpe_tokenizer_keeps_the_answer_tokens_apart():
    tokenizer = BpeTokenizer.train(TEXT.splitlines(keepends=True), 300)
    data = PasskeyDataset(DataOptions(seq_len=120, passkey_digits=4), "test", tokenizer)
    ids, answer = data.sample_with_answer(2)
    assert len(ids) == 121
    assert tokenizer.decode(ids[-answer:]).strip() == data.passkey(2)


def test_passkey_too_short_for_the_sequence_says_how_long():
    with pytest.raises(SetupError, match="--seq-len"):
        PasskeyDataset(DataOptions(seq_len=20), "train", ByteTokenizer())


def test_synthetic_vocab_must_fit_the_tokenizer():
    with pytest.raises(SetupError, match="--data-vocab"):
        make_dataset(parse_dataset_spec("periodic"), DataOptions(data_vocab=300), "train", ByteTokenizer())


# --- text --------------------------------------------------------------------------------------------


def test_text_file_splits_at_a_line_into_train_and_last_tenth(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    texts = load_train_texts(parse_dataset_spec(f"text:{path}"))
    assert texts["train"] + texts["validation"] == TEXT
    assert texts["train"].endswith("\n") and texts["validation"].startswith("Line ")
    assert 0.08 < len(texts["validation"]) / len(TEXT) < 0.12
    spec = parse_dataset_spec(f"text:{path}")
    assert load_eval_text(spec) == texts["validation"]  # eval: what train held out, by default
    assert load_eval_text(spec, "all") == TEXT and load_eval_text(spec, "train") == texts["train"]
    with pytest.raises(SetupError, match="endless stream"):
        load_eval_text(parse_dataset_spec("periodic"), "all")


def test_text_dataset_chunks_cover_the_stream_once():
    tokens = torch.arange(1000)
    data = TextDataset(tokens, seq_len=100, n_bytes=2000, name="x")
    assert data.size == 9 and data.bytes_per_token == 2.0
    assert torch.equal(data.sample(0), torch.arange(101)) and torch.equal(
        data.sample(1)[0], torch.tensor(100)
    )


def test_text_too_short_for_one_sample():
    with pytest.raises(SetupError, match="too few"):
        TextDataset(torch.arange(10), seq_len=64, n_bytes=10, name="the validation split of text:x")


def test_missing_text_file_is_a_setup_error(tmp_path):
    with pytest.raises(SetupError, match="does not exist"):
        load_train_texts(parse_dataset_spec(f"text:{tmp_path / 'nope.txt'}"))
    with pytest.raises(SetupError, match="is a folder"):
        load_eval_text(parse_dataset_spec(f"text:{tmp_path}"))


def test_split_text_without_newlines():
    train, val = split_text("x" * 100)
    assert (len(train), len(val)) == (90, 10)


@pytest.mark.parametrize("spec", ["wikitext2", "hf:someone/stories:default"])
def test_hub_datasets_offline_name_the_local_alternative(offline, spec):
    with pytest.raises(SetupError) as caught:
        load_train_texts(parse_dataset_spec(spec))
    message = str(caught.value)
    assert "not reachable" in message and "text:" in message and "\n" not in message


# --- order -------------------------------------------------------------------------------------------


def test_a_step_sees_the_same_samples_for_any_split_into_ranks_and_micro_batches():
    data = TextDataset(torch.arange(5000), seq_len=10, n_bytes=5000, name="x")  # finite: shuffled epochs
    step = 37  # several epochs in

    def samples(accum, batch, world):
        parts = [
            train_batch(data, 3, step, micro, accum, batch, rank, world)
            for micro in range(accum)
            for rank in range(world)
        ]
        return sorted(map(tuple, torch.cat(parts).tolist()))

    single = samples(1, 8, 1)
    assert samples(2, 4, 1) == single and samples(1, 4, 2) == single and samples(2, 2, 2) == single


def test_each_epoch_visits_every_chunk_once_in_a_seeded_order():
    data = TextDataset(torch.arange(161), seq_len=10, n_bytes=161, name="x")  # 16 chunks
    first = torch.cat([train_batch(data, 0, step, 0, 1, 4, 0, 1)[:, 0] for step in range(4)])
    assert sorted(first.tolist()) == list(range(0, 160, 10))
    again = torch.cat([train_batch(data, 0, step, 0, 1, 4, 0, 1)[:, 0] for step in range(4)])
    other = torch.cat([train_batch(data, 1, step, 0, 1, 4, 0, 1)[:, 0] for step in range(4)])
    assert torch.equal(first, again) and not torch.equal(first, other)


# --- tokenizers --------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip(tmp_path):
    tokenizer = ByteTokenizer()
    text = "héllo, torus ⊗\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < 256 and tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 259 and tokenizer.pad_id == 256
    tokenizer.save(tmp_path / "tok")
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)


def test_bpe_tokenizer_trains_saves_and_loads(tmp_path):
    tokenizer = BpeTokenizer.train(TEXT.splitlines(keepends=True), 400)
    assert tokenizer.vocab_size <= 400 and tokenizer.pad_id is not None
    ids = tokenizer.encode(TEXT[:500])
    assert len(ids) < 250  # merges learned: fewer tokens than bytes
    assert tokenizer.decode(ids) == TEXT[:500]
    tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, BpeTokenizer) and loaded.vocab_size == tokenizer.vocab_size
    assert torch.equal(loaded.encode(TEXT), tokenizer.encode(TEXT))
    again = BpeTokenizer.train(TEXT.splitlines(keepends=True), 400)
    assert torch.equal(again.encode(TEXT), tokenizer.encode(TEXT))  # deterministic training


def test_corrupt_or_missing_tokenizer_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "toroidal_tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "toroidal_tokenizer.json").write_text('{"kind": "bpe"}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="BPE"):
        load_tokenizer(tmp_path)

"""Tests of flaxalign.data.tokenizer: training, saving, loading, round trips."""

import os

import pytest

from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.errors import DataError

SAMPLES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "    def f(x):\n\treturn x ** 2  # indented code, tabs and 12345 digits\n",
    "  leading and trailing spaces, double  spaces  ",
    "unseen characters: ü, 日本語, 🙂, \x00 and \r\n line ends",
    "",
]


@pytest.fixture(scope="module")
def documents():
    return stdlib_corpus(max_chars=300_000)


@pytest.fixture(scope="module")
def tokenizer(documents, tmp_path_factory):
    model_path = tmp_path_factory.mktemp("tok") / "sub" / "tokenizer.model"
    return Tokenizer.train(documents, str(model_path), vocab_size=512)


def test_train_save_load_round_trips_text(tokenizer, documents):
    loaded = Tokenizer.load(tokenizer.model_path)
    assert loaded.vocab_size == 512
    for text in SAMPLES + documents[:50]:
        ids = loaded.encode(text)
        assert loaded.decode(ids) == text
        assert ids == tokenizer.encode(text)


def test_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    ids = tokenizer.encode("hello world")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    # Byte fallback: unseen characters never become unk.
    assert tokenizer.unk_id not in tokenizer.encode("日本語 🙂")


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(text) for text in SAMPLES]


def test_digits_are_split(tokenizer):
    ids = tokenizer.encode("2024")
    assert len(ids) == 4


def test_training_is_deterministic(documents, tmp_path, tokenizer):
    again = Tokenizer.train(documents, str(tmp_path / "again.model"), vocab_size=512)
    with open(tokenizer.model_path, "rb") as first, open(again.model_path, "rb") as second:
        assert first.read() == second.read()


def test_model_file_is_written_atomically(tokenizer):
    folder = os.path.dirname(tokenizer.model_path)
    assert os.listdir(folder) == ["tokenizer.model"]  # no temporary file left behind


def test_user_defined_symbols_are_single_pieces(documents, tmp_path):
    tokenizer = Tokenizer.train(
        documents[:200], str(tmp_path / "sym.model"), vocab_size=400,
        user_defined_symbols=["<|user|>"],
    )
    assert len(tokenizer.encode("<|user|>")) == 1


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(DataError, match="tokenizer model '.*missing.model' does not exist"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a valid SentencePiece model"):
        Tokenizer.load(str(bad))


def test_impossible_vocab_sizes(tmp_path):
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        Tokenizer.train(["some text"], str(tmp_path / "a.model"), vocab_size=100)
    with pytest.raises(DataError, match="Vocabulary size too high"):
        Tokenizer.train(["tiny corpus"], str(tmp_path / "b.model"), vocab_size=5000)
    assert not (tmp_path / "b.model").exists()
    many_characters = "".join(chr(code) for code in range(0x4E00, 0x4E00 + 200))
    with pytest.raises(DataError, match="vocab_size 300 is too small .* needs at least 4"):
        Tokenizer.train([many_characters], str(tmp_path / "c.model"), vocab_size=300)


def test_chat_symbols_are_single_ids_in_text(documents, tmp_path):
    tokenizer = Tokenizer.train(
        documents[:200], str(tmp_path / "chat.model"), vocab_size=400,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
    )
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    assert (start, end) == (4, 5)  # right after pad, unk, bos, eos
    ids = tokenizer.encode("<|im_start|>user\nHi there<|im_end|>\n")
    assert ids[0] == start and ids.count(end) == 1
    assert ids == [start] + tokenizer.encode("user\nHi there") + [end] + tokenizer.encode("\n")
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n"
    assert Tokenizer.load(tokenizer.model_path).token_to_id("<|im_end|>") == end


def test_token_to_id(tokenizer):
    assert tokenizer.token_to_id("</s>") == tokenizer.eos_id
    assert tokenizer.token_to_id("<unk>") == tokenizer.unk_id
    assert tokenizer.token_to_id("<|im_start|>") is None
    assert tokenizer.encode("\n") == [tokenizer.token_to_id("<0x0A>")]  # a byte-fallback piece


def test_models_without_a_distinct_pad_are_refused(tmp_path):
    import sentencepiece as spm

    model_prefix = str(tmp_path / "foreign")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a small corpus of words", "more words here"]), model_prefix=model_prefix,
        vocab_size=20, pad_id=-1, minloglevel=2,
    )
    with pytest.raises(DataError, match=r"tokenizer model '.*foreign.model' needs an EOS id and a different pad id"):
        Tokenizer.load(model_prefix + ".model")

"""Tests of flaxalign.data.tokenizer.HFTokenizer and load_tokenizer on small tokenizer.json files built offline."""

import json
import logging

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from flaxalign.errors import DataError
from flaxalign.generate import decode_responses

# Llama-3's pre-tokenizer split pattern (from its tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>",
]
SAMPLES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "    def f(x):\n\treturn x ** 2  # indented code, tabs and 12345 digits\n",
    "  leading and trailing spaces, double  spaces  \n\n\nblank lines",
    "unseen characters: ü, 日本語, 🙂, \x00 and \r\n line ends",
    "",
]


def training_documents():
    """A few dozen KB of real English and code (Python's own docs)."""
    return stdlib_corpus(max_chars=60_000)


def build_hf_tokenizer(path, documents, *, style="llama3", vocab_size=600, special_tokens=CHAT_TOKENS):
    """Trains a byte-level BPE tokenizer.json like Llama-3's ("llama3") or GPT-2/SmolLM's ("gpt2")."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    if style == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return str(path)


def write_config(folder, name="tokenizer_config.json", **values):
    (folder / name).write_text(json.dumps(values))


@pytest.fixture(scope="module")
def documents():
    return training_documents()


@pytest.fixture(scope="module")
def hf_dir(documents, tmp_path_factory):
    """A Llama-3-like folder: tokenizer.json and a tokenizer_config.json without a pad."""
    folder = tmp_path_factory.mktemp("hf")
    build_hf_tokenizer(folder / "tokenizer.json", documents)
    write_config(folder, bos_token="<|begin_of_text|>", eos_token={"content": "<|eot_id|>", "special": True},
                 pad_token=None)
    return folder


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFTokenizer(str(hf_dir / "tokenizer.json"))


def test_ids_equal_the_tokenizers_library(hf, hf_dir, documents):
    reference = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    texts = SAMPLES + [document[:2000] for document in documents] + ["<|im_start|>user\nHi<|im_end|>\n"]
    for text in texts:
        assert hf.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert hf.encode_batch(texts) == [hf.encode(text) for text in texts]


def test_decode_round_trips_text(hf, documents):
    for text in SAMPLES + documents:
        assert hf.decode(hf.encode(text)) == text
    assert hf.decode(np.array(hf.encode("numpy ids"), np.int32)) == "numpy ids"


def test_decode_responses_batches_what_decode_gives_row_by_row(hf, documents, tmp_path):
    """Both tokenizer kinds: `decode_batch` equals `decode` per row, and `decode_responses` keeps the masked tokens
    before the first EOS (EOS itself and what follows the mask drop out)."""
    sentencepiece = Tokenizer.train(documents, str(tmp_path / "sp.model"), vocab_size=400)
    for tokenizer in (hf, sentencepiece):
        rows = [tokenizer.encode(text)[:12] for text in SAMPLES[:3] + ["a"]]
        assert tokenizer.decode_batch(rows) == [tokenizer.decode(row) for row in rows]
        assert tokenizer.decode_batch([]) == []
        response = np.full((4, 14), tokenizer.pad_id, np.int32)
        mask = np.zeros((4, 14), np.int32)
        for i, row in enumerate(rows):
            response[i, :len(row)], response[i, len(row)] = row, tokenizer.eos_id
            mask[i, :len(row) + 1] = 1
        mask[3, 0] = 0  # a masked-out token is not decoded
        texts = decode_responses(tokenizer, response, mask)
        assert texts == [tokenizer.decode(row) for row in rows[:3]] + [""]


def test_special_tokens_are_single_ids(hf):
    for token in CHAT_TOKENS:
        token_id = hf.token_to_id(token)
        assert token_id is not None
        assert hf.encode(token) == [token_id]
        assert hf.encode(f"a{token}b") == hf.encode("a") + [token_id] + hf.encode("b")
    assert hf.decode([hf.token_to_id("<|im_end|>")]) == "<|im_end|>"
    assert hf.token_to_id("<|not a token|>") is None


def test_special_ids_come_from_tokenizer_config(hf):
    assert hf.bos_id == hf.token_to_id("<|begin_of_text|>")
    assert hf.eos_id == hf.token_to_id("<|eot_id|>")
    assert hf.unk_id is None  # byte-level BPE has no unk
    assert hf.bos_id not in hf.encode("hello") and hf.eos_id not in hf.encode("hello")


def test_pad_is_added_when_missing(hf, caplog, hf_dir):
    assert hf.token_to_id("<|pad|>") == 600 == hf.pad_id
    assert hf.vocab_size == 601
    assert hf.pad_id != hf.eos_id
    with caplog.at_level(logging.INFO):
        HFTokenizer(str(hf_dir / "tokenizer.json"))
    notices = [record.getMessage() for record in caplog.records if "<|pad|>" in record.getMessage()]
    assert len(notices) == 1 and "no pad token distinct from EOS" in notices[0]


def test_pad_equal_to_eos_is_replaced(hf_dir, tmp_path, documents):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents[:5], vocab_size=400)
    write_config(tmp_path, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    tokenizer = HFTokenizer(path)
    assert tokenizer.eos_id == tokenizer.token_to_id("<|end_of_text|>")
    assert tokenizer.pad_id == 400 and tokenizer.vocab_size == 401
    assert tokenizer.bos_id is None


def test_existing_distinct_pad_is_kept(hf_dir, tmp_path, documents):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents[:5], vocab_size=400)
    write_config(tmp_path, eos_token="<|eot_id|>", pad_token="<|end_of_text|>", bos_token="<|eot_id|>")
    # special_tokens_map.json overrides tokenizer_config.json, like in transformers.
    write_config(tmp_path, "special_tokens_map.json", bos_token={"content": "<|begin_of_text|>"})
    tokenizer = HFTokenizer(path)
    assert tokenizer.pad_id == tokenizer.token_to_id("<|end_of_text|>")
    assert tokenizer.bos_id == tokenizer.token_to_id("<|begin_of_text|>")
    assert tokenizer.vocab_size == 400


def test_constructor_arguments_override_files(hf_dir):
    tokenizer = HFTokenizer(str(hf_dir / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|end_of_text|>")
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.pad_id == tokenizer.token_to_id("<|end_of_text|>")
    assert tokenizer.bos_id == tokenizer.token_to_id("<|begin_of_text|>")  # still from the file


def test_no_config_needs_an_eos_argument(tmp_path, documents):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents[:5], vocab_size=400)
    with pytest.raises(DataError, match=r"tokenizer '.*tokenizer.json' has no known EOS token"):
        HFTokenizer(path)
    tokenizer = HFTokenizer(path, eos_token="<|end_of_text|>")
    assert (tokenizer.bos_id, tokenizer.unk_id) == (None, None)
    assert tokenizer.pad_id == 400


def test_unknown_special_tokens_name_their_source(tmp_path, documents):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents[:5], vocab_size=400)
    with pytest.raises(DataError, match=r"eos_token '</s>' from the eos_token argument is not a token of"):
        HFTokenizer(path, eos_token="</s>")
    write_config(tmp_path, eos_token="<eos>")
    with pytest.raises(DataError, match=r"eos_token '<eos>' from '.*tokenizer_config.json' is not a token"):
        HFTokenizer(path)
    write_config(tmp_path, eos_token=["<eos>"])
    with pytest.raises(DataError, match=r"eos_token in tokenizer config '.*tokenizer_config.json' is neither"):
        HFTokenizer(path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer config '.*tokenizer_config.json' is not readable JSON"):
        HFTokenizer(path)


def test_padding_and_truncation_in_the_file_are_ignored(tmp_path, documents):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents[:5], vocab_size=400)
    reference = tokenizers.Tokenizer.from_file(path)
    reference.enable_truncation(4)
    reference.enable_padding(length=64)
    reference.save(path)
    tokenizer = HFTokenizer(path, eos_token="<|eot_id|>")
    assert len(tokenizer.encode("a somewhat longer sentence than four tokens")) > 4
    assert len(tokenizer.encode_batch(["hi"])[0]) < 64


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer file '.*missing.json' does not exist"):
        HFTokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"tokenizer file '.*bad.json' is not a valid tokenizer.json"):
        HFTokenizer(str(bad))


def test_load_tokenizer_picks_the_class(hf_dir, tmp_path, documents):
    assert isinstance(load_tokenizer(str(hf_dir)), HFTokenizer)
    assert isinstance(load_tokenizer(str(hf_dir / "tokenizer.json")), HFTokenizer)
    assert load_tokenizer(str(hf_dir), eos_token="<|im_end|>").eos_id == 6
    model_path = str(tmp_path / "sp.model")
    Tokenizer.train(documents[:50], model_path, vocab_size=400)
    assert isinstance(load_tokenizer(model_path), Tokenizer)
    with pytest.raises(DataError, match=r"tokenizer '.*nothing.model' does not exist"):
        load_tokenizer(str(tmp_path / "nothing.model"))
    with pytest.raises(DataError, match=r"tokenizer folder '.*empty' has no tokenizer.json file"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"tokenizer '.*vocab.txt' is neither a SentencePiece .model file"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def test_pad_is_eos_when_the_model_has_no_embedding_row_for_a_new_pad(tmp_path, documents):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents[:5], vocab_size=400)
    write_config(tmp_path, eos_token="<|end_of_text|>")
    (tmp_path / "config.json").write_text('{"vocab_size": 400}')
    tokenizer = HFTokenizer(path)
    assert tokenizer.pad_id == tokenizer.eos_id and tokenizer.vocab_size == 400
    (tmp_path / "config.json").write_text('{"vocab_size": 416}')  # padded embedding: room for "<|pad|>"
    assert HFTokenizer(path).pad_id == 400

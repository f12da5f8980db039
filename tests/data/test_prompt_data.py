"""Tests of flaxalign.data.prompt_data: exact prompt ids, left truncation and padding, record indices, errors."""

import operator

import ml_collections
import numpy as np
import pytest

from flaxalign.data import embedded, prompt_data
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.prompt_data import (
    build_prompt_datasets,
    prompt_example,
    prompt_texts,
    truncate_prompt_left,
)
from flaxalign.data.sources import validate_record
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.errors import ConfigError, DataError
from tests.data.test_tokenizer_hf import CHAT_TOKENS

SYSTEM = {"role": "system", "content": "Answer briefly."}
QUESTION = {"role": "user", "content": "What is 2 + 3?"}
ANSWER = {"role": "assistant", "content": "The answer is 5."}
FOLLOW_UP = {"role": "user", "content": "And 2 + 4?"}
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer.train(stdlib_corpus(max_chars=60_000), str(path), vocab_size=500,
                           user_defined_symbols=CHAT_TOKENS)


class _NoBosTokenizer:
    """A tokenizer without a bos id (like many HF tokenizers): one id per character."""

    bos_id = None
    eos_id = 1
    pad_id = 0

    def encode(self, text):
        return [ord(char) for char in text]


def _data_cfg(train, eval_spec="", **overrides):
    cfg = {"train": train, "eval": eval_spec, "eval_fraction": 0.25, "max_examples": 0, "chat_template": "chatml"}
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _write(tmp_path, name, records):
    path = str(tmp_path / name)
    embedded.write_jsonl(records, path)
    return path


def _chatml_prompt(tok, messages):
    """The chatml generation prompt encoded by hand."""
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = []
    for message in messages:
        ids += [start] + tok.encode(f"{message['role']}\n{message['content']}") + [end] + tok.encode("\n")
    return ids + [start] + tok.encode("assistant\n")


def _real(row, arrays):
    """The unpadded token ids of one row of a split's arrays."""
    return arrays["input_ids"][row][arrays["attention_mask"][row] == 1].tolist()


def _silent(_):
    pass


# ----------------------------------------------------------------------------
# prompt_example, truncate_prompt_left, prompt_texts


def test_string_prompt_is_bos_then_text(tokenizer):
    for template in ("chatml", "plain", "llama3"):  # the template does not apply to string prompts
        assert prompt_example({"prompt": "What is 2 + 3?"}, tokenizer, template) == (
            [tokenizer.bos_id] + tokenizer.encode("What is 2 + 3?"))
    assert prompt_example({"prompt": "ab"}, _NoBosTokenizer(), "chatml") == [ord("a"), ord("b")]


def test_chatml_message_prompt_has_the_generation_prompt_and_no_bos(tokenizer):
    messages = [SYSTEM, QUESTION, ANSWER, FOLLOW_UP]
    record = validate_record({"prompt": messages, "answer": "6"}, "prompt", where="test")
    assert prompt_example(record, tokenizer, "chatml") == _chatml_prompt(tokenizer, messages)


def test_plain_message_prompt_leads_with_bos(tokenizer):
    ids = prompt_example({"prompt": [QUESTION]}, tokenizer, "plain")
    assert ids == [tokenizer.bos_id] + tokenizer.encode("User: What is 2 + 3?\n\nAssistant:")


def test_message_prompt_errors_name_the_source(tokenizer):
    with pytest.raises(DataError, match="message 1 of train record 7 is a system message"):
        prompt_example({"prompt": [QUESTION, SYSTEM]}, tokenizer, "chatml", source="train record 7")


def test_truncate_prompt_left():
    ids = [2, 10, 11, 12, 13]
    assert truncate_prompt_left(ids, 3, 2) == [2, 12, 13]  # keeps the bos and the tail
    assert truncate_prompt_left(ids, 3, None) == [11, 12, 13]
    assert truncate_prompt_left(ids, 3, 99) == [11, 12, 13]  # no leading bos: just the tail
    assert truncate_prompt_left(ids, 1, 2) == [2]
    assert truncate_prompt_left(ids, 1, None) == [13]
    kept = truncate_prompt_left(ids, 5, 2)
    assert kept == ids and kept is not ids
    assert truncate_prompt_left(ids, 8, 2) == ids
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        truncate_prompt_left(ids, 0, 2)


def test_prompt_texts():
    records = [
        {"prompt": "What is 1 + 1?", "answer": "2"},
        {"prompt": [SYSTEM, QUESTION, ANSWER, FOLLOW_UP]},
        {"prompt": [QUESTION, ANSWER]},  # the last user message, not the last message
        {"prompt": [SYSTEM]},  # no user message: the last message
    ]
    assert prompt_texts(records) == ["What is 1 + 1?", "And 2 + 4?", "What is 2 + 3?", "Answer briefly."]


# ----------------------------------------------------------------------------
# build_prompt_datasets


def test_long_prompts_are_left_truncated_and_counted(tokenizer, tmp_path):
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
             "thirteen", "fourteen", "fifteen"]
    prompts = [" ".join(words[:count]) + "?" for count in (1, 3, 15, 8, 2, 14)]
    train = _write(tmp_path, "train.jsonl", [{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)])
    evaluation = _write(tmp_path, "eval.jsonl", [{"prompt": prompts[2]}])
    max_len = 12
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    assert any(len(ids) > max_len for ids in encoded) and any(len(ids) < max_len for ids in encoded)
    lines = []
    data = build_prompt_datasets(_data_cfg(train, evaluation), tokenizer, max_prompt_len=max_len, log=lines.append)

    over = [ids for ids in encoded if len(ids) > max_len]
    assert data.stats == {
        "train_prompts": 6, "train_truncated": len(over),
        "train_tokens_removed": sum(len(ids) - max_len for ids in over),
        "eval_prompts": 1, "eval_truncated": 1, "eval_tokens_removed": len(encoded[2]) - max_len,
        "train_conversations": 0, "eval_conversations": 0,  # string prompts: no chat template applied
    }
    assert lines == ["data: " + ", ".join(f"{key}={value}" for key, value in data.stats.items())]
    for row, ids in enumerate(encoded):
        expected = ids if len(ids) <= max_len else [tokenizer.bos_id] + ids[len(ids) - max_len + 1:]
        assert _real(row, data.train) == expected
    assert _real(0, data.eval) == [tokenizer.bos_id] + encoded[2][len(encoded[2]) - max_len + 1:]


def test_arrays_are_left_padded_with_positions_from_the_first_token(tokenizer, tmp_path):
    prompts = ["Hi?", "What is the capital of France, in one word?", "Why?"]
    train = _write(tmp_path, "train.jsonl", [{"prompt": p} for p in prompts])
    max_len = 16
    data = build_prompt_datasets(_data_cfg(train, train), tokenizer, max_prompt_len=max_len, log=_silent)
    assert set(data.train) == {"input_ids", "attention_mask", "positions", "index"}
    for key in ("input_ids", "attention_mask", "positions"):
        assert data.train[key].dtype == np.int32 and data.train[key].shape == (3, max_len)
    assert data.train["index"].dtype == np.int32 and data.train["index"].shape == (3,)
    for row, prompt in enumerate(prompts):
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        ids = ids if len(ids) <= max_len else [ids[0]] + ids[len(ids) - max_len + 1:]
        pad = max_len - len(ids)
        np.testing.assert_array_equal(data.train["input_ids"][row], [tokenizer.pad_id] * pad + ids)
        np.testing.assert_array_equal(data.train["attention_mask"][row], [0] * pad + [1] * len(ids))
        np.testing.assert_array_equal(data.train["positions"][row], [0] * pad + list(range(len(ids))))


def test_chatml_prompts_are_cut_without_a_bos(tokenizer, tmp_path):
    messages = [SYSTEM, QUESTION, ANSWER, FOLLOW_UP]
    train = _write(tmp_path, "train.jsonl", [{"prompt": messages}, {"prompt": [QUESTION]}])
    full = _chatml_prompt(tokenizer, messages)
    max_len = len(_chatml_prompt(tokenizer, [QUESTION])) + 2
    assert len(full) > max_len
    data = build_prompt_datasets(_data_cfg(train, train), tokenizer, max_prompt_len=max_len, log=_silent)
    assert _real(0, data.train) == full[len(full) - max_len:]  # the generation prompt stays at the end
    assert _real(1, data.train) == _chatml_prompt(tokenizer, [QUESTION])
    assert data.stats["train_truncated"] == 1 and data.stats["train_tokens_removed"] == len(full) - max_len
    assert data.records["train"][0]["prompt"] == messages


def test_builtin_arithmetic_prompts_with_held_out_eval(tokenizer):
    data = build_prompt_datasets(_data_cfg("builtin:arithmetic_prompts?n=64"), tokenizer, max_prompt_len=24,
                                 log=_silent)
    tasks = embedded.arithmetic_tasks(64)
    assert data.records["train"] == [t for i, t in enumerate(tasks) if i % 4 != 3]  # every 4th is eval
    assert data.records["eval"] == tasks[3::4]
    assert data.stats["train_prompts"] == 48 and data.stats["eval_prompts"] == 16
    assert data.stats["train_truncated"] == data.stats["eval_truncated"] == 0
    for split in ("train", "eval"):
        arrays, records = getattr(data, split), data.records[split]
        assert arrays["input_ids"].shape == (len(records), 24)
        np.testing.assert_array_equal(arrays["index"], np.arange(len(records)))
        # The rows of a shuffled batch find their answers through "index".
        rows = np.random.default_rng(0).permutation(len(records))[:8]
        for row in rows:
            record = records[arrays["index"][row]]
            assert _real(row, arrays) == [tokenizer.bos_id] + tokenizer.encode(record["prompt"])
            assert tokenizer.decode(_real(row, arrays)) == record["prompt"]
            a, op, b = record["prompt"][len("What is "):-1].split()
            assert int(record["answer"]) == OPERATIONS[op](int(a), int(b))
    assert prompt_texts(data.records["eval"]) == [t["prompt"] for t in tasks[3::4]]


def test_max_examples_caps_train_only(tokenizer):
    cfg = _data_cfg("builtin:arithmetic_prompts?n=64", max_examples=10)
    data = build_prompt_datasets(cfg, tokenizer, max_prompt_len=24, log=_silent)
    assert data.stats["train_prompts"] == 10 and data.stats["eval_prompts"] == 16
    assert data.train["input_ids"].shape == (10, 24)


@pytest.mark.parametrize("max_prompt_len", [1, 0, -3])
def test_max_prompt_len_below_two_is_a_config_error(tokenizer, max_prompt_len):
    with pytest.raises(ConfigError, match=f"max_prompt_len must be at least 2.*got {max_prompt_len}"):
        build_prompt_datasets(_data_cfg("builtin:arithmetic_prompts?n=8"), tokenizer,
                              max_prompt_len=max_prompt_len, log=_silent)


def test_an_empty_split_is_a_data_error(tokenizer, tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        build_prompt_datasets(_data_cfg("builtin:arithmetic_prompts?n=8", str(empty)), tokenizer,
                              max_prompt_len=8, log=_silent)
    # Sources never yield an empty list today; the builder still refuses one, naming the split.
    monkeypatch.setattr(prompt_data, "read_splits", lambda cfg, kind: {
        "train": ("train.jsonl", [{"prompt": "Hi?"}]), "eval": ("eval.jsonl", [])})
    with pytest.raises(DataError, match="the eval split of 'eval.jsonl' has no prompts"):
        build_prompt_datasets(_data_cfg("train.jsonl"), tokenizer, max_prompt_len=8, log=_silent)


def test_wrong_record_kind_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="holds preference records, not prompt records"):
        build_prompt_datasets(_data_cfg("builtin:arithmetic_preferences?n=8"), tokenizer, max_prompt_len=8,
                              log=_silent)


# ----------------------------------------------------------------------------
# build_prompt_completion_datasets (distillation on dataset completions)


def test_completions_are_what_sft_trains_on_after_the_generation_prompt(tokenizer, tmp_path):
    """A prompt/completion record splits into `[bos] prompt` and `completion [eos]`; a conversation into the chatml
    generation prompt of the turns before its last assistant turn and that turn with its `<|im_end|>`; completions
    longer than the width are cut (counted, not ended); prompts are left-padded as for the RL stages."""
    answer_2 = {"role": "assistant", "content": "It is 6."}
    records = [{"prompt": "What is 2 + 3?", "completion": " The answer is 5."},
               {"messages": [SYSTEM, QUESTION, ANSWER, FOLLOW_UP, answer_2]},
               {"prompt": "Say a lot.", "completion": " one two three four five six seven eight nine ten"}]
    path = _write(tmp_path, "sft.jsonl", records)
    width = 12
    data = prompt_data.build_prompt_completion_datasets(_data_cfg(path, path), tokenizer, max_prompt_len=128,
                                                        max_completion_len=width, log=_silent)
    arrays = data.eval
    end = tokenizer.token_to_id("<|im_end|>")
    expected_prompts = [[tokenizer.bos_id] + tokenizer.encode("What is 2 + 3?"),
                        _chatml_prompt(tokenizer, [SYSTEM, QUESTION, ANSWER, FOLLOW_UP]),
                        [tokenizer.bos_id] + tokenizer.encode("Say a lot.")]
    long_completion = tokenizer.encode(" one two three four five six seven eight nine ten") + [tokenizer.eos_id]
    expected_completions = [tokenizer.encode(" The answer is 5.") + [tokenizer.eos_id], None, long_completion[:width]]
    for row in range(3):
        assert _real(row, arrays) == expected_prompts[row]
        completion = arrays["completion"][row][arrays["completion_mask"][row] == 1].tolist()
        if expected_completions[row] is not None:
            assert completion == expected_completions[row]
        assert (arrays["completion"][row][arrays["completion_mask"][row] == 0] == tokenizer.pad_id).all()
    conversation = arrays["completion"][1][arrays["completion_mask"][1] == 1].tolist()
    assert conversation[-1] == end and tokenizer.decode(conversation[:-1]).strip().endswith("It is 6.")
    assert len(long_completion) > width
    assert arrays["completion_ended"].tolist() == [1, 1, 0] and data.stats["eval_completions_cut"] == 1
    assert data.records["eval"][1] == {"prompt": [SYSTEM, QUESTION, ANSWER, FOLLOW_UP]}


def test_split_completion_takes_the_last_run_of_loss_tokens():
    assert prompt_data.split_completion([1, 2, 3, 4, 5, 6], [0, 1, 0, 0, 1, 1]) == ([1, 2, 3, 4], [5, 6])
    assert prompt_data.split_completion([1, 2, 3, 4], [0, 1, 1, 0]) == ([1], [2, 3])

"""Tests of flaxalign.data.preference_data: exact pair ids, dataset stats, KTO anchor rows, and errors."""

import ml_collections
import numpy as np
import pytest

from flaxalign.data import embedded, preference_data
from flaxalign.data.batching import unstack_pairs
from flaxalign.data.chat import ChatTokens, render_chat
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.loader import BatchIterator
from flaxalign.data.preference_data import (
    build_kto_datasets,
    build_preference_datasets,
    kto_example,
    preference_example,
)
from flaxalign.data.sources import read_records, validate_record
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.errors import DataError
from tests.data.test_tokenizer_hf import CHAT_TOKENS

QUESTION = {"role": "user", "content": "What is 2 + 3?"}
SYSTEM = {"role": "system", "content": "Answer briefly."}
GOOD = {"role": "assistant", "content": "5."}
BAD = {"role": "assistant", "content": "6, I think."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer.train(stdlib_corpus(max_chars=60_000), str(path), vocab_size=500,
                           user_defined_symbols=CHAT_TOKENS)


def _data_cfg(train, eval_spec="", **overrides):
    cfg = {"train": train, "eval": eval_spec, "eval_fraction": 0.25, "max_examples": 0, "chat_template": "chatml",
           "seq_len": 64, "overlong": "truncate_prompt_left"}
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _write(tmp_path, name, records):
    path = str(tmp_path / name)
    embedded.write_jsonl(records, path)
    return path


def _chatml_turn(tok, message):
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` encoded by hand (prompt side: no mask split)."""
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    return [start] + tok.encode(f"{message['role']}\n{message['content']}") + [end] + tok.encode("\n")


def _chatml_prompt(tok, messages):
    ids = [i for message in messages for i in _chatml_turn(tok, message)]
    return ids + [tok.token_to_id("<|im_start|>")] + tok.encode("assistant\n")


def _chatml_answer(tok, content):
    return tok.encode(content) + [tok.token_to_id("<|im_end|>")]


def _silent(_):
    pass


# ----------------------------------------------------------------------------
# preference_example


def test_string_pair_ids(tokenizer):
    record = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."}
    prompt, chosen, rejected = preference_example(record, tokenizer, "chatml")
    assert prompt == [tokenizer.bos_id] + tokenizer.encode("What is 2 + 3?")
    assert chosen == tokenizer.encode("The answer is 5.") + [tokenizer.eos_id]
    assert rejected == tokenizer.encode("The answer is 6.") + [tokenizer.eos_id]


def test_chatml_explicit_prompt_ids(tokenizer):
    record = validate_record({"prompt": [SYSTEM, QUESTION], "chosen": [GOOD], "rejected": [BAD]}, "preference",
                             where="test")
    prompt, chosen, rejected = preference_example(record, tokenizer, "chatml")
    assert prompt == _chatml_prompt(tokenizer, [SYSTEM, QUESTION])  # chatml: no bos
    assert chosen == _chatml_answer(tokenizer, "5.")  # ends at <|im_end|>, not the newline after it
    assert rejected == _chatml_answer(tokenizer, "6, I think.")


@pytest.mark.parametrize("history", [[QUESTION], [SYSTEM, QUESTION],
                                     [QUESTION, GOOD, {"role": "user", "content": "Sure?"}]])
def test_chatml_implicit_prompt_is_the_shared_prefix(tokenizer, history):
    implicit = {"chosen": history + [GOOD], "rejected": history + [BAD]}
    explicit = {"prompt": history, "chosen": [GOOD], "rejected": [BAD]}
    ids = preference_example(validate_record(implicit, "preference", where="t"), tokenizer, "chatml")
    assert ids == preference_example(validate_record(explicit, "preference", where="t"), tokenizer, "chatml")
    assert ids[0] == _chatml_prompt(tokenizer, history)


def test_implicit_prompt_stops_before_shared_assistant_messages(tokenizer):
    """chosen == rejected up to an assistant message: that message belongs to both completions."""
    follow_up = {"role": "assistant", "content": "Because 2 + 3 = 5."}
    record = {"chosen": [QUESTION, GOOD, follow_up], "rejected": [QUESTION, GOOD, BAD]}
    prompt, chosen, rejected = preference_example(record, tokenizer, "chatml")
    assert prompt == _chatml_prompt(tokenizer, [QUESTION])
    im_start, newline = tokenizer.token_to_id("<|im_start|>"), tokenizer.encode("\n")
    # Between the answers: "\n<|im_start|>assistant\n"; "\n" and "assistant\n" are separate segments.
    header = newline + [im_start] + tokenizer.encode("assistant\n")
    assert chosen == _chatml_answer(tokenizer, "5.") + header + _chatml_answer(tokenizer, follow_up["content"])
    assert rejected == _chatml_answer(tokenizer, "5.") + header + _chatml_answer(tokenizer, BAD["content"])


def test_plain_template_leads_with_bos_and_ends_with_eos(tokenizer):
    record = {"prompt": [QUESTION], "chosen": [GOOD], "rejected": [BAD]}
    prompt, chosen, rejected = preference_example(record, tokenizer, "plain")
    assert prompt == [tokenizer.bos_id] + tokenizer.encode("User: What is 2 + 3?\n\nAssistant:")
    assert chosen == tokenizer.encode(" 5.") + [tokenizer.eos_id]
    assert rejected == tokenizer.encode(" 6, I think.") + [tokenizer.eos_id]


@pytest.mark.parametrize("record, message", [
    ({"chosen": [{"role": "user", "content": "a"}, GOOD], "rejected": [{"role": "user", "content": "b"}, BAD]},
     "train record 4: 'chosen' and 'rejected' share no leading messages before an assistant answer"),
    ({"chosen": [QUESTION, GOOD], "rejected": [QUESTION, {"role": "user", "content": "Hm?"}, BAD]},
     "train record 4: 'rejected' continues the prompt with a user message"),
    ({"prompt": [QUESTION], "chosen": [{"role": "user", "content": "Hm?"}, GOOD], "rejected": [BAD]},
     "train record 4: 'chosen' continues the prompt with a user message"),
])
def test_conversational_errors_name_the_record(tokenizer, record, message):
    with pytest.raises(DataError) as info:
        preference_example(record, tokenizer, "chatml", source="train record 4")
    assert message in str(info.value)


def test_rendering_that_does_not_extend_the_prompt_is_an_error(tokenizer, monkeypatch):
    def render_with_extra_prompt_token(messages, tok, template, *, add_generation_prompt=False, source=""):
        chat = render_chat(messages, tok, template, add_generation_prompt=add_generation_prompt, source=source)
        return ChatTokens(chat.ids + [7] * add_generation_prompt, chat.assistant_mask + [0] * add_generation_prompt)

    monkeypatch.setattr(preference_data, "render_chat", render_with_extra_prompt_token)
    record = {"prompt": [QUESTION], "chosen": [GOOD], "rejected": [BAD]}
    with pytest.raises(DataError, match="^eval record 2: the chatml rendering of the conversation with 'chosen' "
                                        "does not start with the rendering of its prompt"):
        preference_example(record, tokenizer, "chatml", source="eval record 2")


# ----------------------------------------------------------------------------
# build_preference_datasets


def test_dataset_rows_hold_the_pair_and_mask_the_completion(tokenizer, tmp_path):
    records = [{"prompt": f"What is {a} + 1?", "chosen": f"It is {a + 1}.", "rejected": f"It is {a + 2}."}
               for a in range(6)]
    records.append({"prompt": [QUESTION], "chosen": [GOOD], "rejected": [BAD]})
    records.append({"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."})  # dropped
    train = _write(tmp_path, "train.jsonl", records)
    held = _write(tmp_path, "eval.jsonl", records[:2] + records[-1:])
    data = build_preference_datasets(_data_cfg(train, held), tokenizer, log=_silent)
    assert data.stats["train_identical_dropped"] == 1 and data.stats["eval_identical_dropped"] == 1
    assert data.stats["train_pairs"] == 7 and data.stats["eval_pairs"] == 2
    assert data.train["inputs"].shape == (7, 2, 64) and data.train["completion_mask"].dtype == np.float32
    for index, record in enumerate(read_records(train, "preference")[:7]):
        prompt, *completions = preference_example(record, tokenizer, "chatml")
        for row, completion in enumerate(completions):
            mask = data.train["completion_mask"][index, row] > 0
            # The completion mask covers exactly the completion (chosen/rejected + end token) as targets.
            assert data.train["targets"][index, row][mask].tolist() == completion
            assert np.flatnonzero(mask).tolist() == list(range(len(prompt) - 1, len(prompt) + len(completion) - 1))
            assert data.train["inputs"][index, row][: len(prompt)].tolist() == prompt


def test_held_out_eval_and_max_examples(tokenizer, tmp_path):
    train = _write(tmp_path, "train.jsonl", embedded.arithmetic_preferences(20, 3))
    logged = []
    data = build_preference_datasets(_data_cfg(train, max_examples=10), tokenizer, log=logged.append)
    assert data.stats["eval_pairs"] == 5 and data.stats["train_pairs"] == 10
    assert len(logged) == 1 and logged[0].startswith("data: train_identical_dropped=0, train_examples=10")
    batch = next(BatchIterator(data.train, 4, seed=0))
    assert unstack_pairs(batch)["inputs"].shape == (8, 64)


def test_overlong_pairs_are_truncated_or_dropped_and_counted(tokenizer, tmp_path):
    long_prompt = "Explain " + "the list sort method " * 20 + "briefly?"
    records = [{"prompt": long_prompt, "chosen": "Sorts in place.", "rejected": "No idea."},
               {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."}]
    train = _write(tmp_path, "train.jsonl", records)
    cfg = _data_cfg(train, train, seq_len=16)
    data = build_preference_datasets(cfg, tokenizer, log=_silent)
    assert data.stats["train_truncated"] == 1 and data.stats["train_tokens_removed"] > 0
    assert data.stats["train_pairs"] == 2 and data.train["inputs"].shape == (2, 2, 16)
    chosen = tokenizer.encode("Sorts in place.") + [tokenizer.eos_id]
    mask = data.train["completion_mask"][0, 0] > 0
    assert data.train["targets"][0, 0][mask].tolist() == chosen  # the prompt was cut, not the answer
    cfg.overlong = "drop"
    dropped = build_preference_datasets(cfg, tokenizer, log=_silent)
    assert dropped.stats["train_dropped"] == 1 and dropped.stats["train_pairs"] == 1


def test_margins_follow_their_pairs_through_identical_and_overlong_drops(tokenizer, tmp_path):
    long_prompt = "Explain " + "the list sort method " * 20 + "briefly?"
    records = [{"prompt": "Short?", "chosen": "Yes.", "rejected": "No.", "margin": 1.5},
               {"prompt": "Same?", "chosen": "A.", "rejected": "A.", "margin": 9.0},
               {"prompt": long_prompt, "chosen": "Sorts in place.", "rejected": "No idea.", "margin": 2.0},
               {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "margin": 0.25}]
    train = _write(tmp_path, "train.jsonl", records)
    cfg = _data_cfg(train, train, seq_len=16)
    assert build_preference_datasets(cfg, tokenizer, log=_silent).train["margin"].tolist() == [1.5, 2.0, 0.25]
    cfg.overlong = "drop"
    assert build_preference_datasets(cfg, tokenizer, log=_silent).train["margin"].tolist() == [1.5, 0.25]
    no_margin = _write(tmp_path, "plain.jsonl", [{k: v for k, v in r.items() if k != "margin"} for r in records])
    assert "margin" not in build_preference_datasets(_data_cfg(no_margin, no_margin), tokenizer, log=_silent).train
    partial = _write(tmp_path, "partial.jsonl", records[:1] + [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    with pytest.raises(DataError, match="record 1 has no 'margin' but others do"):
        build_preference_datasets(_data_cfg(partial, partial), tokenizer, log=_silent)
    bad = _write(tmp_path, "bad.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": "big"}])
    with pytest.raises(DataError, match="'margin' must be a number, got"):
        build_preference_datasets(_data_cfg(bad, bad), tokenizer, log=_silent)


def test_only_identical_pairs_is_an_error(tokenizer, tmp_path):
    train = _write(tmp_path, "same.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "A."}] * 2)
    with pytest.raises(DataError, match=r"all 1 train pairs of '.*same.jsonl' have the same chosen and rejected"):
        build_preference_datasets(_data_cfg(train, eval_fraction=0.5), tokenizer, log=_silent)


# ----------------------------------------------------------------------------
# KTO


def _kto_records():
    return embedded.unpair_preferences([
        {"prompt": "What is 1 + 1?", "chosen": "It is 2.", "rejected": "It is 3."},
        {"prompt": "What is 2 * 3?", "chosen": "It is 6.", "rejected": "Maybe 5."},
        {"prompt": "What is 9 - 4?", "chosen": "It is 5.", "rejected": "It is 4."},
    ])


def test_kto_example(tokenizer):
    record = {"prompt": "What is 1 + 1?", "completion": "It is 2.", "label": False}
    assert kto_example(record, tokenizer, "chatml") == (
        [tokenizer.bos_id] + tokenizer.encode("What is 1 + 1?"), tokenizer.encode("It is 2.") + [tokenizer.eos_id],
        False)


def test_kto_rows_pair_each_prompt_with_the_next_completion(tokenizer, tmp_path):
    records = _kto_records()
    train = _write(tmp_path, "kto.jsonl", records)
    data = build_kto_datasets(_data_cfg(train, train), tokenizer, log=_silent)
    examples = [kto_example(record, tokenizer, "chatml") for record in records]
    assert data.train["label"].dtype == np.float32
    assert data.train["label"].tolist() == [1.0, 0.0] * 3
    assert data.stats["train_desirable"] == 3 and data.stats["train_undesirable"] == 3
    for index, (prompt, completion, _) in enumerate(examples):
        for row, expected in ((0, completion), (1, examples[(index + 1) % len(examples)][1])):
            length = len(prompt) + len(expected)
            tokens = data.train["inputs"][index, row][: length - 1].tolist() + [
                int(data.train["targets"][index, row][length - 2])]
            assert tokens == prompt + expected
            assert data.train["targets"][index, row][data.train["completion_mask"][index, row] > 0].tolist() == expected
    assert next(BatchIterator(data.train, 4, seed=1))["label"].shape == (4,)


def test_kto_overlong_drop_keeps_labels_aligned(tokenizer, tmp_path):
    records = _kto_records()
    records[3] = dict(records[3], completion="Maybe " + "five or so " * 30)
    train = _write(tmp_path, "kto.jsonl", records)
    data = build_kto_datasets(_data_cfg(train, train, seq_len=24, overlong="drop"), tokenizer, log=_silent)
    # Example 3 is too long, and so is example 2's anchor row (prompt 2 + completion 3).
    assert data.stats["train_dropped"] == 2 and data.train["label"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert data.stats["train_desirable"] == 2 and data.stats["train_undesirable"] == 2
    truncated = build_kto_datasets(_data_cfg(train, train, seq_len=24), tokenizer, log=_silent)
    assert truncated.stats["train_truncated"] == 2 and truncated.train["inputs"].shape == (6, 2, 24)
    # Example 2 is cut by its longer anchor row: both rows keep one shared, left-cut prompt, its own answer is whole.
    masks = truncated.train["completion_mask"][2] > 0
    starts = [int(np.flatnonzero(mask)[0]) for mask in masks]
    prompt, completion, _ = kto_example(records[2], tokenizer, "chatml")
    assert starts[0] == starts[1] < len(prompt) - 1
    assert truncated.train["targets"][2, 0][masks[0]].tolist() == completion
    assert truncated.train["inputs"][2, 0][: starts[0] + 1].tolist() == prompt[-(starts[0] + 1):]


@pytest.mark.parametrize("labels, eval_labels, message", [
    ([True, True], [True, False], "the train split of '.*' has no undesirable \\(label false\\) examples"),
    ([False, False], [True, False], "has no desirable \\(label true\\) examples"),
    ([True, False], [True], "the eval split of '.*eval.jsonl' has 1 kto example\\(s\\); KTO needs at least 2"),
])
def test_kto_errors(tokenizer, tmp_path, labels, eval_labels, message):
    def records(values):
        return [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": v} for i, v in enumerate(values)]
    train = _write(tmp_path, "train.jsonl", records(labels))
    held = _write(tmp_path, "eval.jsonl", records(eval_labels))
    with pytest.raises(DataError, match=message):
        build_kto_datasets(_data_cfg(train, held), tokenizer, log=_silent)


def test_kto_held_out_eval_has_both_labels(tokenizer):
    """Every 4th record of the alternating builtin would be undesirable only; the hold-out is per label."""
    cfg = _data_cfg("builtin:arithmetic_kto?n=40", eval_fraction=0.25, seq_len=48)
    data = build_kto_datasets(cfg, tokenizer, log=_silent)
    assert data.stats["eval_desirable"] == 10 and data.stats["eval_undesirable"] == 10
    assert data.stats["train_desirable"] == 30 and data.stats["train_undesirable"] == 30


# ----------------------------------------------------------------------------
# Unpaired built-in data


def test_builtin_arithmetic_kto_unpairs_arithmetic_preferences():
    records = read_records("builtin:arithmetic_kto?n=10&seed=2", "kto")
    pairs = embedded.arithmetic_preferences(10, 2)
    assert len(records) == 20 and sum(record["label"] for record in records) == 10
    for pair, desirable, undesirable in zip(pairs, records[::2], records[1::2]):
        assert desirable == {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}
        assert undesirable == {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}


def test_unpair_preferences_refuses_conversations():
    with pytest.raises(DataError, match="preference record 0 is not a string prompt/chosen/rejected record"):
        embedded.unpair_preferences([{"chosen": [QUESTION, GOOD], "rejected": [QUESTION, BAD]}])

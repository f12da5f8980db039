"""Tests of flaxalign.data.embedded: built-in SFT pairs, arithmetic tasks and preferences."""

import gzip
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from flaxalign.data import embedded
from flaxalign.data.sources import read_records, validate_record
from flaxalign.errors import DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _digest(records):
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def test_sft_pairs_are_valid_and_plentiful():
    pairs = embedded.sft_pairs()
    assert 2000 < len(pairs) < 10_000
    for index, pair in enumerate(pairs):
        assert validate_record(pair, "sft", where=f"pair {index}") == pair
        assert re.fullmatch(r"What (does `[\w.]+\(.*\)` do|is the class `[\w.]+`)\?", pair["prompt"])
        assert embedded.MIN_SENTENCE_CHARS <= len(pair["completion"]) <= embedded.MAX_SENTENCE_CHARS
        assert pair["completion"].endswith(".") and "\n" not in pair["completion"]
    assert len({pair["prompt"] for pair in pairs}) == len(pairs)
    assert {"prompt": "What does `statistics.mean(data)` do?",
            "completion": "Return the sample arithmetic mean of data."} in pairs


def test_sft_pairs_max_examples_is_a_prefix():
    assert embedded.sft_pairs(10) == embedded.sft_pairs()[:10]
    # Callers may edit what they get without changing the cached pairs.
    embedded.sft_pairs(1)[0]["prompt"] = "changed"
    assert embedded.sft_pairs(1)[0]["prompt"] != "changed"


@pytest.mark.parametrize("imports_first", ["", "import jax, flax, ml_collections; "])
def test_sft_pairs_are_deterministic_across_processes(imports_first):
    script = (
        f"{imports_first}import hashlib, json; from flaxalign.data.embedded import sft_pairs; "
        "print(hashlib.sha256(json.dumps(sft_pairs(), sort_keys=True).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="4321", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        check=True, timeout=120,
    )
    assert result.stdout.strip().splitlines()[-1] == _digest(embedded.sft_pairs())


def test_methods_patched_onto_stdlib_classes_are_not_read(monkeypatch):
    """transformers adds documented methods to logging.Logger on import; the pairs must not change."""
    import logging

    before = embedded.sft_pairs()

    def warning_advice(self):
        """A docstring from a third-party package that must not become a pair."""

    warning_advice.__module__ = "some_package.logging"
    monkeypatch.setattr(logging.Logger, "warning_advice", warning_advice, raising=False)
    embedded._all_sft_pairs.cache_clear()
    try:
        assert embedded.sft_pairs() == before
    finally:
        embedded._all_sft_pairs.cache_clear()


@pytest.mark.parametrize("doc, expected", [
    ("Return the sum of the values.  More text here.", "Return the sum of the values."),
    ("S.find(sub[, start[, end]]) -> int\n\nReturn the lowest index in S\nwhere sub is found.",
     "Return the lowest index in S where sub is found."),
    ("Compare e.g. two files. Then more.", "Compare e.g. two files."),
    ("Too short.", ""),
    ("No final period here at all", ""),
    ("Deprecated AST node class.", ""),
    ("", ""),
])
def test_first_sentence(doc, expected):
    assert embedded.first_sentence(doc) == expected


def test_arithmetic_tasks_have_exact_answers():
    tasks = embedded.arithmetic_tasks(600, seed=3)
    assert len(tasks) == 600
    ops = set()
    for index, task in enumerate(tasks):
        assert validate_record(task, "prompt", where=f"task {index}") == task
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", task["prompt"]).groups()
        ops.add(op)
        assert task["answer"] == str(eval(f"{a} {op} {b}"))  # Digits and one operator.
        assert int(task["answer"]) >= 0
    assert ops == {"+", "-", "*"}


def test_arithmetic_is_deterministic_and_seeded():
    assert embedded.arithmetic_tasks(50, seed=1) == embedded.arithmetic_tasks(50, seed=1)
    assert embedded.arithmetic_tasks(50, seed=1) != embedded.arithmetic_tasks(50, seed=2)
    assert embedded.arithmetic_tasks(20, seed=1) == embedded.arithmetic_tasks(50, seed=1)[:20]
    assert embedded.arithmetic_preferences(50, 1) == embedded.arithmetic_preferences(50, 1)
    # Fixed values: a change here changes every run that uses them.
    assert embedded.arithmetic_tasks(2, seed=0) == [
        {"prompt": "What is 97 - 53?", "answer": "44"}, {"prompt": "What is 33 + 65?", "answer": "98"},
    ]


def test_arithmetic_preferences_prefer_the_right_answer():
    tasks = embedded.arithmetic_tasks(400, seed=5)
    pairs = embedded.arithmetic_preferences(400, seed=5)
    styles = set()
    for index, (task, pair) in enumerate(zip(tasks, pairs)):
        assert validate_record(pair, "preference", where=f"pair {index}") == pair
        assert pair["prompt"] == task["prompt"]
        assert pair["chosen"] == f"The answer is {task['answer']}."
        wrong = int(re.search(r"-?\d+(?=(\.|, but))", pair["rejected"]).group())
        assert wrong != int(task["answer"])
        styles.add(pair["rejected"].startswith("The answer is"))
    assert styles == {True, False}


def test_write_jsonl_round_trips_plain_and_gzip(tmp_path):
    records = [{"prompt": "é\n", "completion": "\x00 ok"}, {"messages": [{"role": "assistant", "content": "hi"}]}]
    for name in ("data.jsonl", "data.jsonl.gz"):
        path = str(tmp_path / name)
        embedded.write_jsonl(records, path)
        assert read_records(path, "sft") == records
    # gzip output does not depend on the time of writing.
    assert gzip.compress(b"x", mtime=0)[4:8] == (tmp_path / "data.jsonl.gz").read_bytes()[4:8]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]


@pytest.mark.parametrize("spec, kind, expected", [
    ("builtin:sft?n=5", "sft", lambda: embedded.sft_pairs(5)),
    ("builtin:arithmetic_prompts", "prompt", lambda: embedded.arithmetic_tasks(embedded.DEFAULT_ARITHMETIC_N, 0)),
    ("builtin:arithmetic_prompts?n=7&seed=2", "prompt", lambda: embedded.arithmetic_tasks(7, 2)),
    ("builtin:arithmetic_preferences?seed=1", "preference",
     lambda: embedded.arithmetic_preferences(embedded.DEFAULT_ARITHMETIC_N, 1)),
    ("builtin:arithmetic_kto?n=3", "kto",
     lambda: embedded.unpair_preferences(embedded.arithmetic_preferences(3, embedded.DEFAULT_ARITHMETIC_SEED))),
])
def test_builtin_specs(spec, kind, expected):
    assert read_records(spec, kind) == expected()


def test_builtin_stdlib_is_text_records():
    records = read_records("builtin:stdlib", "text")
    assert len(records) > 1000 and all(set(record) == {"text"} for record in records)


@pytest.mark.parametrize("spec, kind, message", [
    ("builtin:sft", "preference", "builtin:sft holds sft records, not preference records."),
    ("builtin:nope", "sft", "unknown built-in data 'builtin:nope'; built-ins are builtin:stdlib, builtin:sft"),
    ("builtin:sft?seed=1", "sft", "builtin:sft?seed=1: unknown parameter 'seed' (accepted: n)."),
    ("builtin:arithmetic_prompts?n=0", "prompt", "parameter 'n' must be a positive integer, got '0'."),
    ("builtin:arithmetic_prompts?seed=x", "prompt", "parameter 'seed' must be a non-negative integer, got 'x'."),
    ("builtin:arithmetic_sft?split=eval", "sft", "parameter 'split' must be train or test, got 'eval'."),
    ("builtin:arithmetic_prompts?max=1&split=test", "prompt", "operands up to max=1 give no question of split=test"),
])
def test_bad_builtin_specs(spec, kind, message):
    with pytest.raises(DataError) as info:
        read_records(spec, kind)
    assert message in str(info.value)


def test_arithmetic_sft_and_max_operand():
    records = read_records("builtin:arithmetic_sft?n=40&seed=1&max=9", "sft")
    tasks = embedded.arithmetic_tasks(40, 1, 9)
    assert records == [{"prompt": t["prompt"], "completion": f"The answer is {t['answer']}."} for t in tasks]
    operands = [int(x) for t in tasks for x in t["prompt"][len("What is "):-1].split(" ")[::2]]
    assert max(operands) <= 9 and any(t["prompt"].find("*") > 0 for t in tasks)
    # the default operand range draws the same problems as before the parameter existed
    assert read_records("builtin:arithmetic_prompts?n=30&max=99", "prompt") == embedded.arithmetic_tasks(30, 0)
    with pytest.raises(DataError, match="parameter 'max' must be a positive integer"):
        read_records("builtin:arithmetic_prompts?max=0", "prompt")


def test_arithmetic_preferences_and_kto_take_max_operand_and_ask_the_prompts_questions():
    pairs = read_records("builtin:arithmetic_preferences?n=40&seed=2&max=9", "preference")
    tasks = embedded.arithmetic_tasks(40, 2, 9)
    assert [p["prompt"] for p in pairs] == [t["prompt"] for t in tasks]
    assert [p["chosen"] for p in pairs] == [f"The answer is {t['answer']}." for t in tasks]
    assert read_records("builtin:arithmetic_kto?n=40&seed=2&max=9", "kto") == embedded.unpair_preferences(pairs)
    assert read_records("builtin:arithmetic_preferences?n=30", "preference") == embedded.arithmetic_preferences(30)


def test_far_pairs_add_wrong_answers_in_the_chosen_sentence_from_the_whole_answer_range():
    def far_share(spec):
        pairs = read_records(spec, "preference")
        far = 0
        for pair in pairs:
            assert pair["rejected"] != pair["chosen"]
            if pair["rejected"].startswith("The answer is "):
                right, wrong = (int(p[len("The answer is "):-1]) for p in (pair["chosen"], pair["rejected"]))
                assert -3 <= wrong <= 84 if "far=1" in spec else abs(wrong - right) <= 3  # 0 − 3 … 81 + 3
                far += abs(wrong - right) > 3
        return far / len(pairs)

    assert far_share("builtin:arithmetic_preferences?n=600&max=9") == 0
    assert 0.2 < far_share("builtin:arithmetic_preferences?n=600&max=9&far=1") < 0.4


def test_split_test_questions_never_appear_in_split_train_and_are_a_tenth_of_all():
    for max_operand in (9, 99):
        train = read_records(f"builtin:arithmetic_sft?n=3000&max={max_operand}&split=train", "sft")
        test = read_records(f"builtin:arithmetic_prompts?n=300&seed=5&max={max_operand}&split=test", "prompt")
        train_questions = {r["prompt"] for r in train}
        test_questions = {r["prompt"] for r in test}
        assert test_questions and not train_questions & test_questions

        def swapped(question):  # "What is 37 + 58?" → "What is 58 + 37?"
            a, op, b = question[len("What is "):-1].split(" ")
            return f"What is {b} {op} {a}?"

        assert not {swapped(q) for q in test_questions if "-" not in q} & train_questions  # nor their commuted form
        for record in test:  # still right answers
            a, op, b = record["prompt"][len("What is "):-1].split(" ")
            assert int(record["answer"]) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b))
    everything = {r["prompt"] for r in read_records("builtin:arithmetic_prompts?n=20000&max=9", "prompt")}
    train = read_records("builtin:arithmetic_prompts?n=3000&max=9&split=train", "prompt")  # every train question
    held_out = everything - {r["prompt"] for r in train}
    assert 0.05 < len(held_out) / len(everything) < 0.15
    pairs = read_records("builtin:arithmetic_preferences?n=500&max=9&split=test&far=1", "preference")
    assert {p["prompt"] for p in pairs} <= held_out
    kto = read_records("builtin:arithmetic_kto?n=500&max=9&split=train", "kto")
    assert not {r["prompt"] for r in kto} & held_out


def test_chat_records_are_the_plain_records_as_messages():
    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    spec = "?n=30&seed=3&max=9&split=train"
    plain = read_records("builtin:arithmetic_prompts" + spec, "prompt")
    chat = read_records("builtin:arithmetic_prompts" + spec + "&chat=1", "prompt")
    assert chat == [{"prompt": user(r["prompt"]), "answer": r["answer"]} for r in plain]
    plain = read_records("builtin:arithmetic_sft" + spec, "sft")
    chat = read_records("builtin:arithmetic_sft" + spec + "&chat=1", "sft")
    assert chat == [{"messages": user(r["prompt"]) + assistant(r["completion"])} for r in plain]
    plain = read_records("builtin:arithmetic_preferences" + spec, "preference")
    chat = read_records("builtin:arithmetic_preferences" + spec + "&chat=1", "preference")
    assert chat == [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                     "rejected": assistant(r["rejected"])} for r in plain]

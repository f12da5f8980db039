"""Tests of flaxalign.data.sources: record kinds, readers and their error messages."""

import gzip
import json

import pytest

from flaxalign.data.sources import read_records, validate_record
from flaxalign.errors import ConfigError, DataError
from tests.data.line_count import python_lines

USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
OTHER_ASSISTANT = {"role": "assistant", "content": "Go away."}


def _write_lines(path, lines):
    """Writes text lines to path and returns it as a string."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _write_records(path, records):
    return _write_lines(path, [json.dumps(record) for record in records])


def _error(spec, kind):
    """The DataError message of reading spec as kind."""
    with pytest.raises(DataError) as info:
        read_records(spec, kind)
    return str(info.value)


# Valid forms of each kind, and their normalised copies.

VALID = [
    ("text", {"text": "Some words."}, {"text": "Some words."}),
    ("sft", {"prompt": "Q?", "completion": " A.", "id": 7}, {"prompt": "Q?", "completion": " A."}),
    ("sft", {"messages": [{"role": "system", "content": ""}, USER, ASSISTANT, USER, ASSISTANT]},
     {"messages": [{"role": "system", "content": ""}, USER, ASSISTANT, USER, ASSISTANT]}),
    ("preference", {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
     {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}),
    ("preference", {"chosen": [USER, ASSISTANT], "rejected": [USER, OTHER_ASSISTANT]},
     {"chosen": [USER, ASSISTANT], "rejected": [USER, OTHER_ASSISTANT]}),
    ("preference", {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [OTHER_ASSISTANT]},
     {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [OTHER_ASSISTANT]}),
    ("preference", {"prompt": None, "chosen": [USER, ASSISTANT], "rejected": [USER, OTHER_ASSISTANT]},
     {"chosen": [USER, ASSISTANT], "rejected": [USER, OTHER_ASSISTANT]}),
    ("kto", {"prompt": "Q?", "completion": "A.", "label": False}, {"prompt": "Q?", "completion": "A.", "label": False}),
    ("prompt", {"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 2 + 2?", "answer": "4"}),
    ("prompt", {"prompt": "Tell a story."}, {"prompt": "Tell a story."}),
    ("prompt", {"prompt": [USER], "answer": None}, {"prompt": [USER]}),
]


@pytest.mark.parametrize("kind, record, expected", VALID)
def test_valid_records_are_accepted_and_normalised(kind, record, expected):
    assert validate_record(record, kind, where="x") == expected


def test_messages_keep_only_role_and_content():
    record = {"messages": [dict(USER, name="bob"), dict(ASSISTANT, tool_calls=[])]}
    assert validate_record(record, "sft", where="x") == {"messages": [USER, ASSISTANT]}


@pytest.mark.parametrize("kind, record, expected", VALID)
def test_each_kind_reads_from_jsonl(tmp_path, kind, record, expected):
    path = _write_records(tmp_path / "data.jsonl", [record, record])
    assert read_records(path, kind) == [expected, expected]


def test_unknown_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown record kind 'dpo'; kinds are text, sft, preference, kto, prompt"):
        read_records(str(tmp_path), "dpo")
    with pytest.raises(ConfigError, match="unknown record kind"):
        validate_record({}, "chat", where="x")


# Readers.


def test_gzip_jsonl_and_json_gz(tmp_path):
    records = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(3)]
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    for name in ("data.jsonl.gz", "data.json.gz"):
        (tmp_path / name).write_bytes(gzip.compress(data))
        assert read_records(str(tmp_path / name), "sft") == records


def test_json_array_file(tmp_path):
    records = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=2))
    assert read_records(str(tmp_path / "data.json"), "text") == records


def test_glob_and_folder_read_json_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    _write_records(tmp_path / "b" / "part-1.jsonl", [{"text": "third"}])
    _write_records(tmp_path / "a.jsonl", [{"text": "first"}, {"text": "second"}])
    (tmp_path / "README.md").write_text("Not a record.")
    (tmp_path / ".hidden.jsonl").write_text("not even JSON")
    expected = [{"text": "first"}, {"text": "second"}, {"text": "third"}]
    assert read_records(str(tmp_path), "text") == expected
    assert read_records(str(tmp_path / "**" / "*.jsonl"), "text") == expected
    assert read_records(str(tmp_path / "b" / "*.jsonl"), "text") == expected[2:]


def test_plain_text_files_become_text_records(tmp_path):
    (tmp_path / "one.txt").write_text("First document.\n")
    (tmp_path / "two.md").write_text("Second document.\n")
    assert read_records(str(tmp_path), "text") == [{"text": "First document.\n"}, {"text": "Second document.\n"}]
    assert read_records(str(tmp_path / "one.txt"), "text") == [{"text": "First document.\n"}]


def test_plain_text_is_only_for_text_records(tmp_path):
    (tmp_path / "one.txt").write_text("First document.\n")
    message = _error(str(tmp_path), "sft")
    assert str(tmp_path) in message and "sft records must be JSON lines" in message


def test_blank_lines_crlf_and_byte_order_mark_are_fine(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n  \n{"text": "b"}')
    assert read_records(str(path), "text") == [{"text": "a"}, {"text": "b"}]


def test_strings_are_kept_exactly(tmp_path):
    record = {"prompt": "  indented\n", "completion": "é \u2028 \x00 tab\t"}
    path = _write_records(tmp_path / "data.jsonl", [record])
    assert read_records(path, "sft") == [record]


def test_reading_costs_the_same_python_work_per_record(tmp_path):
    """Doubling the file doubles the Python lines run (to 1 %): constant work per record, nothing that grows with
    the records read so far. (bench/read_records.py times 100k lines.) Measured: exactly 65 lines per record."""
    record = {"prompt": "What is 37 + 58?", "chosen": "The answer is 95.", "rejected": "The answer is 96."}
    lines = {}
    for n in (1000, 2000, 4000):
        path = _write_lines(tmp_path / f"{n}.jsonl", [json.dumps(record)] * n)
        records, lines[n] = python_lines(read_records, path, "preference")
        assert records == [record] * n
    per_record = (lines[2000] - lines[1000]) / 1000
    assert abs((lines[4000] - lines[2000]) - 2000 * per_record) <= 0.01 * (lines[4000] - lines[2000]), lines
    assert per_record <= 100, per_record


# Bad files: each error names the file and the line.


def test_malformed_json_names_file_line_and_json_error(tmp_path):
    path = _write_lines(tmp_path / "data.jsonl", ['{"text": "a"}', '{"text": "b",}'])
    message = _error(path, "text")
    assert message.startswith(f"{path} line 2: malformed JSON (")
    assert "Expecting property name enclosed in double quotes at column 14" in message


def test_line_that_is_not_an_object(tmp_path):
    path = _write_lines(tmp_path / "data.jsonl", ['{"text": "a"}', '["text", "b"]'])
    assert _error(path, "text") == f"{path} line 2: a text record must be a JSON object, got list."


def test_missing_field_names_the_fields_the_kind_needs(tmp_path):
    path = _write_records(tmp_path / "file.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2
                          + [{"prompt": "p", "rejected": "r"}])
    assert _error(path, "preference") == (
        f"{path} line 3: missing field 'chosen' (preference records need prompt, chosen, rejected)."
    )


@pytest.mark.parametrize("kind, record, field", [
    ("sft", {"prompt": "p"}, "completion"),
    ("sft", {"completion": "c"}, "prompt"),
    ("preference", {"chosen": "c", "rejected": "r"}, "prompt"),
    ("kto", {"prompt": "p", "completion": "c"}, "label"),
    ("prompt", {"answer": "4"}, "prompt"),
    ("text", {"txt": "typo"}, "text"),
])
def test_missing_field_of_each_kind(tmp_path, kind, record, field):
    path = _write_records(tmp_path / "data.jsonl", [record])
    message = _error(path, kind)
    assert message.startswith(f"{path} line 1: missing field '{field}' ({kind} records need ")


def test_wrongly_typed_chosen(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    assert _error(path, "preference") == f"{path} line 1: 'chosen' must be a string or a list of messages, got int."


def test_rejected_must_have_the_form_of_chosen(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"prompt": "p", "chosen": "c", "rejected": [ASSISTANT]}])
    assert _error(path, "preference") == f"{path} line 1: 'rejected' must be a string like 'chosen', got list."


def test_string_prompt_with_conversational_chosen(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"prompt": "p", "chosen": [ASSISTANT], "rejected": [ASSISTANT]}])
    assert _error(path, "preference") == (
        f"{path} line 1: 'prompt' must be a list of messages when 'chosen' is, got string."
    )


def test_conversational_chosen_must_end_with_the_assistant(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"chosen": [USER], "rejected": [ASSISTANT]}])
    assert _error(path, "preference") == f"{path} line 1: 'chosen' must end with an assistant message, not user."


@pytest.mark.parametrize("kind, record, expected", [
    ("kto", {"prompt": "p", "completion": "c", "label": 1}, "'label' must be true or false, got int."),
    ("sft", {"prompt": ["p"], "completion": "c"}, "'prompt' must be a string, got list."),
    ("prompt", {"prompt": 5}, "'prompt' must be a string or a list of messages, got int."),
    ("prompt", {"prompt": "p", "answer": 4}, "'answer' must be a string, got int."),
    ("text", {"text": None}, "missing field 'text' (text records need text)."),
    ("sft", {"messages": "hi"}, "'messages' must be a list of messages, got string."),
])
def test_wrongly_typed_fields(tmp_path, kind, record, expected):
    path = _write_records(tmp_path / "data.jsonl", [record])
    assert _error(path, kind) == f"{path} line 1: {expected}"


@pytest.mark.parametrize("kind, record, field", [
    ("sft", {"prompt": "p", "completion": " \n\t"}, "completion"),
    ("sft", {"prompt": "", "completion": "c"}, "prompt"),
    ("preference", {"prompt": "p", "chosen": "c", "rejected": "  "}, "rejected"),
    ("preference", {"prompt": "p", "chosen": "", "rejected": "r"}, "chosen"),
    ("prompt", {"prompt": "p", "answer": " "}, "answer"),
    ("text", {"text": "\n\n"}, "text"),
])
def test_empty_fields(tmp_path, kind, record, field):
    path = _write_records(tmp_path / "data.jsonl", [record])
    assert _error(path, kind) == f"{path} line 1: '{field}' is empty."


def test_empty_message_list(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"messages": []}])
    assert _error(path, "sft") == f"{path} line 1: 'messages' is an empty list of messages."


def test_messages_without_an_assistant_message(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"messages": [USER]}])
    assert _error(path, "sft") == f"{path} line 1: 'messages' has no assistant message, so there is nothing to learn."


def test_messages_and_prompt_together(tmp_path):
    path = _write_records(tmp_path / "data.jsonl", [{"messages": [USER, ASSISTANT], "prompt": "p"}])
    assert "has both 'messages' and 'prompt'" in _error(path, "sft")


def test_unknown_role_names_the_message_and_allowed_roles(tmp_path):
    record = {"messages": [USER, ASSISTANT, {"role": "bot", "content": "beep"}]}
    path = _write_records(tmp_path / "data.jsonl", [record])
    assert _error(path, "sft") == (
        f"{path} line 1: message messages[2] has unknown role 'bot' (allowed roles: system, user, assistant)."
    )


def test_message_content_must_be_a_string(tmp_path):
    record = {"chosen": [USER, {"role": "assistant", "content": ["a", "b"]}], "rejected": [USER, ASSISTANT]}
    path = _write_records(tmp_path / "data.jsonl", [record])
    assert _error(path, "preference") == f"{path} line 1: content of message chosen[1] must be a string, got list."


@pytest.mark.parametrize("message, expected", [
    ("not a dict", "message messages[0] must be an object with role and content, got string."),
    ({"content": "c"}, "message messages[0] has no 'role'."),
    ({"role": "user"}, "message messages[0] has no 'content'."),
    ({"role": "user", "content": " "}, "message messages[0] (user) has empty content."),
])
def test_malformed_messages(tmp_path, message, expected):
    path = _write_records(tmp_path / "data.jsonl", [{"messages": [message, ASSISTANT]}])
    assert _error(path, "sft") == f"{path} line 1: {expected}"


def test_system_message_only_first(tmp_path):
    record = {"messages": [USER, {"role": "system", "content": "Be brief."}, ASSISTANT]}
    path = _write_records(tmp_path / "data.jsonl", [record])
    assert "message messages[1] is a system message; only the first message may be one." in _error(path, "sft")


def test_non_utf8_names_file_line_and_byte_offset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert _error(str(path), "text") == (
        f"{path} line 2: not valid UTF-8 (byte offset 28 in the file); re-encode the file as UTF-8."
    )


def test_non_utf8_in_gzip_names_the_decompressed_offset(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "\xff"}\n'))
    assert _error(str(path), "text") == (
        f"{path} line 1: not valid UTF-8 (byte offset 10 of the decompressed data); re-encode the file as UTF-8."
    )


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    assert _error(str(path), "text").startswith(f"{path} is not a valid gzip file (")
    data = gzip.compress(b'{"text": "a"}\n' * 10_000)
    path.write_bytes(data[: len(data) // 2])
    assert "the gzip data is corrupt or truncated" in _error(str(path), "text")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_has_no_records(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    assert _error(str(path), "sft") == f"file {path} has no records."


def test_empty_json_array_has_no_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    assert _error(str(path), "sft") == f"file {path} has no records."


def test_bad_record_in_json_array_names_its_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": 1}]))
    assert _error(str(path), "text") == f"{path} record 1: 'text' must be a string, got int."


def test_missing_paths(tmp_path):
    assert _error(str(tmp_path / "nope.jsonl"), "sft") == f"data path '{tmp_path / 'nope.jsonl'}' does not exist."
    assert "the glob matches no file" in _error(str(tmp_path / "*.jsonl"), "sft")

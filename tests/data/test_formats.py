"""`data.format` and `data.columns`: each public dataset shape on a few hand-written rows in its upstream layout
(HH-RLHF transcripts, Alpaca, GSM8K, UltraFeedback-binarized), column renames, and one-line errors naming the
file, the line or row, and the field or column."""

import json

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxalign.data import formats
from flaxalign.data.formats import RecordFormat
from flaxalign.data.sources import read_records
from flaxalign.errors import ConfigError, DataError


def _jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


HH_ROWS = [  # Anthropic/hh-rlhf: whole transcripts that share everything but the last Assistant turn
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are laid by hens."},
    {"chosen": "\n\nHuman: Name a red fruit.\n\nAssistant: A strawberry.\n\nHuman: And a yellow one?\n\n"
               "Assistant: A banana.\n\nIt is sweet.",
     "rejected": "\n\nHuman: Name a red fruit.\n\nAssistant: A strawberry.\n\nHuman: And a yellow one?\n\n"
                 "Assistant: I would rather not say."},
]


def test_hh_rlhf_splits_the_shared_turns_into_the_prompt(tmp_path):
    path = _jsonl(tmp_path, HH_ROWS)
    first, second = read_records(path, "preference", record_format=RecordFormat("hh_rlhf"))
    assert first == {"prompt": [_user("How do I boil an egg?")],
                     "chosen": [_assistant("Put it in boiling water for about nine minutes.")],
                     "rejected": [_assistant("Eggs are laid by hens.")]}
    assert second == {"prompt": [_user("Name a red fruit."), _assistant("A strawberry."), _user("And a yellow one?")],
                      "chosen": [_assistant("A banana.\n\nIt is sweet.")],  # a blank line inside a turn stays
                      "rejected": [_assistant("I would rather not say.")]}
    sft = read_records(path, "sft", record_format=RecordFormat("hh_rlhf"))
    assert sft[1] == {"messages": second["prompt"] + second["chosen"]}
    prompts = read_records(path, "prompt", record_format=RecordFormat("hh_rlhf"))
    assert prompts == [{"prompt": first["prompt"]}, {"prompt": second["prompt"]}]


def test_hh_rlhf_responses_of_several_turns_after_the_last_shared_human_turn(tmp_path):
    row = {"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: Bye.\n\nAssistant: Bye!",
           "rejected": "\n\nHuman: Hi.\n\nAssistant: Go away.\n\nHuman: Bye.\n\nAssistant: Finally."}
    (record,) = read_records(_jsonl(tmp_path, [row]), "preference", record_format=RecordFormat("hh_rlhf"))
    assert record == {"prompt": [_user("Hi.")],
                      "chosen": [_assistant("Hello."), _user("Bye."), _assistant("Bye!")],
                      "rejected": [_assistant("Go away."), _user("Bye."), _assistant("Finally.")]}


@pytest.mark.parametrize("row, message", [
    ({"chosen": "hi there", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "line 1: 'chosen' is not an HH-RLHF transcript"),
    ({"chosen": "Preamble\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "line 1: 'chosen' is not an HH-RLHF transcript"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hello\n\nAssistant: no"},
     "line 1: 'chosen' and 'rejected' share no Human turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes\n\nHuman: ok", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "line 1: 'chosen' must end with an assistant message, not user"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     r"line 1: message chosen\[0\] \(assistant\) has empty content"),
    ({"chosen": 3, "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "line 1: 'chosen' must be a string, got int"),
])
def test_hh_rlhf_errors_name_the_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        read_records(_jsonl(tmp_path, [row]), "preference", record_format=RecordFormat("hh_rlhf"))


ALPACA_ROWS = [  # tatsu-lab/alpaca: `input` is "" when the instruction stands alone
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat vegetables.\n2. Walk daily.\n3. Sleep enough.", "text": "Below is an instruction..."},
    {"instruction": "Identify the odd one out.", "input": "Apple, Pear, Carrot", "output": "Carrot"},
]


def test_alpaca_puts_the_input_after_the_instruction(tmp_path):
    path = _jsonl(tmp_path, ALPACA_ROWS)
    sft = read_records(path, "sft", record_format=RecordFormat("alpaca"))
    assert sft == [
        {"messages": [_user("Give three tips for staying healthy."),
                      _assistant("1. Eat vegetables.\n2. Walk daily.\n3. Sleep enough.")]},
        {"messages": [_user("Identify the odd one out.\n\nApple, Pear, Carrot"), _assistant("Carrot")]}]
    prompts = read_records(path, "prompt", record_format=RecordFormat("alpaca"))
    assert prompts[1] == {"prompt": [_user("Identify the odd one out.\n\nApple, Pear, Carrot")], "answer": "Carrot"}


GSM8K_ROWS = [  # openai/gsm8k: a worked solution with <<calculator>> notes, the final answer after "####"
    {"question": "Tom has 3 boxes of 12 pens. He gives away 5 pens. How many pens are left?",
     "answer": "Tom has 3*12=<<3*12=36>>36 pens.\nHe has 36-5=<<36-5=31>>31 pens left.\n#### 31"},
    {"question": "A farm sells 1,000 eggs a day for 4 days and 250 on the fifth. How many eggs in all?",
     "answer": "4 days give 4*1000=<<4*1000=4000>>4,000 eggs.\n4000+250=<<4000+250=4250>>4250\n#### 4,250"},
]


def test_gsm8k_final_answer_becomes_the_verifiable_answer(tmp_path):
    path = _jsonl(tmp_path, GSM8K_ROWS)
    prompts = read_records(path, "prompt", record_format=RecordFormat("gsm8k"))
    assert prompts == [{"prompt": [_user(GSM8K_ROWS[0]["question"])], "answer": "31"},
                       {"prompt": [_user(GSM8K_ROWS[1]["question"])], "answer": "4250"}]
    sft = read_records(path, "sft", record_format=RecordFormat("gsm8k"))
    assert sft[0] == {"messages": [_user(GSM8K_ROWS[0]["question"]), _assistant(GSM8K_ROWS[0]["answer"])]}


def test_gsm8k_without_a_final_answer_names_the_line(tmp_path):
    path = _jsonl(tmp_path, [GSM8K_ROWS[0], {"question": "What?", "answer": "No idea."}])
    with pytest.raises(DataError, match=r"rows.jsonl line 2: 'answer' has no '#### N' final answer"):
        read_records(path, "prompt", record_format=RecordFormat("gsm8k"))


ULTRAFEEDBACK_ROWS = [  # HuggingFaceH4/ultrafeedback_binarized: message lists with the user turn first
    {"prompt": "Write a haiku about rain.", "prompt_id": "4f1c",
     "chosen": [{"content": "Write a haiku about rain.", "role": "user"},
                {"content": "Soft rain on the roof\nthe garden drinks in silence\nclouds walk to the hills",
                 "role": "assistant"}],
     "rejected": [{"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Rain is water.", "role": "assistant"}],
     "messages": [{"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Soft rain on the roof\nthe garden drinks in silence\nclouds walk to the hills",
                   "role": "assistant"}],
     "score_chosen": 8.5, "score_rejected": 3.0},
]


def test_ultrafeedback_from_parquet_with_nested_message_columns(tmp_path):
    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(ULTRAFEEDBACK_ROWS), path)
    row = ULTRAFEEDBACK_ROWS[0]
    chosen, rejected = ([{"role": m["role"], "content": m["content"]} for m in row[name]]
                        for name in ("chosen", "rejected"))
    fmt = RecordFormat("ultrafeedback")
    assert read_records(str(path), "preference", record_format=fmt) == [{"chosen": chosen, "rejected": rejected}]
    assert read_records(str(path), "sft", record_format=fmt) == [{"messages": chosen}]
    assert read_records(str(path), "prompt", record_format=fmt) == [{"prompt": [_user(row["prompt"])]}]


def test_columns_rename_before_the_format_reads(tmp_path):
    rows = [{"problem": "What is 2 + 3?", "solution": "2 + 3 = 5\n#### 5"}]
    fmt = RecordFormat("gsm8k", (("answer", "solution"), ("question", "problem")))
    assert read_records(_jsonl(tmp_path, rows), "prompt", record_format=fmt) == [
        {"prompt": [_user("What is 2 + 3?")], "answer": "5"}]
    trl = RecordFormat("trl", (("completion", "solution"), ("prompt", "problem")))
    assert read_records(_jsonl(tmp_path, rows), "sft", record_format=trl) == [
        {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5\n#### 5"}]


def test_a_missing_mapped_column_names_file_line_and_column(tmp_path):
    path = _jsonl(tmp_path, [{"q": "a?", "a": "b"}, {"q": "c?"}])
    fmt = RecordFormat("trl", (("completion", "a"), ("prompt", "q")))
    with pytest.raises(DataError, match=r"^.*rows.jsonl line 2: no column 'a' \(data.columns.completion names it\); "
                                        r"the row has 'q'.$"):
        read_records(path, "sft", record_format=fmt)


def _cfg(**data):
    return ml_collections.ConfigDict({"columns": formats.columns_block(), **data})


def test_from_config_reads_format_and_non_empty_columns():
    cfg = _cfg(format="gsm8k")
    cfg.columns.question = "problem"
    cfg.columns.answer = "answer"  # the same name: no rename
    assert formats.from_config(cfg) == RecordFormat("gsm8k", (("question", "problem"),))
    assert formats.from_config(ml_collections.ConfigDict({"train": "x"})) == formats.TRL  # older configs
    assert formats.from_config(ml_collections.ConfigDict({"columns": {"prompt": "q"}})).columns == (("prompt", "q"),)


@pytest.mark.parametrize("data, kind, message", [
    ({"format": "sharegpt"}, "sft", "data.format='sharegpt' is not one of trl, hh_rlhf, alpaca, gsm8k, ultrafeedback."),
    ({"format": "gsm8k"}, "preference", "data.format=gsm8k gives sft, prompt records, not preference records"),
    ({"format": "alpaca", "columns": {"prompt": "q"}}, "sft",
     "data.columns.prompt: data.format=alpaca reads instruction, input, output for sft records, not prompt."),
    ({"columns": {"question": "q"}}, "sft",
     "data.columns.question: data.format=trl reads prompt, completion, messages for sft records, not question."),
    ({"columns": {"prompts": "q"}}, "sft", "data.columns.prompts is not a field any format reads"),
    ({"columns": {"prompt": 3}}, "sft", "data.columns.prompt must be a column name"),
])
def test_config_errors_are_one_sentence(data, kind, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        formats.from_config(ml_collections.ConfigDict(data)).check(kind)


def test_builtin_and_tfds_specs_refuse_a_format():
    with pytest.raises(ConfigError, match="data.format and data.columns apply to files"):
        read_records("builtin:sft", "sft", record_format=RecordFormat("alpaca"))

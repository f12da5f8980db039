"""Parquet files, Arrow files (IPC file and stream formats) and `datasets.save_to_disk` folders as record sources:
the same records as the JSONL of the same rows, read batch by batch, with errors naming the file, the row and the
field; and the SFT arrays built from Parquet equal those built from JSONL (so order, per-host slicing and resume,
which work on those arrays, are the same)."""

import json
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxalign.data import arrow_io, formats
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.sft_data import build_sft_datasets
from flaxalign.data.sources import iter_records, read_records
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.errors import DataError
from tests.data.test_tokenizer_hf import CHAT_TOKENS

ROWS = {
    "text": [{"text": "First document."}, {"text": "Second document.\nWith two lines."}],
    "sft": [{"prompt": "What is 2 + 2?", "completion": " 4"},
            {"prompt": "Name a colour.", "completion": " Blue", "source": "hand"}],
    "preference": [{"prompt": "2 + 2?", "chosen": " 4", "rejected": " 5", "margin": 1.5},
                   {"prompt": "3 + 3?", "chosen": " 6", "rejected": " 7", "margin": 0.5}],
    "kto": [{"prompt": "2 + 2?", "completion": " 4", "label": True},
            {"prompt": "3 + 3?", "completion": " 7", "label": False}],
    "prompt": [{"prompt": "2 + 2?", "answer": "4"}, {"prompt": "3 + 3?", "answer": None}],
}
MESSAGES = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Bye?"},
                          {"role": "assistant", "content": "Bye."}]}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _parquet(path, rows, **kwargs):
    pq.write_table(pa.Table.from_pylist(rows), path, **kwargs)
    return str(path)


def _arrow(path, rows, *, stream: bool, batch_rows: int = 1):
    table = pa.Table.from_pylist(rows)
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return str(path)


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_parquet_and_arrow_give_the_records_of_the_same_jsonl(tmp_path, kind):
    want = read_records(_jsonl(tmp_path / "rows.jsonl", ROWS[kind]), kind)
    assert read_records(_parquet(tmp_path / "rows.parquet", ROWS[kind]), kind) == want
    assert read_records(_arrow(tmp_path / "file.arrow", ROWS[kind], stream=False), kind) == want
    assert read_records(_arrow(tmp_path / "stream.arrow", ROWS[kind], stream=True), kind) == want


def test_message_lists_as_nested_columns(tmp_path):
    assert read_records(_parquet(tmp_path / "chat.parquet", MESSAGES), "sft") == MESSAGES


def test_a_folder_reads_its_record_files_in_path_order_and_ignores_the_rest(tmp_path):
    rows = ROWS["sft"] * 3
    _parquet(tmp_path / "train-00001-of-00002.parquet", rows[3:])
    _parquet(tmp_path / "train-00000-of-00002.parquet", rows[:3])
    (tmp_path / "README.md").write_text("# a dataset card\n")
    want = read_records(_jsonl(tmp_path.parent / "all.jsonl", rows), "sft")
    assert read_records(str(tmp_path), "sft") == want
    assert read_records(str(tmp_path / "train-*.parquet"), "sft") == want


def _save_to_disk_layout(folder, rows, shards=2):
    """What datasets.Dataset.save_to_disk writes: Arrow stream shards, state.json listing them, dataset_info.json
    (tests/data/test_arrow_sources_parity.py checks the real `datasets` package writes this)."""
    os.makedirs(folder)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    size = -(-len(rows) // shards)
    for i, name in enumerate(names):
        _arrow(os.path.join(folder, name), rows[i * size:(i + 1) * size], stream=True)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": name} for name in names], "_split": None}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)  # a .json file that is not records
    return str(folder)


def test_a_save_to_disk_folder_reads_its_shards_in_order(tmp_path):
    rows = ROWS["preference"] * 3
    folder = _save_to_disk_layout(tmp_path / "train", rows)
    assert read_records(folder, "preference") == read_records(_jsonl(tmp_path / "rows.jsonl", rows), "preference")


def test_a_dataset_dict_folder_asks_for_one_split(tmp_path):
    _save_to_disk_layout(tmp_path / "dd" / "train", ROWS["sft"])
    _save_to_disk_layout(tmp_path / "dd" / "test", ROWS["sft"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"dd' is a datasets DatasetDict with splits train, test; name one split's "
                                        r"folder, e.g. .*dd/train\.$"):
        read_records(str(tmp_path / "dd"), "sft")
    assert read_records(str(tmp_path / "dd" / "test"), "sft") == read_records(
        _jsonl(tmp_path / "rows.jsonl", ROWS["sft"]), "sft")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "3?", "completion": 3}, {"prompt": "4?", "completion": 4}],
     "row 0: 'completion' must be a string, got int."),
    (ROWS["sft"] + [{"prompt": "5?", "completion": " "}], "row 2: 'completion' is empty."),
    (ROWS["sft"] + [{"prompt": "3?", "completion": None}],
     "row 2: missing field 'completion' (sft records need prompt and completion, or messages)."),
    ([{"prompt": "Hi", "answer": "x"}], "row 0: missing field 'completion'"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = _parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError) as error:
        read_records(path, "sft")
    assert str(error.value).startswith(f"{path} {message}")


@pytest.mark.parametrize("name, data", [
    ("cut.parquet", "footer"), ("noise.parquet", b"PAR1 this is not parquet PAR1"), ("noise.arrow", b"ARROW1 no")])
def test_unreadable_files_are_one_sentence(tmp_path, name, data):
    path = tmp_path / name
    if data == "footer":
        _parquet(path, ROWS["sft"])
        data = path.read_bytes()[:-30]
    path.write_bytes(data)
    kind = "Parquet" if name.endswith(".parquet") else "Arrow"
    with pytest.raises(DataError, match=rf"^{path}: not a readable {kind} file \(.+\)\.$"):
        read_records(str(path), "sft")


def test_an_empty_parquet_file_has_no_records(tmp_path):
    table = pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())})
    pq.write_table(table, tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet has no records"):
        read_records(str(tmp_path / "empty.parquet"), "sft")


def test_records_stream_one_batch_at_a_time(tmp_path, monkeypatch):
    """Taking k records pulls ceil(k / batch) batches: a file is never turned into Python objects whole."""
    rows = [{"prompt": f"q{i}", "completion": f" a{i}", "unused": "x" * 100} for i in range(1000)]
    path = _parquet(tmp_path / "big.parquet", rows, row_group_size=250)
    monkeypatch.setattr(arrow_io, "BATCH_ROWS", 100)
    pulled = []
    real_open = arrow_io._open

    def counting_open(file):
        schema, batches = real_open(file)

        def counted(columns):
            for batch in batches(columns):
                pulled.append(batch.schema.names)
                yield batch
        return schema, counted
    monkeypatch.setattr(arrow_io, "_open", counting_open)
    records = iter_records(path, "sft")
    first = [next(records) for _ in range(150)]
    assert first[149] == {"prompt": "q149", "completion": " a149"}
    assert len(pulled) == 2
    assert pulled[0] == ["prompt", "completion"], "only the columns the records need are read"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer.train(stdlib_corpus(max_chars=60_000), str(path), vocab_size=400,
                           user_defined_symbols=CHAT_TOKENS)


def test_sft_arrays_from_parquet_with_a_column_map_equal_those_from_jsonl(tmp_path, tokenizer):
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}"} for i in range(40)]
    renamed = [{"question": r["prompt"], "response": r["completion"]} for r in rows]
    data = dict(eval="", eval_fraction=0.25, max_examples=0, chat_template="plain", seq_len=24,
                overlong="drop", batch_size=4, format="trl", columns=formats.columns_block())
    jsonl_cfg = ml_collections.ConfigDict({**data, "train": _jsonl(tmp_path / "qa.jsonl", rows)})
    parquet_cfg = ml_collections.ConfigDict({**data, "train": _parquet(tmp_path / "qa.parquet", renamed)})
    parquet_cfg.columns.prompt, parquet_cfg.columns.completion = "question", "response"
    want = build_sft_datasets(jsonl_cfg, tokenizer, log=lambda _: None)
    got = build_sft_datasets(parquet_cfg, tokenizer, log=lambda _: None)
    for split in ("train", "eval"):
        assert sorted(got.__dict__[split]) == sorted(want.__dict__[split])
        for key in want.__dict__[split]:
            np.testing.assert_array_equal(got.__dict__[split][key], want.__dict__[split][key], err_msg=key)
    assert got.stats == want.stats

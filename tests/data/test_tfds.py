"""Tests of flaxalign.data.tfds_io: JSONL -> array_record tfds datasets -> records, with no TensorFlow."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from flaxalign.data import sources, tfds_io
from flaxalign.errors import DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

USER = {"role": "user", "content": "Hi é 🙂"}
ASSISTANT = {"role": "assistant", "content": "Hello!\n"}
OTHER_ASSISTANT = {"role": "assistant", "content": "  Go away."}

SFT = [
    {"prompt": "What is 2 + 2?", "completion": " 4\x00"},
    {"messages": [{"role": "system", "content": ""}, USER, ASSISTANT, USER, OTHER_ASSISTANT]},
    {"prompt": "Why?", "completion": "Because."},
]
PREFERENCE = [
    {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
    {"chosen": [USER, ASSISTANT], "rejected": [USER, OTHER_ASSISTANT]},
    {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [OTHER_ASSISTANT]},
]
KTO = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "d", "label": False}]
PROMPTS = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": [USER]}, {"prompt": "Say hi."}]

# Runs in a fresh interpreter so that nothing else could have imported TensorFlow.
ROUND_TRIP_SCRIPT = """
import json, sys
from flaxalign.data import sources, tfds_io
tmp, kind = sys.argv[1], sys.argv[2]
folder = tfds_io.jsonl_to_tfds(
    {"train": tmp + "/train.jsonl", "test": [tmp + "/test.jsonl"]}, tmp + "/tfds", "my_" + kind, kind)
result = {
    "folder": folder,
    "train": sources.read_records("tfds:my_" + kind, kind, data_dir=tmp + "/tfds"),
    "test": sources.read_records("tfds:my_" + kind + ":test", kind, data_dir=tmp + "/tfds"),
    "tensorflow_imported": "tensorflow" in sys.modules,
}
print(json.dumps(result))
"""


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind, records", [("sft", SFT), ("preference", PREFERENCE)])
def test_jsonl_round_trips_exactly_without_tensorflow(tmp_path, kind, records):
    _write_jsonl(tmp_path / "train.jsonl", records)
    _write_jsonl(tmp_path / "test.jsonl", records[::-1])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, str(tmp_path), kind], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120, check=True,
    )
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["train"] == records
    assert output["test"] == records[::-1]
    assert not output["tensorflow_imported"]
    folder = pathlib.Path(output["folder"])
    assert folder == tmp_path / "tfds" / f"my_{kind}" / "1.0.0"
    assert sorted(path.name for path in folder.glob("*.array_record-*")) == [
        f"my_{kind}-test.array_record-00000-of-00001", f"my_{kind}-train.array_record-00000-of-00001",
    ]
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("kind, records", [("kto", KTO), ("prompt", PROMPTS), ("text", [{"text": "a b"}])])
def test_other_kinds_round_trip(tmp_path, monkeypatch, kind, records):
    folder = tfds_io.records_to_tfds({"train": records}, str(tmp_path), "data", kind)
    assert tfds_io.read_tfds(folder, kind) == records
    # By name under data_dir, and under TFDS_DATA_DIR.
    assert sources.read_records("tfds:data", kind, data_dir=str(tmp_path)) == records
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert sources.read_records("tfds:data:train", kind) == records


def test_labels_are_python_bools(tmp_path):
    folder = tfds_io.records_to_tfds({"train": KTO}, str(tmp_path), "kto", "kto")
    labels = [record["label"] for record in tfds_io.read_tfds(folder, "kto")]
    assert labels == [True, False] and all(type(label) is bool for label in labels)


def test_split_slicing(tmp_path):
    folder = tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "sft", "sft")
    assert tfds_io.read_tfds(folder, "sft", split="train[1:]") == SFT[1:]


def test_builtin_records_convert_too(tmp_path):
    folder = tfds_io.jsonl_to_tfds({"train": "builtin:arithmetic_prompts?n=50"}, str(tmp_path), "arith", "prompt")
    assert tfds_io.read_tfds(folder, "prompt") == sources.read_records("builtin:arithmetic_prompts?n=50", "prompt")


def test_dataset_without_flaxalign_metadata_is_read_generically(tmp_path):
    # As a tfds dataset written by other code would be: str fields and bools.
    folder = pathlib.Path(tfds_io.records_to_tfds({"train": KTO}, str(tmp_path), "other", "kto"))
    (folder / "metadata.json").unlink()
    assert tfds_io.read_tfds(str(folder), "kto") == KTO


def test_reading_as_another_kind(tmp_path):
    folder = tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "sft", "sft")
    with pytest.raises(DataError, match="holds sft records, not preference records"):
        tfds_io.read_tfds(folder, "preference")


def test_invalid_records_are_not_written(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"train.jsonl line 1: missing field 'rejected'"):
        tfds_io.jsonl_to_tfds({"train": path}, str(tmp_path / "tfds"), "bad", "preference")
    assert not (tmp_path / "tfds").exists()


def test_existing_dataset_needs_overwrite(tmp_path):
    tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "sft", "sft")
    with pytest.raises(DataError, match="exists; delete it or pass overwrite=True"):
        tfds_io.records_to_tfds({"train": SFT[:1]}, str(tmp_path), "sft", "sft")
    folder = tfds_io.records_to_tfds({"train": SFT[:1]}, str(tmp_path), "sft", "sft", overwrite=True)
    assert tfds_io.read_tfds(folder, "sft") == SFT[:1]


def test_bad_names_and_splits(tmp_path):
    with pytest.raises(DataError, match="must be snake_case"):
        tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "My-Data", "sft")
    with pytest.raises(DataError, match="split 'dev' of tfds dataset 'x' must be a word with records"):
        tfds_io.records_to_tfds({"dev": []}, str(tmp_path), "x", "sft")


def test_missing_dataset_and_split(tmp_path):
    with pytest.raises(DataError, match=r"no prepared tfds dataset 'nope' in .*nope/<version>/dataset_info.json"):
        sources.read_records("tfds:nope", "sft", data_dir=str(tmp_path))
    tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "sft", "sft")
    with pytest.raises(DataError, match="has no split 'validation'; it has train"):
        sources.read_records("tfds:sft:validation", "sft", data_dir=str(tmp_path))


def test_newest_version_is_read(tmp_path):
    folder = pathlib.Path(tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "sft", "sft"))
    old = pathlib.Path(tfds_io.records_to_tfds({"train": SFT[:1]}, str(tmp_path / "old"), "sft", "sft"))
    old.rename(folder.parent / "0.9.0")
    assert sources.read_records("tfds:sft", "sft", data_dir=str(tmp_path)) == SFT
    assert sources.read_records("tfds:sft/0.9.0", "sft", data_dir=str(tmp_path)) == SFT[:1]


def test_non_array_record_dataset_is_a_clear_error(tmp_path):
    folder = pathlib.Path(tfds_io.records_to_tfds({"train": SFT}, str(tmp_path), "sft", "sft"))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="cannot be read without TensorFlow.*file_format='array_record'"):
        tfds_io.read_tfds(str(folder), "sft")

"""The files the `datasets` package itself writes — `save_to_disk` folders (one split and a DatasetDict) and
`to_parquet` — read as the records of the same rows."""

import pytest

from flaxalign.data.formats import RecordFormat
from flaxalign.data.sources import read_records
from flaxalign.errors import DataError
from tests.data.test_formats import ULTRAFEEDBACK_ROWS

pytestmark = pytest.mark.parity

ROWS = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(2500)]


@pytest.fixture(scope="module")
def datasets():
    # in a fixture: a module-level skip would fail the default group's collection under --no-skips
    return pytest.importorskip("datasets")


def test_save_to_disk_and_to_parquet_read_as_the_rows(datasets, tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "one"), num_shards=3)
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    assert read_records(str(tmp_path / "one"), "preference") == ROWS
    assert read_records(str(tmp_path / "rows.parquet"), "preference") == ROWS


def test_a_saved_dataset_dict_is_named_down_to_a_split(datasets, tmp_path):
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK_ROWS),
                          "test_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK_ROWS)}).save_to_disk(str(tmp_path))
    with pytest.raises(DataError, match="is a datasets DatasetDict with splits train_prefs, test_prefs"):
        read_records(str(tmp_path), "preference", record_format=RecordFormat("ultrafeedback"))
    (record,) = read_records(str(tmp_path / "train_prefs"), "preference", record_format=RecordFormat("ultrafeedback"))
    assert record["chosen"][1]["content"] == ULTRAFEEDBACK_ROWS[0]["chosen"][1]["content"]

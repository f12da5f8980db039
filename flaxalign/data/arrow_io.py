"""Rows of Parquet files, Arrow files and `datasets.save_to_disk` folders, read in record batches.

Only the columns asked for are read and one batch at a time becomes Python objects, so a large file streams
in bounded memory. Arrow files may be the IPC file format (`pyarrow.ipc.new_file`) or the stream format that
`datasets` writes; both are memory-mapped. A `save_to_disk` folder of one split is read as the files its
state.json lists, in that order; a folder of several splits (a DatasetDict) must be named down to one split.
"""

import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flaxalign.errors import DataError

SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 4096  # rows per Parquet batch: large enough that pyarrow's per-batch cost vanishes
DATASET_STATE = "state.json"  # written by datasets.Dataset.save_to_disk
DATASET_DICT = "dataset_dict.json"  # written by datasets.DatasetDict.save_to_disk


def is_arrow_file(path: str) -> bool:
    return path.endswith(SUFFIXES)


def saved_dataset_files(folder: str) -> list[str] | None:
    """The Arrow files of a `save_to_disk` folder in its order, None if `folder` is not one; raises DataError
    for a folder of several splits."""
    if os.path.isfile(os.path.join(folder, DATASET_DICT)):
        splits = _json(os.path.join(folder, DATASET_DICT)).get("splits") or sorted(
            name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
        raise DataError(f"'{folder}' is a datasets DatasetDict with splits {', '.join(splits)}; name one split's "
                        f"folder, e.g. {os.path.join(folder, splits[0] if splits else 'train')}.")
    state_file = os.path.join(folder, DATASET_STATE)
    if not os.path.isfile(state_file):
        return None
    entries = _json(state_file).get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
        raise DataError(f"{state_file} lists no '_data_files'; it is not a datasets save_to_disk folder.")
    return [os.path.join(folder, entry["filename"]) for entry in entries]


def _json(path: str) -> dict:
    try:
        with open(path) as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}.") from None
    return value if isinstance(value, dict) else {}


def column_names(path: str) -> list[str]:
    """The columns of a Parquet or Arrow file (read from its metadata only)."""
    try:
        return list(_open(path)[0].names)
    except (pa.ArrowException, OSError) as error:
        raise _read_error(path, error) from None


def iter_rows(path: str, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """Yields (row index from 0, {column: value}) for the rows of a Parquet or Arrow file, holding only
    `columns` that the file has (a missing one is reported by whoever needs it, with the row)."""
    try:
        schema, batches = _open(path)
        present = [name for name in columns if name in schema.names]
        first = 0
        for batch in batches(present):
            rows = batch.to_pylist() if present else [{}] * batch.num_rows  # no column asked for exists
            yield from enumerate(rows, first)
            first += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        raise _read_error(path, error) from None


def _read_error(path: str, error: Exception) -> DataError:
    if isinstance(error, FileNotFoundError):
        return DataError(f"cannot read {path}: {error}.")
    kind = "Parquet" if path.endswith(".parquet") else "Arrow"
    return DataError(f"{path}: not a readable {kind} file ({_first_line(error)}).")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__


def _open(path: str):
    """(schema, batches(columns) -> iterator of RecordBatches) of a Parquet or Arrow file."""
    if path.endswith(".parquet"):
        parquet = pq.ParquetFile(path, memory_map=True)
        schema = parquet.schema_arrow

        def parquet_batches(columns):
            return parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False)
        return schema, parquet_batches
    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_file(source)

        def file_batches(columns):
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index).select(columns)
        return reader.schema, file_batches
    except pa.ArrowInvalid:
        source.seek(0)
    stream = pa.ipc.open_stream(source)  # what datasets writes

    def stream_batches(columns):
        for batch in stream:
            yield batch.select(columns)
    return stream.schema, stream_batches

"""tensorflow-datasets in array_record format, written and read without TensorFlow.

`jsonl_to_tfds` turns local JSON lines into a tfds dataset (one split per
entry, `file_format="array_record"`, examples in file order) through a
`tfds.core.GeneratorBasedBuilder` made on the fly.  `read_tfds` reads any
array_record tfds dataset through its random-access data source
(`builder.as_data_source`), which needs neither TensorFlow nor a network.

Encoding of flaxalign records (one feature per field, fixed per kind, so every
example has every feature):

* a string field is `tfds.features.Text()`; `label` is a bool `Scalar`;
* a message list is `Sequence({"role": Text(), "content": Text()})`, which
  keeps each string exactly;
* a field that may be either (preference `prompt`/`chosen`/`rejected`, the
  `prompt` of `prompt` records) is two features, `NAME` (Text) and
  `NAME_messages` (the Sequence); the form a record does not use is stored
  empty;
* an absent optional field is the empty string or the empty list, which no
  valid record holds, so records read back exactly as they were validated.

The dataset's metadata (`metadata.json`) holds `{"flaxalign_kind": kind}`.  A
tfds dataset without it is read generically: bytes become str, numpy scalars
and arrays Python values and lists, a `{"role": [...], "content": [...]}`
sequence a message list; then the records are validated as `kind`.
"""

import contextlib
import io
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import decode
from tensorflow_datasets.proto import tf_example_pb2

from flaxalign.data import sources
from flaxalign.errors import DataError

VERSION = "1.0.0"
KIND_METADATA_KEY = "flaxalign_kind"
DEFAULT_SPLIT = "train"
# Records are decoded this many at a time (the data source's batch read).
READ_CHUNK = 1024

# Per kind: (field, form), form "text", "messages", "either" or "bool".
FIELDS = {
    "text": (("text", "text"),),
    "sft": (("prompt", "text"), ("completion", "text"), ("messages", "messages")),
    "preference": (("prompt", "either"), ("chosen", "either"), ("rejected", "either")),
    "kto": (("prompt", "text"), ("completion", "text"), ("label", "bool")),
    "prompt": (("prompt", "either"), ("answer", "text")),
}
MESSAGES_SUFFIX = "_messages"


def features_for(kind: str) -> "tfds.features.FeaturesDict":
    """The tfds features of `kind` records (see the module docstring)."""
    sources.check_kind(kind)
    features = {}
    for field, form in FIELDS[kind]:
        if form in ("text", "either"):
            features[field] = tfds.features.Text()
        if form == "messages":
            features[field] = _messages_feature()
        if form == "either":
            features[field + MESSAGES_SUFFIX] = _messages_feature()
        if form == "bool":
            features[field] = tfds.features.Scalar(dtype=np.bool_)
    return tfds.features.FeaturesDict(features)


def _messages_feature():
    return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})


def encode_record(record: dict, kind: str) -> dict:
    """A validated record as a tfds example of `features_for(kind)`."""
    example = {}
    for field, form in FIELDS[kind]:
        value = record.get(field)
        if form == "bool":
            example[field] = bool(value)
        elif form == "messages":
            example[field] = value or []
        elif form == "text":
            example[field] = value or ""
        else:
            is_messages = isinstance(value, list)
            example[field] = "" if is_messages or value is None else value
            example[field + MESSAGES_SUFFIX] = value if is_messages else []
    return example


def decode_example(example: dict, kind: str) -> dict:
    """A tfds example of `features_for(kind)` (values as Python) as a record."""
    record = {}
    for field, form in FIELDS[kind]:
        if form == "either" and example[field + MESSAGES_SUFFIX]:
            record[field] = example[field + MESSAGES_SUFFIX]
        elif form == "bool" or example[field]:
            record[field] = example[field]
    return record


def jsonl_to_tfds(jsonl_paths_by_split: dict, data_dir: str, name: str, kind: str,
                  *, overwrite: bool = False) -> str:
    """Converts JSONL files into an array_record tfds dataset; returns its folder.

    `jsonl_paths_by_split` maps a split name to a spec or list of specs that
    `sources.read_records` reads (JSONL, gzip, glob, ...), validated as
    `kind`.  The dataset is `data_dir/name/1.0.0`; an existing one is replaced
    if `overwrite`, else it is an error.
    """
    records_by_split = {}
    for split, specs in jsonl_paths_by_split.items():
        specs = [specs] if isinstance(specs, str) else list(specs)
        records_by_split[split] = [r for spec in specs for r in sources.read_records(spec, kind)]
    return records_to_tfds(records_by_split, data_dir, name, kind, overwrite=overwrite)


def records_to_tfds(records_by_split: dict, data_dir: str, name: str, kind: str,
                    *, overwrite: bool = False) -> str:
    """Writes validated records as an array_record tfds dataset; returns its folder."""
    sources.check_kind(kind)
    _check_dataset_name(name)
    if not records_by_split:
        raise DataError(f"tfds dataset '{name}' needs at least one split.")
    for split, records in records_by_split.items():
        if not re.fullmatch(r"\w+", split) or not records:
            raise DataError(f"split {split!r} of tfds dataset '{name}' must be a word with records.")
    dataset_dir = os.path.join(data_dir, name, VERSION)
    if os.path.exists(dataset_dir):
        if not overwrite:
            raise DataError(f"tfds dataset {dataset_dir} exists; delete it or pass overwrite=True.")
        shutil.rmtree(dataset_dir)
    builder_class = _builder_class(name, kind, records_by_split)
    builder = builder_class(data_dir=data_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as download_dir, _quiet_tfds():
        # Nothing is downloaded; the folder only keeps data_dir clean.
        builder.download_and_prepare(download_dir=download_dir)
    return str(builder.data_dir)


def _check_dataset_name(name):
    """tfds names are snake_case identifiers (they become folder and file names)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataError(
            f"tfds dataset name {name!r} must be snake_case (a-z, 0-9, _), starting with a letter."
        )


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a local dataset: nothing to look up on GCS."""

    def initialize_from_bucket(self) -> None:
        # tfds would make (and leave behind) an empty temporary folder.
        pass


def _builder_class(name, kind, records_by_split):
    """A GeneratorBasedBuilder subclass that writes `records_by_split`."""

    class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        # No checksums or metadata files live next to this code, and tfds
        # 4.9.10 needs the importlib_resources backport to look for them.
        code_path = None

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs looks for
            # metadata files next to the class's source file.
            return _LocalDatasetInfo(
                builder=self,
                features=features_for(kind),
                # Examples in file order, keyed by their index.
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict({KIND_METADATA_KEY: kind}),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # Local records only.
            return {split: self._generate_examples(records)
                    for split, records in records_by_split.items()}

        def _generate_examples(self, records):
            for index, record in enumerate(records):
                yield index, encode_record(record, kind)

    _RecordsBuilder.name = name
    _RecordsBuilder.__name__ = _RecordsBuilder.__qualname__ = f"{name}_builder"
    return _RecordsBuilder


@contextlib.contextmanager
def _quiet_tfds():
    """Silences tfds' progress bars and "Downloading ..." prints for a while."""
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = tqdm_utils._active  # No public getter exists.
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was_active)


def read_tfds_spec(spec: str, kind: str, *, data_dir: str | None = None) -> list[dict]:
    """Reads `tfds:NAME[:split]` (split `train` by default) as `kind` records."""
    name, _, split = spec.removeprefix(sources.TFDS_PREFIX).partition(":")
    if not name:
        raise DataError(f"data spec {spec!r} names no dataset; write tfds:NAME or tfds:NAME:SPLIT.")
    return read_tfds(name, kind, split=split or DEFAULT_SPLIT, data_dir=data_dir)


def read_tfds(name: str, kind: str, *, split: str = DEFAULT_SPLIT,
              data_dir: str | None = None) -> list[dict]:
    """Returns the records of one split of an array_record tfds dataset.

    `name` is a dataset folder (holding dataset_info.json), or a name
    ("NAME", "NAME/CONFIG", "NAME/1.0.0") under `data_dir` (default: env
    TFDS_DATA_DIR, else ~/tensorflow_datasets), whose newest version is read.
    `split` may use tfds slicing ("train[:100]").
    """
    sources.check_kind(kind)
    dataset_dir = find_dataset_dir(name, data_dir)
    builder = tfds.builder_from_directory(dataset_dir)
    stored_kind = builder.info.metadata.get(KIND_METADATA_KEY) if builder.info.metadata else None
    if stored_kind is not None and stored_kind != kind:
        raise DataError(f"tfds dataset {dataset_dir} holds {stored_kind} records, not {kind} records.")
    # Our own datasets skip tfds' generic numpy decoding: reading the fields
    # off the tf.train.Example proto makes the whole read ~7x faster.
    raw = stored_kind is not None
    source = _data_source(builder, dataset_dir, split, raw=raw)
    records = []
    for start in range(0, len(source), READ_CHUNK):
        examples = source.__getitems__(range(start, min(start + READ_CHUNK, len(source))))
        for index, example in enumerate(examples, start):
            where = f"tfds dataset {dataset_dir} split {split} record {index}"
            record = _parse_raw(example, kind, where) if raw else _to_python(example, where)
            records.append(sources.validate_record(record, kind, where=where))
    if not records:
        raise DataError(f"tfds dataset {dataset_dir} split {split} has no records.")
    return records


def find_dataset_dir(name: str, data_dir: str | None = None) -> str:
    """The folder of a tfds dataset: `name` itself, or its newest version under data_dir."""
    if os.path.isfile(os.path.join(name, "dataset_info.json")):
        return name
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    folder = os.path.join(data_dir, name)
    if os.path.isfile(os.path.join(folder, "dataset_info.json")):
        return folder
    versions = []
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        info_path = os.path.join(folder, entry, "dataset_info.json")
        if re.fullmatch(r"\d+\.\d+\.\d+", entry) and os.path.isfile(info_path):
            versions.append(tuple(int(part) for part in entry.split(".")))
    if not versions:
        raise DataError(
            f"no prepared tfds dataset '{name}' in {data_dir} "
            f"(looked for {folder}/<version>/dataset_info.json)."
        )
    return os.path.join(folder, ".".join(str(part) for part in max(versions)))


def _data_source(builder, dataset_dir, split, *, raw):
    """builder.as_data_source(split), serialized bytes if `raw`, errors as DataErrors."""
    base_split = re.split(r"[\[+]", split, maxsplit=1)[0]
    if base_split not in builder.info.splits:
        raise DataError(
            f"tfds dataset {dataset_dir} has no split '{base_split}'; "
            f"it has {', '.join(sorted(builder.info.splits))}."
        )
    try:
        methods = decode.DeserializeMethod
        method = methods.RAW_BYTES if raw else methods.DESERIALIZE_AND_DECODE
        return builder.as_data_source(split=split, deserialize_method=method)
    except (ValueError, NotImplementedError) as error:
        first_line = str(error).strip().split("\n")[0]
        raise DataError(
            f"tfds dataset {dataset_dir} cannot be read without TensorFlow: {first_line} "
            "(prepare it with file_format='array_record')."
        ) from None


def _parse_raw(serialized, kind, where):
    """A serialized example of `features_for(kind)` as a record.

    tfds stores a Text as a one-item bytes_list, a bool as a one-item
    int64_list and a Sequence of dicts as one list per key ("chosen/role",
    "chosen/content"), absent when empty.
    """
    feature_map = tf_example_pb2.Example.FromString(serialized).features.feature
    try:
        example = {}
        for field, form in FIELDS[kind]:
            if form == "bool":
                example[field] = bool(feature_map[field].int64_list.value[0])
            if form in ("text", "either"):
                example[field] = _utf8(feature_map[field].bytes_list.value[0], where)
            if form in ("messages", "either"):
                name = field if form == "messages" else field + MESSAGES_SUFFIX
                example[name] = _raw_messages(feature_map, name, where)
    except (KeyError, IndexError) as error:
        raise DataError(
            f"{where}: the example lacks feature {error}; was the dataset written by flaxalign?"
        ) from None
    return decode_example(example, kind)


def _raw_messages(feature_map, name, where):
    """The message list that a Sequence feature `name` stores, [] if none."""
    if f"{name}/role" not in feature_map:
        return []
    roles = feature_map[f"{name}/role"].bytes_list.value
    contents = feature_map[f"{name}/content"].bytes_list.value
    return [{"role": _utf8(role, where), "content": _utf8(content, where)}
            for role, content in zip(roles, contents)]


def _utf8(data, where):
    """bytes as str, or a DataError naming the record."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{where}: a text field is not valid UTF-8 (byte offset {error.start})."
        ) from None


def _to_python(value, where):
    """A decoded tfds example as Python values: str for bytes, lists for arrays."""
    if isinstance(value, dict):
        if set(value) == {"role", "content"} and isinstance(value["role"], (list, np.ndarray)):
            roles, contents = _to_python(value["role"], where), _to_python(value["content"], where)
            return [{"role": role, "content": content} for role, content in zip(roles, contents)]
        return {key: _to_python(item, where) for key, item in value.items()}
    if isinstance(value, bytes):
        return _utf8(value, where)
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _to_python(value.item(), where)
        return [_to_python(item, where) for item in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_to_python(item, where) for item in value]
    if isinstance(value, np.generic):
        return _to_python(value.item(), where)
    return value

"""Training records on disk, in the column conventions of TRL, one `kind` per stage.

Kinds and the records they accept (a "message list" is a non-empty list of
`{"role": "system" | "user" | "assistant", "content": str}`, "system" only
first):

* `text` (causal-LM pretraining): `{"text": str}`.
* `sft`: `{"prompt": str, "completion": str}`, or `{"messages": [...]}`
  (multi-turn; at least one assistant message).
* `preference` (reward model, DPO family): `{"prompt": str, "chosen": str,
  "rejected": str}`, or the conversational form where `chosen` and `rejected`
  are message lists ending with an assistant message and `prompt` is a
  message list or absent (then the prompt is inside chosen/rejected).
* `kto` (unpaired preferences): `{"prompt": str, "completion": str,
  "label": bool}`.
* `prompt` (PPO, GRPO): `{"prompt": str | message list, "answer": str}`,
  `answer` optional (the reference answer of a verifiable reward).

`validate_record` returns a normalised copy: only the fields above, in that
order, messages reduced to role and content, an optional field that is null
dropped.  Other columns (ids, sources, ...) are ignored, as TRL's trainers do.
Strings are kept exactly (no stripping), but a prompt, completion, chosen,
rejected, text or answer that is empty or whitespace only is an error, as is
an empty user or assistant message.

`read_records(spec, kind)` reads a file, a folder, a glob, `tfds:NAME[:split]`
or a `builtin:` spec (see `flaxalign.data.embedded`).  Files ending in
`.jsonl`, `.json`, `.jsonl.gz` or `.json.gz` hold one JSON object per line
(blank lines skipped; a `.json` file may instead hold one JSON array of
objects); `.parquet` and `.arrow` files hold one record per row, and a
`datasets.save_to_disk` folder is read as its Arrow files
(`flaxalign.data.arrow_io`); other files are plain text, one `text` record
per document as `flaxalign.data.corpus.read_text_documents` splits them.  A
folder or glob that holds any JSON, Parquet or Arrow files is read as those
files only (so a README next to the data is not a record), in sorted path
order.  Rows in other column names or public shapes (HH-RLHF, Alpaca, GSM8K,
UltraFeedback) go through a `formats.RecordFormat` first.  Errors name the
file and its line (JSON) or row from 0 (Parquet, Arrow).
"""

import gzip
import json
import os
import zlib
from collections.abc import Iterator

from flaxalign.data import arrow_io, embedded
from flaxalign.data.corpus import read_text_documents
from flaxalign.data.formats import TRL, RecordFormat
from flaxalign.data.paths import list_files
from flaxalign.errors import ConfigError, DataError

KINDS = ("text", "sft", "preference", "kto", "prompt")
ROLES = ("system", "user", "assistant")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TFDS_PREFIX = "tfds:"

# What a record of each kind needs, for "missing field" messages.
_NEEDS = {
    "text": "text",
    "sft": "prompt and completion, or messages",
    "preference": "prompt, chosen, rejected",
    "kto": "prompt, completion, label",
    "prompt": "prompt, and optionally answer",
}


def check_kind(kind: str) -> None:
    """Raises ConfigError unless `kind` is one of KINDS."""
    if kind not in KINDS:
        raise ConfigError(f"unknown record kind {kind!r}; kinds are {', '.join(KINDS)}.")


def read_records(spec: str, kind: str, *, data_dir: str | None = None,
                 record_format: RecordFormat = TRL) -> list[dict]:
    """Returns the validated, normalised records of `spec` as a list of dicts.

    `spec` is a file, a folder, a glob, `tfds:NAME[:split]` (split `train` by
    default; NAME is a dataset name under `data_dir`, else env TFDS_DATA_DIR,
    else ~/tensorflow_datasets, or a dataset folder) or `builtin:NAME`.
    """
    return list(iter_records(spec, kind, data_dir=data_dir, record_format=record_format))


def iter_records(spec: str, kind: str, *, data_dir: str | None = None,
                 record_format: RecordFormat = TRL) -> Iterator[dict]:
    """Yields the validated, normalised records of `spec` one by one (files stream; see `read_records`)."""
    check_kind(kind)
    record_format.check(kind)
    for prefix in (embedded.BUILTIN_PREFIX, TFDS_PREFIX):
        if spec.startswith(prefix) and not record_format.is_plain_trl:
            raise ConfigError(f"data.format and data.columns apply to files (JSONL, Parquet, Arrow), not to "
                              f"{prefix} specs like '{spec}'.")
    if spec.startswith(embedded.BUILTIN_PREFIX):
        yield from embedded.builtin_records(spec, kind)
        return
    if spec.startswith(TFDS_PREFIX):
        # Imported here: tensorflow_datasets takes a while to import.
        from flaxalign.data import tfds_io

        yield from tfds_io.read_tfds_spec(spec, kind, data_dir=data_dir)
        return
    record_files = _record_files(spec)
    if not record_files:
        if kind != "text":
            raise DataError(
                f"'{spec}' holds no {'/'.join(JSON_SUFFIXES + arrow_io.SUFFIXES)} file; {kind} records must be "
                "JSON lines, Parquet or Arrow."
            )
        yield from ({"text": document} for document in read_text_documents(spec))
        return
    for path in record_files:
        yield from iter_file_records(path, kind, record_format=record_format)


def _record_files(spec: str) -> list[str]:
    """The JSON, Parquet and Arrow files of `spec` (a save_to_disk folder's in its own order)."""
    if os.path.isdir(spec):
        saved = arrow_io.saved_dataset_files(spec)
        if saved is not None:
            return saved
    return [path for path in list_files(spec) if is_json_file(path) or arrow_io.is_arrow_file(path)]


def is_json_file(path: str) -> bool:
    """True if `path` is read as JSON records (by its suffix)."""
    return path.endswith(JSON_SUFFIXES)


def iter_file_records(path: str, kind: str, *, record_format: RecordFormat = TRL) -> Iterator[dict]:
    """Yields the validated records of one JSON, Parquet or Arrow file, streaming line by line or batch by batch.

    Raises DataError naming the file and line (or row) for any bad record, and if the
    file holds no record at all.
    """
    check_kind(kind)
    if arrow_io.is_arrow_file(path):
        record_format.check_columns(arrow_io.column_names(path), where=f"{path} row 0", holder="the file")
        rows = ((f"{path} row {index}", row)
                for index, row in arrow_io.iter_rows(path, record_format.source_columns(kind)))
    else:
        rows = _json_rows(path)
    count = 0
    for where, row in rows:
        yield validate_record(record_format.to_record(row, kind, where=where), kind, where=where)
        count += 1
    if count == 0:
        raise DataError(f"file {path} has no records.")


def _json_rows(path):
    """Yields (where, parsed JSON value) of the records of a JSON-lines file (or a `.json` array)."""
    first = True
    for number, line in _numbered_lines(path):
        if not line.strip():
            continue
        if first and path.endswith((".json", ".json.gz")) and line.lstrip().startswith("["):
            # A JSON array (HF `to_json(lines=False)`), not JSON lines.
            yield from _array_rows(path)
            return
        first = False
        where = f"{path} line {number}"
        yield where, _parse_json(line, where)


def _numbered_lines(path):
    """Yields (line number, text) of a UTF-8 file, gunzipping `.gz` files."""
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                yield number, _decode_line(raw, path, number, offset)
                offset += len(raw)
    except (OSError, EOFError, zlib.error) as error:
        if not path.endswith(".gz") or isinstance(error, FileNotFoundError):
            raise DataError(f"cannot read {path}: {error}.") from None
        if number == 0:
            raise DataError(f"{path} is not a valid gzip file ({error}).") from None
        raise DataError(
            f"{path} line {number + 1}: the gzip data is corrupt or truncated ({error})."
        ) from None


def _decode_line(raw, path, number, offset):
    """Decodes one line as UTF-8, dropping a byte-order mark on line 1."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        where = "of the decompressed data" if path.endswith(".gz") else "in the file"
        raise DataError(
            f"{path} line {number}: not valid UTF-8 (byte offset {offset + error.start} {where}); "
            "re-encode the file as UTF-8."
        ) from None
    return line.removeprefix("\ufeff") if number == 1 else line


def _parse_json(line, where):
    """json.loads with the error turned into a DataError naming the place."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: malformed JSON ({_json_problem(error)}).") from None


def _json_problem(error: json.JSONDecodeError) -> str:
    # some of json's messages end in "at" ("Invalid control character at"): the column completes them
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _array_rows(path):
    """Yields (where, value) of the elements of a `.json` file that holds one JSON array."""
    text = "\n".join(line for _, line in _numbered_lines(path))
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} line {error.lineno}: malformed JSON ({_json_problem(error)})."
        ) from None
    if not isinstance(values, list):
        raise DataError(f"file {path} has no records.")
    for index, value in enumerate(values):
        yield f"{path} record {index}", value


def validate_record(record, kind: str, *, where: str) -> dict:
    """Checks one record of `kind` and returns its normalised copy.

    `where` names the record in errors ("data.jsonl line 3").  Raises
    DataError with one sentence naming `where` and the field at fault.
    """
    check_kind(kind)
    if not isinstance(record, dict):
        raise DataError(f"{where}: a {kind} record must be a JSON object, got {_type_name(record)}.")
    return _VALIDATORS[kind](record, where)


def _validate_text(record, where):
    return {"text": _string(record, "text", "text", where)}


def _validate_sft(record, where):
    if "messages" in record:
        extra = [name for name in ("prompt", "completion") if name in record]
        if extra:
            raise DataError(
                f"{where}: has both 'messages' and '{extra[0]}'; an sft record is "
                "prompt/completion or messages, not both."
            )
        messages = _messages(record["messages"], "messages", where)
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(
                f"{where}: 'messages' has no assistant message, so there is nothing to learn."
            )
        return {"messages": messages}
    return {
        "prompt": _string(record, "prompt", "sft", where),
        "completion": _string(record, "completion", "sft", where),
    }


def _validate_preference(record, where):
    for name in ("chosen", "rejected"):
        _require(record, name, "preference", where)
    if not isinstance(record["chosen"], (str, list)):
        _string(record, "chosen", "preference", where)  # Raises, naming both forms.
    margin = _optional_margin(record, where)
    if isinstance(record["chosen"], str):
        _same_form(record, "rejected", str, where)
        return {
            "prompt": _string(record, "prompt", "preference", where),
            "chosen": _string(record, "chosen", "preference", where),
            "rejected": _string(record, "rejected", "preference", where),
            **margin,
        }
    chosen = _messages(record["chosen"], "chosen", where)
    _same_form(record, "rejected", list, where)
    rejected = _messages(record["rejected"], "rejected", where)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: '{name}' must end with an assistant message, not {messages[-1]['role']}."
            )
    normalised = {}
    if record.get("prompt") is not None:
        if not isinstance(record["prompt"], list):
            raise DataError(
                f"{where}: 'prompt' must be a list of messages when 'chosen' is, got "
                f"{_type_name(record['prompt'])}."
            )
        normalised["prompt"] = _messages(record["prompt"], "prompt", where)
    normalised["chosen"] = chosen
    normalised["rejected"] = rejected
    return {**normalised, **margin}


def _optional_margin(record, where):
    """{"margin": float} when the record has one (TRL's reward-model margin column), else {}."""
    margin = record.get("margin")
    if margin is None:
        return {}
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
        raise DataError(f"{where}: 'margin' must be a number, got {_type_name(margin)}.")
    return {"margin": float(margin)}


def _same_form(record, name, form, where):
    """Checks that `name` is a string when chosen is, a list when chosen is."""
    if not isinstance(record[name], form):
        wanted = "a string" if form is str else "a list of messages"
        raise DataError(
            f"{where}: '{name}' must be {wanted} like 'chosen', got {_type_name(record[name])}."
        )


def _validate_kto(record, where):
    normalised = {
        "prompt": _string(record, "prompt", "kto", where),
        "completion": _string(record, "completion", "kto", where),
    }
    label = _require(record, "label", "kto", where)
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true or false, got {_type_name(label)}.")
    normalised["label"] = label
    return normalised


def _validate_prompt(record, where):
    prompt = _require(record, "prompt", "prompt", where)
    if isinstance(prompt, list):
        normalised = {"prompt": _messages(prompt, "prompt", where)}
    else:
        normalised = {"prompt": _string(record, "prompt", "prompt", where, or_messages=True)}
    if record.get("answer") is not None:
        normalised["answer"] = _string(record, "answer", "prompt", where)
    return normalised


_VALIDATORS = {
    "text": _validate_text,
    "sft": _validate_sft,
    "preference": _validate_preference,
    "kto": _validate_kto,
    "prompt": _validate_prompt,
}


def _require(record, name, kind, where):
    """Returns record[name], or raises naming the fields `kind` needs."""
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field '{name}' ({kind} records need {_NEEDS[kind]}).")
    return record[name]


def _string(record, name, kind, where, *, or_messages=None):
    """Returns record[name] if it is a non-blank string, else raises."""
    value = _require(record, name, kind, where)
    if or_messages is None:
        or_messages = kind == "preference"
    if not isinstance(value, str):
        wanted = "a string or a list of messages" if or_messages else "a string"
        raise DataError(f"{where}: '{name}' must be {wanted}, got {_type_name(value)}.")
    if not value.strip():
        raise DataError(f"{where}: '{name}' is empty.")
    return value


def _messages(value, name, where):
    """Returns a message list reduced to role/content, or raises naming the message."""
    if not isinstance(value, list):
        raise DataError(f"{where}: '{name}' must be a list of messages, got {_type_name(value)}.")
    if not value:
        raise DataError(f"{where}: '{name}' is an empty list of messages.")
    return [_message(message, f"{name}[{index}]", index, where) for index, message in enumerate(value)]


def _message(message, label, index, where):
    """Checks one {"role", "content"} message; `label` is like "chosen[2]"."""
    if not isinstance(message, dict):
        raise DataError(
            f"{where}: message {label} must be an object with role and content, "
            f"got {_type_name(message)}."
        )
    for field in ("role", "content"):
        if field not in message:
            raise DataError(f"{where}: message {label} has no '{field}'.")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(
            f"{where}: message {label} has unknown role {role!r} (allowed roles: {', '.join(ROLES)})."
        )
    if role == "system" and index != 0:
        raise DataError(
            f"{where}: message {label} is a system message; only the first message may be one."
        )
    if not isinstance(content, str):
        raise DataError(
            f"{where}: content of message {label} must be a string, got {_type_name(content)}."
        )
    if role != "system" and not content.strip():
        raise DataError(f"{where}: message {label} ({role}) has empty content.")
    return {"role": role, "content": content}


def _type_name(value):
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )

"""Rows in the shapes public datasets ship, turned into the TRL-style records `sources.validate_record` checks.

`data.format` names the shape of the rows and `data.columns` renames columns first (`{field: column}`: the
format reads `field` from the file's column `column`), so a file whose columns differ only in name needs no
preprocessing. The formats and the fields each reads, per record kind:

* `trl` (default): the record kinds of `flaxalign.data.sources` as they are.
* `hh_rlhf` (Anthropic HH-RLHF): `chosen` and `rejected` are whole transcripts
  "\\n\\nHuman: ...\\n\\nAssistant: ...". preference: the turns both share, up to their last shared Human turn,
  become the prompt messages and the turns after it chosen / rejected; sft: the chosen transcript as messages;
  prompt: the chosen transcript up to its last Human turn.
* `alpaca` (Stanford Alpaca): `instruction`, `input` (may be empty), `output`. The user message is the
  instruction, then a blank line and the input when there is one. sft: that message and `output` as the
  assistant's; prompt: the message, and `output` as the reference `answer`.
* `gsm8k` (GSM8K): `question`, `answer` = worked solution ending in "#### N". sft: question and the whole
  solution as messages; prompt: the question as a user message and N (thousands commas dropped) as the
  verifiable `answer` for GRPO's `exact_answer`.
* `ultrafeedback` (UltraFeedback binarized): `prompt` (string), `chosen` / `rejected` (message lists that
  start with the user turn), `messages`. preference: chosen and rejected (the prompt is their shared start);
  sft: `messages`; prompt: `prompt` as a user message.

The conversational forms make the stage's chat template apply, as these datasets are chat data.
"""

import dataclasses
import re
from collections.abc import Mapping

import ml_collections

from flaxalign.errors import ConfigError, DataError

TRL_FIELDS = {
    "text": ("text",),
    "sft": ("prompt", "completion", "messages"),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "kto": ("prompt", "completion", "label"),
    "prompt": ("prompt", "answer"),
}
# The fields each format reads, per kind it can give.
FIELDS = {
    "trl": TRL_FIELDS,
    "hh_rlhf": {"preference": ("chosen", "rejected"), "sft": ("chosen",), "prompt": ("chosen",)},
    "alpaca": {"sft": ("instruction", "input", "output"), "prompt": ("instruction", "input", "output")},
    "gsm8k": {"sft": ("question", "answer"), "prompt": ("question", "answer")},
    "ultrafeedback": {"preference": ("chosen", "rejected"), "sft": ("messages",), "prompt": ("prompt",)},
}
FORMATS = tuple(FIELDS)
# Every field name any format reads: the keys of the `data.columns` config block.
COLUMN_FIELDS = tuple(dict.fromkeys(field for kinds in FIELDS.values() for names in kinds.values()
                                    for field in names))


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """A `data.format` and its `data.columns` renames ((field, column) pairs); `label` is the config block that
    set them, for messages."""
    name: str = "trl"
    columns: tuple[tuple[str, str], ...] = ()
    label: str = dataclasses.field(default="data", compare=False)

    @property
    def is_plain_trl(self) -> bool:
        return self.name == "trl" and not self.columns

    def check(self, kind: str) -> None:
        """Raises ConfigError unless this format gives `kind` records and every renamed field is one it reads."""
        if self.name not in FIELDS:
            raise ConfigError(f"{self.label}.format={self.name!r} is not one of {', '.join(FORMATS)}.")
        if kind not in FIELDS[self.name]:
            raise ConfigError(f"{self.label}.format={self.name} gives {', '.join(FIELDS[self.name])} records, not "
                              f"{kind} records; use {self.label}.format=trl with {self.label}.columns for this stage.")
        reads = FIELDS[self.name][kind]
        for field, _ in self.columns:
            if field not in reads:
                raise ConfigError(f"{self.label}.columns.{field}: {self.label}.format={self.name} reads "
                                  f"{', '.join(reads)} for {kind} records, not {field}.")

    def source_columns(self, kind: str) -> list[str]:
        """The file columns the `kind` records are made of (so a columnar reader reads only those)."""
        renamed = dict(self.columns)
        return [renamed.get(field, field) for field in FIELDS[self.name][kind]]

    def to_record(self, row, kind: str, *, where: str):
        """The TRL-style record of one row (not validated yet; `sources.validate_record` does that)."""
        if not isinstance(row, dict):
            return row  # validate_record names the type
        if self.columns:
            row = _renamed(row, self, where)
        if self.name == "trl":
            return row
        return _ADAPTERS[self.name](row, kind, where)

    def check_columns(self, names, *, where: str, holder: str = "the row") -> None:
        """Raises DataError when a column `data.columns` names is not among `names` (a row's or a file's)."""
        for field, column in self.columns:
            if column not in names:
                raise DataError(f"{where}: no column '{column}' ({self.label}.columns.{field} names it); {holder} has "
                                f"{', '.join(map(repr, names)) or 'no columns'}.")


TRL = RecordFormat()


def from_config(block, label: str = "data") -> RecordFormat:
    """The RecordFormat of a config block with `format` and `columns` (absent = TRL; `label` names the block in
    messages), checked for its values' types; `check(kind)` checks it against the stage's record kind."""
    name = getattr(block, "format", "trl") or "trl"
    if name not in FIELDS:
        raise ConfigError(f"{label}.format={name!r} is not one of {', '.join(FORMATS)}.")
    columns = getattr(block, "columns", None) or {}
    if not isinstance(columns, (Mapping, ml_collections.ConfigDict)):
        raise ConfigError(f"{label}.columns must be a mapping of field to column name, got {columns!r}.")
    pairs = []
    for field, column in sorted(columns.items()):
        if field not in COLUMN_FIELDS:
            raise ConfigError(f"{label}.columns.{field} is not a field any format reads; fields are "
                              f"{', '.join(COLUMN_FIELDS)}.")
        if not isinstance(column, str):
            raise ConfigError(f"{label}.columns.{field} must be a column name (a string), got {column!r}.")
        if column and column != field:
            pairs.append((field, column))
    return RecordFormat(name, tuple(pairs), label)


def columns_block() -> dict:
    """The `data.columns` defaults: every field a format reads, "" = the column of the same name (so that
    `--config.data.columns.prompt=question` works from the command line)."""
    return {field: "" for field in COLUMN_FIELDS}


def _renamed(row: dict, record_format: RecordFormat, where: str) -> dict:
    record_format.check_columns(row, where=where)
    renamed = dict(row)
    for field, column in record_format.columns:
        renamed[field] = row[column]
    return renamed


def _text(row: dict, field: str, where: str, *, optional: bool = False) -> str:
    """row[field] as a string; a missing or null optional field is ""."""
    value = row.get(field)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing field '{field}'.")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{field}' must be a string, got {type(value).__name__}.")
    return value


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ---- hh_rlhf ----

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_messages(row: dict, field: str, where: str) -> list[dict]:
    """A "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as messages."""
    text = _text(row, field, where)
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: '{field}' is not an HH-RLHF transcript (it must start with "
                        "'\\n\\nHuman:' and alternate Human / Assistant turns).")
    return [{"role": _HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _last_user_turn_end(messages: list[dict], limit: int) -> int:
    """1 + the index of the last user message among messages[:limit], 0 if there is none."""
    return max((i + 1 for i in range(limit) if messages[i]["role"] == "user"), default=0)


def _hh_rlhf(row: dict, kind: str, where: str) -> dict:
    chosen = _hh_messages(row, "chosen", where)
    if kind == "sft":
        return {"messages": chosen}
    if kind == "prompt":
        cut = _last_user_turn_end(chosen, len(chosen))
        if cut == 0:
            raise DataError(f"{where}: 'chosen' has no Human turn.")
        return {"prompt": chosen[:cut]}
    rejected = _hh_messages(row, "rejected", where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = _last_user_turn_end(chosen, shared)
    if cut == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no Human turn, so there is no common prompt.")
    if cut == len(chosen) or cut == len(rejected):
        raise DataError(f"{where}: the transcripts end with a Human turn; chosen and rejected must end with "
                        "an Assistant turn.")
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


# ---- alpaca ----

def _alpaca(row: dict, kind: str, where: str) -> dict:
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, optional=True)
    request = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(row, "output", where, optional=kind == "prompt")
    if kind == "sft":
        return {"messages": _user(request) + [{"role": "assistant", "content": output}]}
    return {"prompt": _user(request), **({"answer": output} if output.strip() else {})}


# ---- gsm8k ----

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _gsm8k(row: dict, kind: str, where: str) -> dict:
    question = _text(row, "question", where)
    solution = _text(row, "answer", where)
    if kind == "sft":
        return {"messages": _user(question) + [{"role": "assistant", "content": solution}]}
    if "####" not in solution:
        raise DataError(f"{where}: 'answer' has no '#### N' final answer (GSM8K solutions end with one).")
    final = _THOUSANDS.sub("", solution.rpartition("####")[2].strip())
    return {"prompt": _user(question), "answer": final}


# ---- ultrafeedback ----

def _ultrafeedback(row: dict, kind: str, where: str) -> dict:
    if kind == "prompt":
        return {"prompt": _user(_text(row, "prompt", where))}
    if kind == "sft":
        return {"messages": row.get("messages")}
    return {"chosen": row.get("chosen"), "rejected": row.get("rejected")}


_ADAPTERS = {"hh_rlhf": _hh_rlhf, "alpaca": _alpaca, "gsm8k": _gsm8k, "ultrafeedback": _ultrafeedback}

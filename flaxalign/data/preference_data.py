"""Preference data: records → (prompt, chosen, rejected) token ids → [N, 2, T] arrays for `BatchIterator`.

Paired records (reward model, DPO family; kind `preference`):

* String form `{"prompt", "chosen", "rejected"}`: prompt = `[bos] prompt`, each completion = `completion [eos]`,
  like `sft_example`'s prompt/completion form.
* Conversational form (message lists): the prompt is the explicit `prompt` messages or, TRL's implicit-prompt
  form, the longest common prefix of `chosen` and `rejected` that ends before an assistant message.  The prompt ids
  are the prompt rendered with the generation prompt, and each completion is the rest of the full rendered
  conversation up to and including the end token of its last assistant message (chatml's newline after
  `<|im_end|>` is left out).  As in TRL, a completion that holds later user turns (conversations that diverge
  before their last answer) is scored whole.

Pairs whose chosen and rejected ids are equal carry no preference and are dropped (and counted).

Unpaired records (KTO; kind `kto`, `{"prompt", "completion", "label"}`) are laid out as pairs too: row 0 of
example i is prompt_i + completion_i and row 1 is prompt_i + completion_{(i+1) mod N}, the mismatched pair whose
log-ratio estimates KTO's KL anchor z0.  TRL pairs each prompt with the previous completion inside each batch; we
pair with the next completion of the split, in dataset order, once, so the anchor rows do not depend on the batch
size and shuffling (which moves whole [2, T] examples) keeps them.
"""

import dataclasses

import numpy as np

from flaxalign.data.batching import preference_batch, stack_pairs, truncate_examples
from flaxalign.data.chat import is_conversation, leading_ids, render_chat
from flaxalign.data.splits import read_splits
from flaxalign.errors import DataError


@dataclasses.dataclass
class PreferenceData:
    """train/eval: dicts of [N, 2, T] arrays (row 0 chosen, row 1 rejected); stats: counts for the log."""

    train: dict
    eval: dict
    stats: dict


@dataclasses.dataclass
class KtoData:
    """train/eval: dicts of [N, 2, T] arrays (row 0 the example, row 1 its KL-anchor row) plus `label` [N]."""

    train: dict
    eval: dict
    stats: dict


# ----------------------------------------------------------------------------
# Records → token ids.


def preference_example(record: dict, tokenizer, template: str, *,
                       source: str = "") -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one validated `preference` record."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if isinstance(record["chosen"], str):
        prompt = bos + tokenizer.encode(record["prompt"])
        return (prompt, tokenizer.encode(record["chosen"]) + [tokenizer.eos_id],
                tokenizer.encode(record["rejected"]) + [tokenizer.eos_id])
    where = source or "a preference record"
    chosen, rejected = record["chosen"], record["rejected"]
    if record.get("prompt") is not None:
        prompt_messages = record["prompt"]
        tails = {"chosen": chosen, "rejected": rejected}
    else:
        prompt_messages = _implicit_prompt(chosen, rejected, where)
        tails = {"chosen": chosen[len(prompt_messages):], "rejected": rejected[len(prompt_messages):]}
    lead = leading_ids(tokenizer, template)
    prompt_ids = lead + render_chat(prompt_messages, tokenizer, template, add_generation_prompt=True,
                                    source=f"{where} (prompt)").ids
    completions = [_completion_ids(prompt_ids, prompt_messages, tails[name], name, lead, tokenizer, template, where)
                   for name in ("chosen", "rejected")]
    return prompt_ids, completions[0], completions[1]


def _implicit_prompt(chosen, rejected, where):
    """The longest common prefix of the two conversations that does not end with an assistant message."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if not shared:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no leading messages before an assistant answer, so "
            "there is no implicit prompt; give the prompt messages as 'prompt'."
        )
    return chosen[:shared]


def _completion_ids(prompt_ids, prompt_messages, tail, name, lead, tokenizer, template, where):
    """The ids of the conversation prompt + tail after `prompt_ids`, up to its last assistant end token."""
    if tail[0]["role"] != "assistant":
        raise DataError(
            f"{where}: '{name}' continues the prompt with a {tail[0]['role']} message; the completion after "
            "the prompt must start with an assistant message."
        )
    chat = render_chat(list(prompt_messages) + list(tail), tokenizer, template, source=f"{where} ({name})")
    ids, mask = lead + chat.ids, [0] * len(lead) + chat.assistant_mask
    if ids[:len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"{where}: the {template} rendering of the conversation with '{name}' does not start with the "
            "rendering of its prompt, so the completion cannot be cut out of it."
        )
    end = len(mask) - mask[::-1].index(1)  # after the last assistant token, its end token
    return ids[len(prompt_ids):end]


def kto_example(record: dict, tokenizer, template: str, *, source: str = "") -> tuple[list[int], list[int], bool]:
    """(prompt_ids, completion_ids, label) of one validated `kto` record, encoded like string preference pairs.

    `template` and `source` are unused while `kto` records are strings only; they keep the signature of
    `preference_example`.
    """
    del template, source
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return (bos + tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"]) + [tokenizer.eos_id],
            bool(record["label"]))


# ----------------------------------------------------------------------------
# Datasets.


def build_preference_datasets(data_cfg, tokenizer, *, log=print) -> PreferenceData:
    """Reads, encodes and batches `preference` records.

    `data_cfg`: `train`, `eval` (record specs; "" = hold out `eval_fraction` of train), `eval_fraction`,
    `chat_template`, `seq_len`, `overlong` ("truncate_prompt_left" | "drop"), `max_examples` (0 = all).
    Stats per split: `{split}_identical_dropped`, the `truncate_examples` counts as `{split}_examples`,
    `_kept`, `_truncated`, `_dropped`, `_tokens_removed`, and `{split}_pairs`.
    """
    splits, stats = {}, {}
    for name, (spec, records) in read_splits(data_cfg, "preference").items():
        pairs = [preference_example(record, tokenizer, data_cfg.chat_template, source=f"{name} record {index}")
                 for index, record in enumerate(records)]
        margins = _margins(records, spec)
        different = [list(pair[1]) != list(pair[2]) for pair in pairs]
        distinct = [pair for pair, keep in zip(pairs, different) if keep]
        stats[f"{name}_identical_dropped"] = len(pairs) - len(distinct)
        if not distinct:
            raise DataError(
                f"all {len(pairs)} {name} pairs of '{spec}' have the same chosen and rejected tokens, so there "
                "is no preference to learn."
            )
        max_len = int(data_cfg.seq_len) + 1
        kept, counts = truncate_examples(distinct, max_len, data_cfg.overlong)
        splits[name] = stack_pairs(preference_batch(kept, int(data_cfg.seq_len), pad_id=tokenizer.pad_id))
        if margins is not None:  # follow the pairs through both filters ("drop" removes the over-long ones)
            margins = [m for m, keep in zip(margins, different) if keep]
            if data_cfg.overlong == "drop":
                margins = [m for m, (p, c, r) in zip(margins, distinct) if len(p) + max(len(c), len(r)) <= max_len]
            splits[name]["margin"] = np.asarray(margins, np.float32)
        stats.update({f"{name}_{key}": int(value) for key, value in counts.items()})
        stats[f"{name}_pairs"] = len(kept)
        stats[f"{name}_conversations"] = sum(map(is_conversation, records))
    log("data: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    return PreferenceData(train=splits["train"], eval=splits["eval"], stats=stats)


def _margins(records, spec):
    """The records' `margin` values, None when no record has one; all or none must have one."""
    given = [record.get("margin") for record in records]
    if all(m is None for m in given):
        return None
    missing = next(i for i, m in enumerate(given) if m is None) if None in given else None
    if missing is not None:
        raise DataError(f"{spec}: record {missing} has no 'margin' but others do; give every pair a margin or none.")
    return given


def build_kto_datasets(data_cfg, tokenizer, *, log=print) -> KtoData:
    """Reads, encodes and batches `kto` records (see the module docstring for the KL-anchor row).

    `data_cfg` as for `build_preference_datasets`.  Each split's arrays are `stack_pairs(preference_batch(...))`
    of the triples (prompt_i, completion_i, completion_{(i+1) mod N}) plus a float32 `label` [N] (1.0 desirable,
    0.0 undesirable).  An over-long triple is truncated or dropped as a whole, by its longer row, so both rows keep
    the same prompt.  Stats per split: the `truncate_examples` counts (`{split}_examples`, ...), and
    `{split}_desirable` / `{split}_undesirable` after over-length handling.  With `eval` = "", the held-out
    records are every k-th desirable and every k-th undesirable record, so eval has both labels.
    """
    splits, stats = {}, {}
    for name, (spec, records) in read_splits(data_cfg, "kto").items():
        examples = [kto_example(record, tokenizer, data_cfg.chat_template, source=f"{name} record {index}")
                    for index, record in enumerate(records)]
        if len(examples) < 2:
            raise DataError(
                f"the {name} split of '{spec}' has {len(examples)} kto example(s); KTO needs at least 2 so that "
                "each prompt can be paired with another example's completion."
            )
        triples = [(prompt, completion, examples[(index + 1) % len(examples)][1])
                   for index, (prompt, completion, _) in enumerate(examples)]
        labels = np.asarray([label for _, _, label in examples], dtype=np.float32)
        max_len = int(data_cfg.seq_len) + 1
        kept, counts = truncate_examples(triples, max_len, data_cfg.overlong)
        if len(kept) < len(triples):  # "drop" removed over-long triples: drop their labels too
            labels = labels[[len(p) + max(len(c), len(k)) <= max_len for p, c, k in triples]]
        splits[name] = stack_pairs(preference_batch(kept, int(data_cfg.seq_len), pad_id=tokenizer.pad_id))
        splits[name]["label"] = labels
        stats.update({f"{name}_{key}": int(value) for key, value in counts.items()})
        stats[f"{name}_desirable"] = int(labels.sum())
        stats[f"{name}_undesirable"] = len(labels) - int(labels.sum())
        stats[f"{name}_conversations"] = sum(map(is_conversation, records))
        if name == "train" and not (stats["train_desirable"] and stats["train_undesirable"]):
            missing = "desirable (label true)" if not stats["train_desirable"] else "undesirable (label false)"
            raise DataError(
                f"the train split of '{spec}' has no {missing} examples; KTO needs both kinds."
            )
    log("data: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    return KtoData(train=splits["train"], eval=splits["eval"], stats=stats)

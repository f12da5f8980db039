"""Prompt data for the stages that sample (PPO, GRPO, online DPO, distillation): `prompt` records → left-padded
[N, L] prompt arrays; for distillation on dataset completions, `sft` records → the same prompt arrays plus the
completions (`build_prompt_completion_datasets`).

A record is `{"prompt": str | message list, "answer": str}` (answer optional; see `flaxalign.data.sources`).
Prompts are encoded like the prompt side of `preference_example`: a string prompt is `[bos] prompt`, a message
list is rendered with the chat template and its generation prompt (`plain` adds the bos, as for SFT).

Prompts longer than `max_prompt_len` are cut on the left (the bos, when there is one, stays first): the end of a
prompt is what the answer must follow, and dropping prompts would change which questions the policy is trained
on.  Every row is left-padded to `max_prompt_len` so generation appends to all rows at the same column, and
carries `index`, its record's position in `PromptData.records[split]`, so rewards can look up the answer.
"""

import dataclasses

import numpy as np

from flaxalign.data.batching import left_pad_prompts
from flaxalign.data.chat import is_conversation, leading_ids, render_chat
from flaxalign.data.sft_data import sft_example
from flaxalign.data.splits import read_splits
from flaxalign.errors import ConfigError, DataError


@dataclasses.dataclass
class PromptData:
    """train/eval: int32 `input_ids`, `attention_mask`, `positions` [N, L] and `index` [N]; records: the
    validated records of each split ("prompt", "answer") in row order; stats: counts for the log."""

    train: dict
    eval: dict
    records: dict
    stats: dict


def prompt_example(record: dict, tokenizer, template: str, *, source: str = "") -> list[int]:
    """The prompt ids of one validated `prompt` record, ready for generation.

    A string prompt is `[bos] + encode(prompt)` (no bos when the tokenizer has none); a message list is the
    `template` rendering with the generation prompt, after a bos for `plain` only (chatml adds none, llama3
    writes its own `<|begin_of_text|>`).  `source` names the record in errors.
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if isinstance(record["prompt"], str):
        return bos + tokenizer.encode(record["prompt"])
    lead = leading_ids(tokenizer, template)
    return lead + render_chat(record["prompt"], tokenizer, template, add_generation_prompt=True,
                              source=source or "a prompt record").ids


def truncate_prompt_left(ids: list[int], max_len: int, bos_id) -> list[int]:
    """`ids` cut to at most `max_len` tokens from the left.

    A prompt that starts with `bos_id` keeps the bos and its last `max_len - 1` tokens, otherwise it keeps its
    last `max_len` tokens.  Returns a new list; raises ValueError when `max_len` < 1.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - (max_len - 1):]
    return ids[len(ids) - max_len:]


def build_prompt_datasets(data_cfg, tokenizer, *, max_prompt_len: int, log=print) -> PromptData:
    """Reads, encodes, left-truncates and left-pads `prompt` records.

    `data_cfg`: `train`, `eval` (record specs; "" = hold out `eval_fraction` of train), `eval_fraction`,
    `max_examples` (0 = all; caps train) and `chat_template`.  Every split's arrays are
    `left_pad_prompts(..., length=max_prompt_len)` plus `index`.  Stats per split: `{split}_prompts`,
    `{split}_truncated` (prompts cut to `max_prompt_len`) and `{split}_tokens_removed`.  Raises ConfigError
    when `max_prompt_len` < 2 and DataError when a split has no prompts.
    """
    max_prompt_len = int(max_prompt_len)
    if max_prompt_len < 2:
        raise ConfigError(
            f"max_prompt_len must be at least 2 (a bos and one prompt token), got {max_prompt_len}; raise it."
        )
    splits, records_by_split, stats = {}, {}, {}
    for name, (spec, records) in read_splits(data_cfg, "prompt").items():
        if not records:
            raise DataError(f"the {name} split of '{spec}' has no prompts; give it at least one prompt record.")
        prompts, truncated, removed = [], 0, 0
        for index, record in enumerate(records):
            ids = prompt_example(record, tokenizer, data_cfg.chat_template, source=f"{name} record {index}")
            kept = truncate_prompt_left(ids, max_prompt_len, tokenizer.bos_id)
            truncated += len(kept) < len(ids)
            removed += len(ids) - len(kept)
            prompts.append(kept)
        arrays = left_pad_prompts(prompts, pad_id=tokenizer.pad_id, length=max_prompt_len)
        arrays["index"] = np.arange(len(prompts), dtype=np.int32)
        splits[name], records_by_split[name] = arrays, list(records)
        stats[f"{name}_prompts"] = len(prompts)
        stats[f"{name}_truncated"] = int(truncated)
        stats[f"{name}_tokens_removed"] = int(removed)
        stats[f"{name}_conversations"] = sum(map(is_conversation, records))
    log("data: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    return PromptData(train=splits["train"], eval=splits["eval"], records=records_by_split, stats=stats)


def prompt_texts(records: list[dict]) -> list[str]:
    """Each record's prompt as text, for reward functions.

    A string prompt is returned as is; for a message list it is the content of its last user message (the
    question being answered), or of its last message when it has no user message.
    """
    texts = []
    for record in records:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            texts.append(prompt)
            continue
        users = [message for message in prompt if message["role"] == "user"]
        texts.append((users[-1] if users else prompt[-1])["content"])
    return texts


def split_completion(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, completion) of an SFT example's ids and loss mask: the completion is the last run of loss tokens
    (the last assistant turn with its end-of-turn token, or `completion [eos]`), the prompt everything before it."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return list(ids[:start]), list(ids[start:end])


def _prompt_of(record: dict) -> dict:
    """The `prompt` record of an `sft` record: its prompt, or its messages before the last assistant turn."""
    if "prompt" in record:
        return {"prompt": record["prompt"]}
    messages = record["messages"]
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return {"prompt": messages[:last]}


def build_prompt_completion_datasets(data_cfg, tokenizer, *, max_prompt_len: int, max_completion_len: int,
                                     log=print) -> PromptData:
    """`sft` records (prompt/completion or messages) → the prompt arrays of `build_prompt_datasets` plus int32
    `completion` and `completion_mask` [N, max_completion_len] and `completion_ended` [N] (1: not cut): each
    record's last assistant turn (or completion and eos) as SFT trains on it, right-padded and cut to
    `max_completion_len` (counted). Records keep their "prompt"
    (for messages: the conversation before the last assistant turn)."""
    max_prompt_len = int(max_prompt_len)
    if max_prompt_len < 2:
        raise ConfigError(f"max_prompt_len must be at least 2 (a bos and one prompt token), got {max_prompt_len}.")
    splits, records_by_split, stats = {}, {}, {}
    for name, (spec, records) in read_splits(data_cfg, "sft").items():
        if not records:
            raise DataError(f"the {name} split of '{spec}' has no records; give it at least one sft record.")
        prompts, completions, full, truncated, removed, cut = [], [], [], 0, 0, 0
        for index, record in enumerate(records):
            ids, mask = sft_example(record, tokenizer, data_cfg.chat_template, source=f"{name} record {index}")
            prompt, completion = split_completion(ids, mask)
            kept = truncate_prompt_left(prompt, max_prompt_len, tokenizer.bos_id)
            truncated += len(kept) < len(prompt)
            removed += len(prompt) - len(kept)
            cut += len(completion) > max_completion_len
            prompts.append(kept)
            full.append(completion)
            completions.append(completion[:max_completion_len])
        arrays = left_pad_prompts(prompts, pad_id=tokenizer.pad_id, length=max_prompt_len)
        arrays["index"] = np.arange(len(prompts), dtype=np.int32)
        arrays["completion"] = np.full((len(prompts), max_completion_len), tokenizer.pad_id, np.int32)
        arrays["completion_mask"] = np.zeros((len(prompts), max_completion_len), np.int32)
        arrays["completion_ended"] = np.array([len(c) <= max_completion_len for c in full], np.int32)
        for row, completion in enumerate(completions):
            arrays["completion"][row, :len(completion)] = completion
            arrays["completion_mask"][row, :len(completion)] = 1
        splits[name] = arrays
        records_by_split[name] = [_prompt_of(record) for record in records]
        stats.update({f"{name}_prompts": len(prompts), f"{name}_truncated": int(truncated),
                      f"{name}_tokens_removed": int(removed), f"{name}_completions_cut": int(cut),
                      f"{name}_conversations": sum(map(is_conversation, records))})
    log("data: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    return PromptData(train=splits["train"], eval=splits["eval"], records=records_by_split, stats=stats)

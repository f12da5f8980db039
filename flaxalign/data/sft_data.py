"""SFT data: records → token examples with a loss mask on the completion (or assistant) tokens → packed rows.

Prompt/completion records are encoded as `[bos] prompt completion [eos]` with the loss on `completion [eos]` (TRL's
completion-only loss for non-conversational data). Conversational records (`messages`) are rendered with the chat
template and trained on the assistant tokens only.
"""

import dataclasses

import numpy as np

from flaxalign.data.batching import pack_sft, truncate_examples
from flaxalign.data.chat import is_conversation, leading_ids, render_chat
from flaxalign.data.splits import read_splits


@dataclasses.dataclass
class SftData:
    train: dict
    eval: dict
    stats: dict


def sft_example(record: dict, tokenizer, template: str, *, source: str = "") -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one validated `sft` record."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if "messages" in record:
        chat = render_chat(record["messages"], tokenizer, template, source=source)
        lead = leading_ids(tokenizer, template)
        return lead + chat.ids, [0] * len(lead) + chat.assistant_mask
    prompt = bos + tokenizer.encode(record["prompt"])
    completion = tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def build_sft_datasets(data_cfg, tokenizer, *, log=print) -> SftData:
    """`data_cfg`: `train`, `eval` (record specs; "" = hold out `eval_fraction` of train), `eval_fraction`,
    `chat_template`, `seq_len`, `overlong` ("truncate_prompt_left" | "drop"), `max_examples` (0 = all),
    `format` / `columns` (`flaxalign.data.formats`)."""
    splits = read_splits(data_cfg, "sft")
    (_, train_records), (_, eval_records) = splits["train"], splits["eval"]
    splits, stats = {}, {}
    for name, records in (("train", train_records), ("eval", eval_records)):
        examples = [sft_example(r, tokenizer, data_cfg.chat_template, source=f"{name} record {i}")
                    for i, r in enumerate(records)]
        kept, counts = truncate_examples(examples, int(data_cfg.seq_len) + 1, data_cfg.overlong)
        splits[name] = pack_sft(kept, int(data_cfg.seq_len), pad_id=tokenizer.pad_id)
        stats.update({f"{name}_{key}": int(value) for key, value in counts.items()})
        stats[f"{name}_rows"] = len(splits[name]["inputs"])
        stats[f"{name}_loss_tokens"] = int(np.sum(splits[name]["loss_mask"]))
        stats[f"{name}_conversations"] = sum(map(is_conversation, records))
    log("data: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    log(describe_split(stats, len(train_records), len(eval_records), int(data_cfg.seq_len),
                       held_out=not data_cfg.eval, batch_size=int(getattr(data_cfg, "batch_size", 0) or 0)))
    return SftData(train=splits["train"], eval=splits["eval"], stats=stats)


def describe_split(stats: dict, train_examples: int, eval_examples: int, seq_len: int, *, held_out: bool,
                   batch_size: int) -> str:
    """One readable line on how the records became rows (examples packed several to a row, truncated, dropped,
    the eval split), with a warning when the eval split fills less than one batch."""
    line = (f"data: {train_examples} train examples packed into {stats['train_rows']} rows of {seq_len} tokens "
            f"({stats['train_truncated']} truncated, {stats['train_dropped']} dropped); {eval_examples} eval "
            f"examples ({'held out from data.train by data.eval_fraction' if held_out else 'data.eval'}) in "
            f"{stats['eval_rows']} rows")
    if batch_size and stats["eval_rows"] < batch_size:
        line += (f"\nwarning: the eval split fills {stats['eval_rows']} of the {batch_size} rows of one batch, so "
                 "eval losses rest on very few examples; give data.eval or a larger data.eval_fraction")
    return line

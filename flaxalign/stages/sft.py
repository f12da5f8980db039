"""Supervised fine-tuning: L = −Σ_t m_t log p_θ(y_t | x, y_<t), the mask m on completion (or assistant) tokens only,
normalised by the global number of loss tokens. Full fine-tuning, LoRA (`lora.rank > 0`) or bottleneck adapters
(`adapters.placement`) on a frozen base, stored in model.frozen_dtype or quantized (`quantization.base`, QLoRA);
the loss, steps and task builder are the LM stages' (`stages/lm.py`)."""

import functools

from flaxalign.data.sft_data import build_sft_datasets
from flaxalign.stages import lm
from flaxalign.stages.description import Description
from flaxalign.train.task import Task

sft_loss = lm.lm_loss
sft_step = lm.lm_step
sft_eval_step = lm.lm_eval_step
make_task = functools.partial(lm.make_task, "sft")


def describe(config, mesh) -> Description:
    return lm.describe("sft", config, mesh)


def build_task(config, workdir: str, mesh) -> Task:
    """Model and tokenizer from `init_from` (a CLM/SFT run), SFT data from `data.train`, LoRA from `lora`."""
    d = describe(config, mesh)
    tokenizer = lm.stage_tokenizer(config, d.meta, d.model_config, "SFT")
    lm.resolve_chat_template(config, d.meta, tokenizer)
    data = build_sft_datasets(config.data, tokenizer)
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)
    return d.with_data(train_data=train_data, eval_batches=eval_batches,
                       metadata={"tokenizer": tokenizer.model_path, "init_from": config.init_from, "data": data.stats,
                                 **lm.chat_metadata(config, d.meta, data.stats)})

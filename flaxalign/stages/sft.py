"""Supervised fine-tuning: L = −Σ_t m_t log p_θ(y_t | x, y_<t), the mask m on completion (or assistant) tokens only,
normalised by the global number of loss tokens. Full fine-tuning, LoRA (`lora.rank > 0`) or bottleneck adapters
(`adapters.placement`) on a frozen base, stored in model.frozen_dtype or quantized (`quantization.base`, QLoRA);
the loss, steps and task builder are the LM stages' (`stages/lm.py`)."""

import functools

from flaxalign import weights
from flaxalign.data.sft_data import build_sft_datasets
from flaxalign.stages import lm
from flaxalign.stages.checks import check_shapes
from flaxalign.train.task import Task

sft_loss = lm.lm_loss
sft_step = lm.lm_step
sft_eval_step = lm.lm_eval_step
make_task = functools.partial(lm.make_task, "sft")


def build_task(config, workdir: str, mesh) -> Task:
    """Model and tokenizer from `init_from` (a CLM/SFT run), SFT data from `data.train`, LoRA from `lora`."""
    data_cfg = config.data
    model_config, meta, init_path = weights.resolve_model(config)
    tokenizer = lm.stage_tokenizer(config, meta, model_config, "SFT")
    check_shapes(config, model_config, mesh)
    policy = weights.trainable_model(config, model_config)

    lm.resolve_chat_template(config, meta, tokenizer)
    data = build_sft_datasets(data_cfg, tokenizer)
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)

    tokens = data_cfg.batch_size * data_cfg.seq_len
    return make_task(
        policy, config.optim, grad_accum=config.grad_accum, chunk_size=config.loss_chunk,
        init_base=weights.initializer(model_config, init_path), train_data=train_data, eval_batches=eval_batches,
        tokens_per_step=tokens, flops_per_step=tokens * model_config.flops_per_token(data_cfg.seq_len),
        metadata={"tokenizer": tokenizer.model_path, "init_from": config.init_from, "data": data.stats,
                  **lm.chat_metadata(config, meta, data.stats)})

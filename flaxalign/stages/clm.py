"""Causal-LM pretraining: L = −Σ_t log p_θ(w_t | w_<t), normalised by the global number of loss tokens.
Full training by default; `init_from` continues from a checkpoint, `lora` / `adapters` train on a frozen base."""

import functools
import types

from flaxalign import errors, weights
from flaxalign.data.loader import build_clm_datasets
from flaxalign.stages import lm
from flaxalign.stages.checks import check_shapes
from flaxalign.train.task import Task

# CLM and SFT share the loss and step: they differ in their data (SFT masks the prompt tokens out of the loss).
clm_loss = lm.lm_loss
clm_step = lm.lm_step
clm_eval_step = lm.lm_eval_step
make_task = functools.partial(lm.make_task, "clm")


def build_task(config, workdir: str, mesh) -> Task:
    """Model, data and steps of a CLM run, from the resolved config."""
    model_config, meta, init_path = weights.resolve_model(config)
    data_cfg = config.data
    check_shapes(config, model_config, mesh)
    policy = weights.trainable_model(config, model_config)
    if init_path and not data_cfg.tokenizer:  # continue with the checkpoint's tokenizer, never a new one
        data_cfg = types.SimpleNamespace(**{**data_cfg.to_dict(), "tokenizer": meta["tokenizer"]})

    data = build_clm_datasets(data_cfg, workdir)
    if data.tokenizer.vocab_size > model_config.vocab_size:
        raise errors.ConfigError(
            f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size={model_config.vocab_size}.")
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)

    tokens = data_cfg.batch_size * data_cfg.seq_len
    return make_task(
        policy, config.optim, grad_accum=config.grad_accum,
        chunk_size=config.loss_chunk, init_base=weights.initializer(model_config, init_path),
        train_data=train_data, eval_batches=eval_batches,
        tokens_per_step=tokens, flops_per_step=tokens * model_config.flops_per_token(data_cfg.seq_len),
        metadata={"tokenizer": data.tokenizer.model_path, "init_from": config.init_from, "data": dict(data.stats),
                  "chat_template": meta.get("chat_template", "")})

"""Causal-LM pretraining: L = −Σ_t log p_θ(w_t | w_<t), normalised by the global number of loss tokens.
Full training by default; `init_from` continues from a checkpoint, `lora` / `adapters` train on a frozen base."""

import functools
import types

from flaxalign import errors
from flaxalign.data.loader import build_clm_datasets
from flaxalign.stages import lm
from flaxalign.stages.description import Description
from flaxalign.train.task import Task

# CLM and SFT share the loss and step: they differ in their data (SFT masks the prompt tokens out of the loss).
clm_loss = lm.lm_loss
clm_step = lm.lm_step
clm_eval_step = lm.lm_eval_step
make_task = functools.partial(lm.make_task, "clm")


def describe(config, mesh) -> Description:
    return lm.describe("clm", config, mesh)


def build_task(config, workdir: str, mesh) -> Task:
    """Model, data and steps of a CLM run, from the resolved config."""
    d = describe(config, mesh)
    data_cfg = config.data
    if d.init_path and not data_cfg.tokenizer:  # continue with the checkpoint's tokenizer, never a new one
        data_cfg = types.SimpleNamespace(**{**data_cfg.to_dict(), "tokenizer": d.meta["tokenizer"]})
    data = build_clm_datasets(data_cfg, workdir)
    if data.tokenizer.vocab_size > d.model_config.vocab_size:
        raise errors.ConfigError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size="
                                 f"{d.model_config.vocab_size}.")
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)
    return d.with_data(train_data=train_data, eval_batches=eval_batches,
                       metadata={"tokenizer": data.tokenizer.model_path, "init_from": config.init_from,
                                 "data": dict(data.stats), "chat_template": d.meta.get("chat_template", "")})

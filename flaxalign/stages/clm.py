"""Causal-LM pretraining: L = −Σ_t log p_θ(w_t | w_<t), normalised by the global number of loss tokens."""

import functools
import math

import jax

from flaxalign import errors, models
from flaxalign.data.loader import BatchIterator, build_clm_datasets
from flaxalign.losses.lm import token_cross_entropy
from flaxalign.stages.checks import check_shapes
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task


def clm_loss(params, frozen, batch, rng, *, graphdef, chunk_size, layer_transform=None):
    """(Σ token losses, (loss-token count, {})) of one batch of packed sequences. `layer_transform`: see
    `CausalLM.__call__` (LoRA applied per layer)."""
    del frozen, rng  # the CLM loss uses neither
    model = models.merge(graphdef, params)
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], layer_transform=layer_transform)
    loss_sum, count = token_cross_entropy(hidden, model.unembedding(), batch["targets"], batch["loss_mask"],
                                          chunk_size=chunk_size)
    return loss_sum, (count, {})


def clm_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int, chunk_size: int):
    """One optimizer update from one global batch (split into `grad_accum` micro-batches)."""
    loss_fn = functools.partial(clm_loss, graphdef=graphdef, chunk_size=chunk_size)
    return gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)


def clm_eval_step(state, batch, *, graphdef, chunk_size):
    loss_sum, (count, _) = clm_loss(state.params, state.frozen, batch, None, graphdef=graphdef,
                                    chunk_size=chunk_size)
    return {"loss": loss_sum, "count": count}


def build_task(config, workdir: str, mesh) -> Task:
    """Model, data and steps of a CLM run, from the resolved config."""
    model_config = models.ModelConfig.from_dict(config.model)
    data_cfg = config.data
    check_shapes(config, model_config, mesh)

    data = build_clm_datasets(data_cfg, workdir)
    if data.tokenizer.vocab_size > model_config.vocab_size:
        raise errors.ConfigError(
            f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size={model_config.vocab_size}.")
    if jax.process_count() > 1 and data_cfg.batch_size % jax.process_count():
        raise errors.ConfigError(
            f"data.batch_size={data_cfg.batch_size} is not divisible by the {jax.process_count()} processes.")
    train_data = BatchIterator(data.train, data_cfg.batch_size, seed=config.seed, shuffle=True,
                               process_index=jax.process_index(), process_count=jax.process_count())

    def eval_batches():
        rows = len(data.eval["inputs"])
        n = min(config.eval_batches, math.ceil(rows / data_cfg.batch_size))
        it = BatchIterator(data.eval, data_cfg.batch_size, seed=0, shuffle=False,
                           process_index=jax.process_index(), process_count=jax.process_count())
        return (next(it) for _ in range(n))

    tokens = data_cfg.batch_size * data_cfg.seq_len
    return make_task(
        model_config, config.optim, seed=config.seed, grad_accum=config.grad_accum, chunk_size=config.loss_chunk,
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens,
        flops_per_step=tokens * model_config.flops_per_token(data_cfg.seq_len),
        metadata={"tokenizer": data.tokenizer.model_path, "data": dict(data.stats)})


def make_task(model_config: models.ModelConfig, optim_cfg, *, seed: int = 0, grad_accum: int = 1,
              chunk_size: int = 256, train_data=None, eval_batches=None, tokens_per_step: int = 0,
              flops_per_step: float = 0.0, metadata: dict | None = None) -> Task:
    """The CLM task from a model config and an `optim` config block; data is optional (tests, benchmarks)."""
    graphdef, abstract_params, logical = models.abstract_model(model_config)
    optimizer = make_optimizer(optim_cfg)
    return Task(
        name="clm",
        abstract_params=abstract_params,
        params_logical=logical,
        init_params=lambda shardings, frozen: models.init_params(model_config, seed, shardings),
        optimizer=optimizer,
        train_step=functools.partial(clm_step, graphdef=graphdef, optimizer=optimizer,
                                     schedule=learning_rate_schedule(optim_cfg), grad_accum=grad_accum,
                                     chunk_size=chunk_size),
        eval_step=functools.partial(clm_eval_step, graphdef=graphdef, chunk_size=chunk_size),
        train_data=train_data,
        eval_batches=eval_batches,
        tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step,
        metadata={"stage": "clm", "model": model_config.to_dict(),
                  "resume_identity": model_config.checkpoint_identity(), **(metadata or {})},
    )

"""What the language-modelling stages (CLM, SFT) share: the masked token loss of a trainable model, its train/eval
steps, the task builder and the data iterators. CLM and SFT differ only in their data.

What trains — every weight, LoRA on a frozen (optionally quantized) base, or bottleneck adapters — is the
`TrainableModel`'s business (`flaxalign/policy.py`); the steps here are the same for all of them.
"""

import functools
import math

import jax

from flaxalign import errors, weights
from flaxalign.data.batching import SFT_KEYS
from flaxalign.data.chat import resolve_template, trained_template
from flaxalign.data.loader import BatchIterator
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.losses.lm import token_cross_entropy
from flaxalign.policy import TrainableModel
from flaxalign.stages.checks import check_shapes
from flaxalign.stages.description import Description, abstract_rows
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task


def lm_loss(trainable, frozen, batch, rng, *, policy: TrainableModel, chunk_size: int):
    """(Σ token losses, (loss-token count, {})) of one batch of packed (CLM) or masked (SFT) sequences under the
    model whose trained part is `trainable` on `frozen`. LoRA dropout runs only when an rng is given (training)."""
    model = policy.model(trainable, frozen, rng)
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    loss_sum, count = token_cross_entropy(hidden, model.output_head(), batch["targets"], batch["loss_mask"],
                                          chunk_size=chunk_size)
    return loss_sum, (count, {})


def lm_step(state, batch, *, policy: TrainableModel, optimizer, schedule, grad_accum: int, chunk_size: int):
    """One optimizer update of the trained part (all weights, the LoRA leaves or the bottleneck adapters)."""
    loss_fn = functools.partial(lm_loss, policy=policy, chunk_size=chunk_size)
    return gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)


def lm_eval_step(state, batch, *, policy: TrainableModel, chunk_size: int):
    loss_sum, (count, _) = lm_loss(state.params, state.frozen, batch, None, policy=policy, chunk_size=chunk_size)
    return {"loss": loss_sum, "count": count}


def data_iterators(train: dict, evaluation: dict, config):
    """(shuffled train iterator, eval-batch factory) over a stage's row arrays, this process's share of each global
    batch of `config.data.batch_size`; the factory yields up to `config.eval_batches` unshuffled eval batches."""
    batch_size = config.data.batch_size
    if batch_size % jax.process_count():
        raise errors.ConfigError(
            f"data.batch_size={batch_size} is not divisible by the {jax.process_count()} processes.")
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train_data = BatchIterator(train, batch_size, seed=config.seed, shuffle=True, **process)

    def eval_batches():
        n = min(config.eval_batches, math.ceil(len(next(iter(evaluation.values()))) / batch_size))
        it = BatchIterator(evaluation, batch_size, seed=0, shuffle=False, **process)
        return (next(it) for _ in range(n))

    return train_data, eval_batches


def stage_tokenizer(config, meta: dict, model_config, stage: str):
    """The tokenizer of a stage: `data.tokenizer`, else the `init_from` source's; its ids must fit the model's
    vocab."""
    path = config.data.tokenizer or meta.get("tokenizer", "")
    if not path:
        raise errors.ConfigError(f"{stage} needs a tokenizer: set data.tokenizer, or init_from a run or a model "
                                 "that has one.")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise errors.ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size}.")
    return tokenizer


def resolve_chat_template(config, meta: dict, tokenizer) -> str:
    """The chat template this stage renders message-list records with (`chat.resolve_template`: data.chat_template,
    else the one the `init_from` run trained with, else plain; "auto" may pick the tokenizer's own Jinja), written
    back into `config.data` so that the data builders and the run's config.json use it."""
    template = resolve_template(config.data.chat_template, meta.get("chat_template", ""),
                                source=config.get("init_from", ""), tokenizer=tokenizer)
    config.data.chat_template = template
    return template


def chat_metadata(config, meta: dict, stats: dict) -> dict:
    """The run-metadata entry of the chat template it trained with (`chat.trained_template`), which runs that start
    from it inherit and `generate`, `eval` and `convert` use."""
    return {"chat_template": trained_template(config.data.chat_template, stats.get("train_conversations", 0),
                                              meta.get("chat_template", ""))}


def make_task(name: str, policy: TrainableModel, optim_cfg, *, grad_accum: int = 1, chunk_size: int = 256,
              init_base=None, train_data=None, eval_batches=None, tokens_per_step: int = 0,
              flops_per_step: float = 0.0, metadata: dict | None = None) -> Task:
    """The task of an LM stage (`name`: "clm", "sft"). `init_base(shardings) -> params` gives the starting weights
    (random if None)."""
    optimizer = make_optimizer(optim_cfg)
    step_kwargs = {"policy": policy, "chunk_size": chunk_size}
    return Task(
        name=name, optimizer=optimizer,
        train_step=functools.partial(lm_step, optimizer=optimizer, schedule=learning_rate_schedule(optim_cfg),
                                     grad_accum=grad_accum, **step_kwargs),
        eval_step=functools.partial(lm_eval_step, **step_kwargs),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step, eval_loss_is_token_nll=True,
        metadata={"stage": name, **policy.metadata(), "resume_identity": policy.identity(), **(metadata or {})},
        **policy.layout(init_base))


def describe(name: str, config, mesh) -> Description:
    """The LM stage `name` ("clm", "sft") of `config` before data: batches of `data.batch_size` rows of
    `data.seq_len` tokens."""
    model_config, meta, init_path = weights.resolve_model(config)
    check_shapes(config, model_config, mesh)
    b, t = config.data.batch_size, config.data.seq_len
    task = make_task(name, weights.trainable_model(config, model_config), config.optim, grad_accum=config.grad_accum,
                     chunk_size=config.loss_chunk, init_base=weights.initializer(model_config, init_path),
                     tokens_per_step=b * t, flops_per_step=b * t * model_config.flops_per_token(t))
    return Description(task, model_config, meta, init_path,
                       abstract_batch=lambda _: abstract_rows(SFT_KEYS, (b, t), float_keys=("loss_mask",)))

"""Reward model: the decoder backbone plus a scalar head that scores a whole sequence at its last real token, trained
on preference pairs with the Bradley–Terry loss  L = −log σ(r(x, y_c) − r(x, y_r) − m) + c·(r_c + r_r)².

Params: `{"model": the backbone's trained part, "head": {"kernel", "bias"}}` (`policy.ScalarModel`); the backbone
trains fully, with LoRA or with adapters, on a frozen base stored in model.frozen_dtype or quantized. The LM head
is not part of a reward model.

After training, the reward is normalised (Ziegler et al. 2019): responses of the SFT policy to held-out prompts are
scored and gain g, bias b chosen so that g·r + b has mean 0 and std 1 over them; `reward_normalization.json` in the
workdir stores them next to the checkpoints (`weights.reward_normalization` reads them back).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import models, sharding, weights
from flaxalign.data.batching import PREFERENCE_KEYS, left_pad_prompts, pair_prompts, unstack_pairs
from flaxalign.data.preference_data import build_preference_datasets
from flaxalign.losses import bradley_terry_loss
from flaxalign.policy import UNUSED_BY_SCALAR, ScalarModel
from flaxalign.sampler import KVCacheSampler, Sampling
from flaxalign.stages import lm
from flaxalign.stages.checks import check_rows, check_shapes
from flaxalign.stages.description import Description, abstract_rows
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task


def full_sequences(rows: dict) -> dict:
    """The whole token sequences of (input, target) rows `[N, T]`: `tokens`, `mask` (1 on real tokens) and
    `positions`, each `[N, T + 1]` (a row's last token is a target only, and the reward is read at it)."""
    tokens = jnp.concatenate([rows["inputs"][:, :1], rows["targets"]], axis=1)
    mask = jnp.concatenate([jnp.ones_like(rows["attention_mask"][:, :1]), rows["attention_mask"]], axis=1)
    return {"tokens": tokens, "mask": mask, "positions": jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)}


def reward_loss(trainable, frozen, batch, rng, *, rm: ScalarModel, center_coef: float):
    """(Σ BT losses, (pair count, Σ accuracy / margin)) of a `[B, 2, T]` batch of (chosen, rejected) pairs, with
    the pairs' own margins m (`batch["margin"]`, `[B]`) when the data has them."""
    seqs = full_sequences(unstack_pairs({k: batch[k] for k in ("inputs", "targets", "attention_mask")}))
    scores = rm.sequence_scores(trainable, frozen, seqs["tokens"], seqs["mask"], seqs["positions"], rng)
    chosen, rejected = jnp.split(scores, 2)
    losses, metrics = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"), center_coef=center_coef)
    sums = {name: jnp.sum(value) for name, value in metrics.items()}
    return jnp.sum(losses), (jnp.asarray(losses.shape[0], jnp.float32), sums)


def reward_step(state, batch, *, optimizer, schedule, grad_accum: int, **loss_kwargs):
    """One optimizer update of the reward model from a batch of preference pairs."""
    loss_fn = functools.partial(reward_loss, **loss_kwargs)
    return gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)


def reward_eval_step(state, batch, **loss_kwargs):
    loss_sum, (count, sums) = reward_loss(state.params, state.frozen, batch, None, **loss_kwargs)
    return {"loss": loss_sum, "count": count, **sums}


def make_task(rm: ScalarModel, optim_cfg, *, grad_accum: int = 1, center_coef: float = 0.0, init_base=None,
              train_data=None, eval_batches=None, tokens_per_step: int = 0, flops_per_step: float = 0.0,
              metadata: dict | None = None, finalize=None) -> Task:
    optimizer = make_optimizer(optim_cfg)
    loss_kwargs = {"rm": rm, "center_coef": float(center_coef)}
    backbone = rm.backbone
    return Task(
        name="reward", optimizer=optimizer,
        train_step=functools.partial(reward_step, optimizer=optimizer, schedule=learning_rate_schedule(optim_cfg),
                                     grad_accum=grad_accum, **loss_kwargs),
        eval_step=functools.partial(reward_eval_step, **loss_kwargs),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step, finalize=finalize,
        metadata={"stage": "reward", **backbone.metadata(), "resume_identity": {**backbone.identity(),
                                                                                  "head": "scalar"},
                  **(metadata or {})},
        **rm.layout(init_base))


def describe(config, mesh) -> Description:
    """The reward model of `config` before data: batches of `data.batch_size` (chosen, rejected) pairs."""
    model_config, meta, init_path = weights.resolve_model(config)
    check_shapes(config, model_config, mesh)
    rm = ScalarModel(weights.trainable_model(config, model_config, drop=UNUSED_BY_SCALAR))
    b, t = config.data.batch_size, config.data.seq_len
    tokens = 2 * b * (t + 1)
    task = make_task(rm, config.optim, grad_accum=config.grad_accum, center_coef=config.center_coef,
                     init_base=weights.initializer(model_config, init_path, drop=UNUSED_BY_SCALAR),
                     tokens_per_step=tokens, flops_per_step=tokens * model_config.flops_per_token(t + 1))
    return Description(task, model_config, meta, init_path, parts={"rm": rm},
                       abstract_batch=lambda _: abstract_rows(PREFERENCE_KEYS, (b, 2, t), ("completion_mask",)))


def build_task(config, workdir: str, mesh) -> Task:
    """Backbone and tokenizer from `init_from` (an SFT run), preference pairs from `data.train`."""
    d = describe(config, mesh)
    tokenizer = lm.stage_tokenizer(config, d.meta, d.model_config, "the reward model")
    lm.resolve_chat_template(config, d.meta, tokenizer)
    data = build_preference_datasets(config.data, tokenizer)
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)
    finalize = None
    if config.normalize.num_prompts and d.init_path:
        prompts = pair_prompts(data.eval)[: config.normalize.num_prompts]
        check_rows(mesh, len(prompts), "normalize.num_prompts (held-out prompts, at most the data.eval set)")
        finalize = functools.partial(
            normalize_rewards, workdir=workdir, mesh=mesh, policy_path=d.init_path, model_config=d.model_config,
            rm=d.parts["rm"], prompts=prompts, tokenizer=tokenizer, max_new_tokens=config.normalize.max_new_tokens,
            seed=config.seed)
    return d.with_data(train_data=train_data, eval_batches=eval_batches, finalize=finalize,
                       metadata={"tokenizer": tokenizer.model_path, "init_from": config.init_from, "data": data.stats,
                                 **lm.chat_metadata(config, d.meta, data.stats)})


def normalize_rewards(state, *, workdir, mesh, policy_path, model_config, rm: ScalarModel, prompts, tokenizer,
                      max_new_tokens, seed):
    """Samples responses of the `policy_path` model (the SFT run) to `prompts`, scores them with the trained reward
    model and writes gain/bias such that gain·r + bias has mean 0 and std 1 over them."""
    policy_config = model_config.without_adapters()  # the SFT policy: the reward model's adapters are not its
    graphdef, abstract, logical = models.abstract_model(policy_config)
    policy = weights.initializer(policy_config, policy_path)(sharding.tree_shardings(logical, abstract, mesh))
    batch = left_pad_prompts(prompts, pad_id=tokenizer.pad_id)

    engine = KVCacheSampler(functools.partial(models.merge, graphdef), eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)

    @jax.jit
    def score(params, frozen, out):
        positions = jnp.maximum(jnp.cumsum(out["mask"], axis=1) - 1, 0)
        return rm.sequence_scores(params, frozen, out["tokens"], out["mask"], positions)

    with jax.set_mesh(mesh):
        out = engine.sample(policy, batch, jax.random.PRNGKey(seed), Sampling(max_new_tokens, temperature=1.0))
        scores = np.asarray(jax.device_get(score(state.params, state.frozen, out)), np.float64)
    mean, std = float(scores.mean()), float(scores.std())
    gain = 1.0 / max(std, 1e-6)
    stats = {"gain": gain, "bias": -mean * gain, "raw_mean": mean, "raw_std": std, "num_samples": int(scores.size),
             "policy": policy_path, "max_new_tokens": int(max_new_tokens)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, weights.REWARD_NORMALIZATION_FILE), "w") as f:
            json.dump(stats, f, indent=2)
    return stats


"""Reward model: the decoder backbone plus a scalar head that scores a whole sequence at its last real token, trained
on preference pairs with the Bradley–Terry loss  L = −log σ(r(x, y_c) − r(x, y_r) − m) + c·(r_c + r_r)².

Params: `{"model": backbone, "head": {"kernel", "bias"}}`; the backbone is trained fully, or with LoRA (then the
backbone is frozen in `state.frozen` and `"model"` holds the LoRA leaves). The LM head is not part of a reward model.

After training, the reward is normalised (Ziegler et al. 2019): responses of the SFT policy to held-out prompts are
scored and gain g, bias b chosen so that g·r + b has mean 0 and std 1 over them; `reward_normalization.json` in the
workdir stores them next to the checkpoints, and `load_reward_normalization` reads them back.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import errors, models, sharding
from flaxalign.data.batching import left_pad_prompts, unstack_pairs
from flaxalign.data.preference_data import build_preference_datasets
from flaxalign.generate import generate
from flaxalign.losses import bradley_terry_loss
from flaxalign.models import heads
from flaxalign.stages import lm, pretrained
from flaxalign.stages.checks import check_rows, check_shapes
from flaxalign.train import checkpoint
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task

NORMALIZATION_FILE = "reward_normalization.json"
UNUSED = ("lm_head",)


def full_sequences(rows: dict) -> dict:
    """The whole token sequences of (input, target) rows `[N, T]`: `tokens`, `mask` (1 on real tokens) and
    `positions`, each `[N, T + 1]` (a row's last token is a target only, and the reward is read at it)."""
    tokens = jnp.concatenate([rows["inputs"][:, :1], rows["targets"]], axis=1)
    mask = jnp.concatenate([jnp.ones_like(rows["attention_mask"][:, :1]), rows["attention_mask"]], axis=1)
    return {"tokens": tokens, "mask": mask, "positions": jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)}


def reward_scores(trainable, frozen, tokens, mask, positions, rng=None, *, graphdef, model_config, lora_config):
    """r(x, y) of each sequence `[N]` (float32): the head on the hidden state of its last real token."""
    params, layer_transform = lm.model_params(trainable["model"], frozen, rng, lora_config=lora_config)
    model = models.merge(graphdef, heads.with_unused_lm_head(params, model_config))
    hidden = model(tokens, positions, mask, layer_transform=layer_transform)
    return heads.sequence_scores(hidden, mask, trainable["head"])


def reward_loss(trainable, frozen, batch, rng, *, center_coef: float, **model_kwargs):
    """(Σ BT losses, (pair count, Σ accuracy / margin)) of a `[B, 2, T]` batch of (chosen, rejected) pairs, with
    the pairs' own margins m (`batch["margin"]`, `[B]`) when the data has them."""
    seqs = full_sequences(unstack_pairs({k: batch[k] for k in ("inputs", "targets", "attention_mask")}))
    scores = reward_scores(trainable, frozen, seqs["tokens"], seqs["mask"], seqs["positions"], rng, **model_kwargs)
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


def reward_layout(model_config, lora_config, *, seed: int, init_base) -> dict:
    """`param_layout` of the backbone (without LM head) wrapped as `{"model": …, "head": …}`."""
    base = lm.param_layout(model_config, lora_config, seed=seed, init_base=init_base, drop=UNUSED)

    def init_params(shardings, frozen):
        head = jax.jit(lambda: heads.init_scalar_head(model_config.d_model, seed), out_shardings=shardings["head"])()
        return {"model": base["init_params"](shardings["model"], frozen), "head": head}

    return {**base, "init_params": init_params,
            "abstract_params": {"model": base["abstract_params"],
                                "head": heads.abstract_scalar_head(model_config.d_model)},
            "params_logical": {"model": base["params_logical"], "head": heads.HEAD_LOGICAL}}


def make_task(model_config: models.ModelConfig, optim_cfg, *, lora_config=None, seed: int = 0, grad_accum: int = 1,
              center_coef: float = 0.0, init_base=None, train_data=None, eval_batches=None, tokens_per_step: int = 0,
              flops_per_step: float = 0.0, metadata: dict | None = None, finalize=None) -> Task:
    if model_config.adapter_placement != "none":
        raise errors.ConfigError("the reward model trains fully or with LoRA; bottleneck adapters "
                                 "(adapters.placement) are not supported.")
    graphdef, _, _ = models.abstract_model(model_config)
    optimizer = make_optimizer(optim_cfg)
    loss_kwargs = {"graphdef": graphdef, "model_config": model_config, "lora_config": lora_config,
                   "center_coef": float(center_coef)}
    identity = lm.resume_identity(model_config, lora_config, head="scalar")
    return Task(
        name="reward", optimizer=optimizer,
        train_step=functools.partial(reward_step, optimizer=optimizer, schedule=learning_rate_schedule(optim_cfg),
                                     grad_accum=grad_accum, **loss_kwargs),
        eval_step=functools.partial(reward_eval_step, **loss_kwargs),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step, finalize=finalize,
        metadata={"stage": "reward", "model": model_config.to_dict(), "resume_identity": identity,
                  "lora": identity["lora"], **(metadata or {})},
        **reward_layout(model_config, lora_config, seed=seed, init_base=init_base))


def prompt_ids(pairs: dict) -> list[np.ndarray]:
    """The prompt tokens of `[N, 2, T]` preference rows: a chosen row's inputs up to its first completion target."""
    inputs, completion = pairs["inputs"][:, 0], pairs["completion_mask"][:, 0]
    first = np.argmax(completion > 0, axis=1)
    return [inputs[i, : first[i] + 1] for i in range(len(inputs))]


def build_task(config, workdir: str, mesh) -> Task:
    """Backbone and tokenizer from `init_from` (an SFT run), preference pairs from `data.train`."""
    data_cfg = config.data
    model_config, meta, init_path = lm.resolve_model(config)
    tokenizer = lm.stage_tokenizer(config, meta, model_config, "the reward model")
    check_shapes(config, model_config, mesh)
    lora_config = lm.lora_from(config)
    data = build_preference_datasets(data_cfg, tokenizer)
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)
    tokens = 2 * data_cfg.batch_size * (data_cfg.seq_len + 1)
    finalize = None
    if config.normalize.num_prompts and init_path:
        prompts = prompt_ids(data.eval)[: config.normalize.num_prompts]
        check_rows(mesh, len(prompts), "normalize.num_prompts (held-out prompts, at most the data.eval set)")
        finalize = functools.partial(
            normalize_rewards, workdir=workdir, mesh=mesh, policy_path=init_path, model_config=model_config,
            lora_config=lora_config, prompts=prompts,
            tokenizer=tokenizer, max_new_tokens=config.normalize.max_new_tokens, seed=config.seed)
    return make_task(
        model_config, config.optim, lora_config=lora_config, seed=config.seed, grad_accum=config.grad_accum,
        center_coef=config.center_coef, init_base=lm.base_initializer(model_config, init_path, drop=UNUSED),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens,
        flops_per_step=tokens * model_config.flops_per_token(data_cfg.seq_len + 1), finalize=finalize,
        metadata={"tokenizer": tokenizer.model_path, "init_from": config.init_from, "data": data.stats})


def normalize_rewards(state, *, workdir, mesh, policy_path, model_config, lora_config, prompts, tokenizer,
                      max_new_tokens, seed):
    """Samples responses of the `policy_path` model (the SFT run) to `prompts`, scores them with the trained reward
    model and writes gain/bias such that gain·r + bias has mean 0 and std 1 over them."""
    graphdef, abstract, logical = models.abstract_model(model_config)
    shardings = sharding.tree_shardings(logical, abstract, mesh)
    policy = lm.base_initializer(model_config, policy_path)(shardings)
    batch = left_pad_prompts(prompts, pad_id=tokenizer.pad_id)
    score_kwargs = {"graphdef": graphdef, "model_config": model_config, "lora_config": lora_config}

    @jax.jit
    def sample_and_score(policy, params, frozen, batch, rng):
        out = generate(graphdef, policy, batch, rng, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                     pad_id=tokenizer.pad_id)
        positions = jnp.maximum(jnp.cumsum(out["mask"], axis=1) - 1, 0)
        return reward_scores(params, frozen, out["tokens"], out["mask"], positions, **score_kwargs)

    with jax.set_mesh(mesh):
        scores = np.asarray(jax.device_get(sample_and_score(policy, state.params, state.frozen, batch,
                                                            jax.random.PRNGKey(seed))), np.float64)
    mean, std = float(scores.mean()), float(scores.std())
    gain = 1.0 / max(std, 1e-6)
    stats = {"gain": gain, "bias": -mean * gain, "raw_mean": mean, "raw_std": std, "num_samples": int(scores.size),
             "policy": policy_path, "max_new_tokens": int(max_new_tokens)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, NORMALIZATION_FILE), "w") as f:
            json.dump(stats, f, indent=2)
    return stats


def trained_reward_model(path: str, model_config: models.ModelConfig):
    """(abstract params, logical axes, loader(shardings) -> params) of the reward model a reward run trained, as
    `{"model": backbone, "head": head}` with its LoRA (if any) merged into the backbone: for scoring (PPO)."""
    _, abstract, logical = models.abstract_model(model_config)
    abstract_rm = {"model": lm.without(abstract, UNUSED), "head": heads.abstract_scalar_head(model_config.d_model)}
    logical_rm = {"model": lm.without(logical, UNUSED), "head": heads.HEAD_LOGICAL}
    if pretrained.is_pretrained(path):
        return abstract_rm, logical_rm, pretrained.reward_initializer(path, drop=UNUSED)
    load_backbone = lm.base_initializer(model_config, path, drop=UNUSED)

    def load(shardings):
        return {"model": load_backbone(shardings["model"]),
                "head": checkpoint.load_params(path, abstract_rm["head"], shardings["head"], part="params/head")}

    return abstract_rm, logical_rm, load


def load_reward_normalization(workdir: str) -> dict:
    """{"gain", "bias", …} of a reward-model run, or gain 1 / bias 0 when it was trained without normalisation."""
    path = os.path.join(workdir, NORMALIZATION_FILE)
    if not os.path.exists(path):
        return {"gain": 1.0, "bias": 0.0}
    with open(path) as f:
        return json.load(f)

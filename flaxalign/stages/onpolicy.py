"""What the on-policy RL stages (PPO, GRPO/RLOO) share: scoring a rollout's response tokens under a policy, the
epochs × shuffled minibatches × micro-batches update loop, and skipping an update whose rewards are not finite.

A rollout batch holds `tokens` and `mask` `[B, L + N]` (left-padded prompt of width L, then the response of width N,
the sampler's layout) and `response_mask` `[B, N]` (EOS + 1). The hidden state at position L − 1 + t predicts
response token t, so "the response's hidden states" are positions L − 1 … L + N − 2 of a forward pass over
`tokens[:, :-1]`.

State layout of both: `state.frozen["policy"]` is the policy's frozen part — its frozen base (LoRA, adapters,
QLoRA: also the reference, and the base PPO's value model adapts) or, for full fine-tuning, the frozen reference
copy (absent when no reference is needed); `state.frozen["reward"]` the reward model.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flaxalign import errors, models, sampler, weights
from flaxalign.data.prompt_data import build_prompt_completion_datasets, build_prompt_datasets
from flaxalign.losses.lm import (
    chunked_token_entropy,
    chunked_token_kl,
    chunked_token_logps,
)
from flaxalign.models import heads
from flaxalign.policy import UNUSED_BY_SCALAR, ScalarModel, TrainableModel
from flaxalign.stages import lm
from flaxalign.stages.checks import check_rows
from flaxalign.train.optim import make_optimizer
from flaxalign.train.state import TrainState
from flaxalign.train.step import accumulated_gradients, finite_update
from flaxalign.train.task import Task

PROMPT_KEYS = ("input_ids", "attention_mask", "positions")  # a batch of left-padded prompts


@dataclasses.dataclass(frozen=True)
class Policy:
    """The policy of an RL stage: its trainable model and sampling temperature (log-probs are those of
    softmax(logits / temperature), the distribution the rollout sampled from)."""
    model: TrainableModel
    temperature: float
    chunk_size: int = 256

    def forward(self, trainable, frozen: dict, rng=None) -> models.CausalLM:
        """The policy module (`frozen`: the state's frozen tree)."""
        return self.model.model(trainable, frozen.get("policy", {}), rng)

    def reference(self, trainable, frozen: dict) -> models.CausalLM:
        """The reference: the frozen base with adapters off, or the frozen copy of the start."""
        return self.model.reference_model(trainable, frozen["policy"])

    def weights(self, trainable, frozen: dict) -> dict:
        """What a sampler reads the policy from: its trained part and, when it has one, its frozen base (not the
        reference copy that full fine-tuning keeps in the same place, nor the reward or value models)."""
        return {"trainable": trainable, "frozen": {"policy": self.model.forward_frozen(frozen.get("policy", {}))}}

    def rollout_sampler(self, *, eos_id: int, pad_id: int, unstacked_layers: bool | None = None) -> sampler.Sampler:
        """The rollout engine, reading `weights(...)` (`unstacked_layers`: `sampler.generate`'s)."""
        return sampler.KVCacheSampler(lambda w: self.forward(w["trainable"], w["frozen"]), eos_id=eos_id,
                                      pad_id=pad_id, unstacked_layers=unstacked_layers)


def reward_scorer(config: models.ModelConfig) -> ScalarModel:
    """The frozen reward model of an RL stage, scoring with the full weights in `state.frozen["reward"]`."""
    return ScalarModel(TrainableModel(config, drop=UNUSED_BY_SCALAR))


def reward_model_scores(scorer: ScalarModel, frozen: dict, tokens, mask):
    """The reward model's raw score of each whole sequence, at its last real token `[B]`."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return scorer.sequence_scores(frozen["reward"], {}, tokens, mask, positions)


@dataclasses.dataclass(frozen=True)
class Sampling(sampler.Sampling):
    """The `rollout` config block: how responses are sampled (at a temperature > 0: the policy's log-probs are those
    of softmax(logits / T))."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise errors.ConfigError(f"rollout.temperature must be > 0 for on-policy RL, got {self.temperature}.")
        if self.max_new_tokens < 1:
            raise errors.ConfigError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.cache_dtype not in sampler.CACHE_DTYPES:
            raise errors.ConfigError(f"rollout.cache_dtype={self.cache_dtype!r} is not one of "
                                     f"{list(sampler.CACHE_DTYPES)}.")
        super().__post_init__()


def reward_model_of(config, meta: dict, model_config, *, required: bool = False):
    """(config, abstract params, logical axes, loader) of `reward_from` (`weights.reward_from`; its metadata only,
    nothing is read until the loader runs), or None without one. `required` (PPO): without `reward_from`, a reward
    model of the policy's architecture whose loader refuses to run — what `plan` prices for a preset."""
    if config.get("reward_from"):
        return weights.reward_from(weights.parse_source(config.reward_from, "reward_from"),
                                   weights.policy_tokenizer(config, meta), model_config)
    if not required:
        return None
    rm_config = model_config.without_adapters()
    _, abstract, logical = models.abstract_model(rm_config)

    def no_weights(*_):
        raise errors.ConfigError("this stage needs a reward model: set reward_from=checkpoint:DIR.")

    return (rm_config, {"model": {k: v for k, v in abstract.items() if k not in UNUSED_BY_SCALAR},
                        "head": heads.abstract_scalar_head(rm_config.d_model)},
            {"model": {k: v for k, v in logical.items() if k not in UNUSED_BY_SCALAR}, "head": heads.HEAD_LOGICAL},
            no_weights)


def check_budget(config, model_config, sampling: Sampling, rows: int, num_minibatches: int, what: str) -> None:
    """Prompt + response fit the model; `rows` rollout rows split into minibatches of whole micro-batches."""
    if config.data.max_prompt_len + sampling.max_new_tokens > model_config.max_seq_len:
        raise errors.ConfigError(
            f"data.max_prompt_len={config.data.max_prompt_len} + rollout.max_new_tokens={sampling.max_new_tokens} "
            f"exceeds model.max_seq_len={model_config.max_seq_len}.")
    if rows % num_minibatches or (rows // num_minibatches) % config.grad_accum:
        raise errors.ConfigError(
            f"{what} = {rows} rollout rows must split into {num_minibatches} minibatches of a multiple of "
            f"grad_accum={config.grad_accum} rows.")


def prompt_data(config, meta: dict, tokenizer, mesh, *, completions: int = 0):
    """The prompts of a stage that samples (`data` block, chat template resolved): (datasets, the train iterator, the
    first `eval_prompts` held-out prompts checked against the mesh — or None when `eval_prompts` is 0). With
    `completions` > 0 the records are `sft` records and each row also carries its completion, cut to that many
    tokens (`build_prompt_completion_datasets`)."""
    lm.resolve_chat_template(config, meta, tokenizer)
    max_prompt_len = int(config.data.max_prompt_len)
    if completions:
        data = build_prompt_completion_datasets(config.data, tokenizer, max_prompt_len=max_prompt_len,
                                                max_completion_len=completions)
    else:
        data = build_prompt_datasets(config.data, tokenizer, max_prompt_len=max_prompt_len)
    train_data, _ = lm.data_iterators(data.train, data.eval, config)
    if not config.eval_prompts:
        return data, train_data, None
    eval_prompts = {k: v[: config.eval_prompts] for k, v in data.eval.items()}
    check_rows(mesh, len(eval_prompts["input_ids"]), "eval_prompts (held-out prompts, at most the data.eval set)")
    return data, train_data, eval_prompts


def update_optimizer(config, updates_per_step: int):
    """The optimizer of `config.optim` with its schedule counted in optimizer updates (several per RL step)."""
    optim_cfg = config.optim.to_dict()
    optim_cfg["total_steps"] = config.steps * updates_per_step
    return make_optimizer(type(config.optim)(optim_cfg))


def response_hidden(model, tokens, mask, response_width: int):
    """Hidden states `[B, N, D]` of the positions that predict the N response tokens."""
    inputs, input_mask = tokens[:, :-1], mask[:, :-1]
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0)
    hidden = model(inputs, positions, input_mask)
    return hidden[:, hidden.shape[1] - response_width:]


def response_logps(model, batch, policy: Policy):
    """(log π(y_t | x, y_<t) `[B, N]` under softmax(logits / T), hidden `[B, N, D]`, the LM head at temperature T)
    of `model` (the policy's or the reference's module). T divides the logits after the family's soft cap, as
    transformers' sampler does (`LMHead.at_temperature`)."""
    response = batch["response"]
    hidden = response_hidden(model, batch["tokens"], batch["mask"], response.shape[1])
    head = model.output_head().at_temperature(policy.temperature)
    return chunked_token_logps(hidden, head, response, chunk_size=policy.chunk_size), hidden, head


def reference_comparison(hidden, head, ref_hidden, ref_head, mask, policy: Policy) -> dict:
    """Per-token full-vocabulary KL(π‖π_ref) (≥ 0; 0 exactly when π = π_ref) and policy entropy, 0 where masked."""
    kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, chunk_size=policy.chunk_size)
    entropy = chunked_token_entropy(hidden, head, chunk_size=policy.chunk_size)
    m = mask > 0
    return {"kl": jnp.where(m, kl, 0.0), "entropy": jnp.where(m, entropy, 0.0)}


def rollout_stats(batch, scores, kl_coef) -> dict:
    """Means over the rollout's rows: score, its std, KL (Σ_t full-vocabulary KL per response), rlhf_reward =
    score − β·KL, EOS rate, response length and per-token entropy."""
    m = batch["response_mask"].astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    kl = jnp.sum(batch["kl"], axis=1)
    return {"score": jnp.mean(scores), "score_std": jnp.std(scores), "kl": jnp.mean(kl),
            "rlhf_reward": jnp.mean(scores - kl_coef * kl), "eos_rate": jnp.mean(batch["ended"].astype(jnp.float32)),
            "response_length": jnp.mean(jnp.sum(m, axis=1)), "entropy": jnp.sum(batch["entropy"]) / tokens}


def minibatch_updates(state: TrainState, batch: dict, loss_fn, *, optimizer, epochs: int, num_minibatches: int,
                      grad_accum: int):
    """`epochs` passes over the rollout `batch`, each over a fresh random split of its rows into `num_minibatches`
    minibatches; one optimizer update per minibatch, its gradient accumulated over `grad_accum` micro-batches
    (`accumulated_gradients`: the token-mean loss of the minibatch, whatever `grad_accum` is).
    `loss_fn(params, frozen, minibatch, rng) -> (loss_sum, (count, metric_sums))`. Returns (state with step + 1,
    per-update metrics, each `[epochs · num_minibatches]`)."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % num_minibatches:
        raise ValueError(f"the rollout of {rows} rows does not split into {num_minibatches} minibatches")
    rng, shuffle_rng = jax.random.split(state.rng)
    orders = jnp.stack([jax.random.permutation(jax.random.fold_in(shuffle_rng, e), rows) for e in range(epochs)])
    minibatch_rows = orders.reshape(epochs * num_minibatches, rows // num_minibatches)

    def update(carry, indices):
        params, opt_state, rng = carry
        rng, step_rng = jax.random.split(rng)
        minibatch = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), batch)
        grads, loss, count, metrics = accumulated_gradients(loss_fn, params, state.frozen, minibatch, step_rng,
                                                            grad_accum)
        params, opt_state, guard = finite_update(optimizer, grads, loss, params, opt_state)
        return (params, opt_state, rng), {"loss": loss, **guard, "loss_tokens": count, **metrics}

    (params, opt_state, rng), per_update = jax.lax.scan(update, (state.params, state.opt_state, rng),
                                                        minibatch_rows)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), per_update


def unless_nonfinite(update, state: TrainState, batch: dict, rewards, informative=True):
    """`update(state, batch) -> (state, metrics)` when every reward is finite (and `informative`, a traced bool);
    otherwise the state only counts the step (params, optimizer and frozen state unchanged), the metrics are zeros,
    and `skipped` = 1 says so."""
    finite = jnp.all(jnp.isfinite(rewards)) & informative

    def skip(state, batch):
        shapes = jax.eval_shape(update, state, batch)[1]
        return state.replace(step=state.step + 1), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    state, metrics = jax.lax.cond(finite, update, skip, state, batch)
    return state, {**metrics, "skipped": 1.0 - finite.astype(jnp.float32)}


def token_sums(metrics: dict, skip=("tokens",)) -> dict:
    """Token-mean metrics of `losses.rl` → sums weighted by their `tokens`, for `accumulated_gradients` to divide
    by the minibatch's token count."""
    return {k: v * metrics["tokens"] for k, v in metrics.items() if k not in skip}


@dataclasses.dataclass(frozen=True)
class RlCore:
    """What an RL stage's task is made of, apart from its step, data, tokenizer and host-side rollouts (`rl_task`)."""

    models: Any
    layout: dict
    optimizer: Any
    tokens: int
    flops: float
    value_from: str = ""


def rl_task(name: str, core: RlCore, train_step, metadata: dict) -> Task:
    """The task of an RL stage before data (its `describe`): the step, and `core`'s layout, optimizer and cost."""
    return Task(name=name, optimizer=core.optimizer, train_step=train_step, eval_step=None, train_data=None,
                eval_batches=None, tokens_per_step=core.tokens, flops_per_step=core.flops, metadata=metadata,
                **core.layout)

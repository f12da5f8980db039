"""PPO-RLHF (Ziegler et al. 2019; Ouyang et al. 2022), following "The N Implementation Details of RLHF with PPO"
(Huang et al. 2023) and TRL's PPOTrainer.

One train step is one PPO iteration on a batch of prompts:
  1. rollout (`Rollouts`, host-driven through `Task.prepare`): sample responses through the sampler seam (the
     KV-cache sampler) at `rollout.temperature`, cut after the first EOS (EOS + 1 mask); then `ppo_score`, its own
     jitted program, recomputes the policy's log-probs
     log softmax(logits / T) with a forward pass, the reference's log-probs, the values and the reward model's score
     at the last real token (normalised with the reward run's gain/bias, minus `missing_eos_penalty` for responses
     without EOS);
  2. `ppo_step` (pure): per-token rewards r_t = −β·k(π, π_ref)_t plus the score on the last token (`ppo_rewards`),
     optional reward whitening, GAE(γ, λ) with the value model, masked advantage whitening, then `epochs` ×
     shuffled `num_minibatches` updates (each over `grad_accum` micro-batches) of
       L = clipped surrogate(ε) + vf_coef · clipped value loss − entropy_coef · entropy
     with one optimizer over policy and value (TRL's PolicyAndValueWrapper); then the adaptive KL controller
     (Ziegler et al.) moves β towards `kl_target` when set.

Models (`policy.value_model`): full fine-tuning keeps a frozen reference copy and a separate value model (backbone
from the reward model or the policy, `value_from`) with a scalar head initialised to 0. With LoRA, adapters or a
quantized base the reference is the frozen base with the adapters off and the value model is the same frozen base
with its own adapters and head — no weight copies. The reward model (`reward_from`, a `configs/reward.py` run, its
LoRA merged on load) is frozen. β lives in `state.frozen["kl_coef"]` so the controller's value is checkpointed.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flaxalign import errors, sampler, weights
from flaxalign.data.prompt_data import build_prompt_datasets
from flaxalign.losses.lm import chunked_token_entropy
from flaxalign.losses.rl import (
    KL_KINDS,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)
from flaxalign.models import heads
from flaxalign.policy import ScalarModel, TrainableModel, value_model
from flaxalign.sampler import trim_left_padding
from flaxalign.stages import lm, onpolicy
from flaxalign.stages.checks import check_rows
from flaxalign.stages.description import Description, RolloutSpec
from flaxalign.train.state import TrainState
from flaxalign.train.task import Task


@dataclasses.dataclass(frozen=True)
class PpoHyper:
    """The `ppo` config block, validated (defaults: TRL PPOConfig)."""
    epochs: int = 4
    num_minibatches: int = 1
    clip_eps: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float = 0.0  # > 0: adaptive KL controller towards this KL (nats per response)
    kl_horizon: float = 10000.0
    entropy_coef: float = 0.0
    whiten_rewards: bool = False
    missing_eos_penalty: float = 0.0

    def __post_init__(self):
        checks = [(self.epochs >= 1, "ppo.epochs must be >= 1"),
                  (self.num_minibatches >= 1, "ppo.num_minibatches must be >= 1"),
                  (self.clip_eps > 0, "ppo.clip_eps must be > 0"), (self.vf_clip > 0, "ppo.vf_clip must be > 0"),
                  (self.vf_coef >= 0, "ppo.vf_coef must be >= 0"),
                  (0 <= self.gamma <= 1, "ppo.gamma must be in [0, 1]"),
                  (0 <= self.lam <= 1, "ppo.lam must be in [0, 1]"), (self.kl_coef >= 0, "ppo.kl_coef must be >= 0"),
                  (self.kl_estimator in KL_KINDS, f"ppo.kl_estimator must be one of {', '.join(KL_KINDS)}"),
                  (self.kl_target >= 0, "ppo.kl_target must be >= 0"),
                  (self.kl_horizon > 0, "ppo.kl_horizon must be > 0"),
                  (self.missing_eos_penalty >= 0, "ppo.missing_eos_penalty must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise errors.ConfigError(f"{message}.")


@dataclasses.dataclass(frozen=True)
class PpoModels:
    """Static pieces of the policy, value and reward models."""
    policy: onpolicy.Policy
    value: ScalarModel
    reward: ScalarModel


def token_values(trainable, frozen, batch, rng, m: PpoModels):
    """V(x, y_<t) `[B, N]`: the value head on the value model's hidden state before each response token (a value
    model on the policy's frozen base reads it at `frozen["policy"]`)."""
    value = trainable["value"]
    model = m.value.backbone.model(value["model"], frozen.get("policy", {}), rng)
    hidden = onpolicy.response_hidden(model, batch["tokens"], batch["mask"], batch["response"].shape[1])
    return heads.token_scores(hidden, value["head"])


def ppo_score(state: TrainState, rollout: dict, *, m: PpoModels, gain: float = 1.0, bias: float = 0.0,
              missing_eos_penalty: float = 0.0) -> dict:
    """A sampled rollout (the `sampler` contract) with everything `ppo_step` needs, computed by the learner:
    `old_logps`, `ref_logps`, `values` (`[B, N]`, 0 where masked), `scores` `[B]` (gain·r + bias −
    penalty·[no EOS]), `raw_scores`, and per-token `kl` / `entropy` for the metrics."""
    batch = {k: rollout[k] for k in ("tokens", "mask", "response", "response_mask", "ended")}
    mask = batch["response_mask"] > 0
    logps, hidden, head = onpolicy.response_logps(m.policy.forward(state.params["policy"], state.frozen), batch,
                                                  m.policy)
    reference = m.policy.reference(state.params["policy"], state.frozen)
    ref_logps, ref_hidden, ref_head = onpolicy.response_logps(reference, batch, m.policy)
    batch.update(onpolicy.reference_comparison(hidden, head, ref_hidden, ref_head, mask, m.policy))
    values = token_values(state.params, state.frozen, batch, None, m)
    raw = onpolicy.reward_model_scores(m.reward, state.frozen, batch["tokens"], batch["mask"])
    scores = gain * raw + bias - missing_eos_penalty * (1.0 - batch["ended"].astype(jnp.float32))
    zero = jnp.zeros((), jnp.float32)
    return {**batch, "old_logps": jnp.where(mask, logps, zero), "ref_logps": jnp.where(mask, ref_logps, zero),
            "values": jnp.where(mask, values, zero), "scores": scores, "raw_scores": raw}


def ppo_loss(trainable, frozen, batch, rng, *, m: PpoModels, h: PpoHyper):
    """(Σ token losses, (token count, Σ metrics)) of a minibatch: clipped surrogate + vf_coef · clipped value loss
    − entropy_coef · entropy, summed over the real response tokens."""
    mask = batch["response_mask"] > 0
    policy = m.policy.forward(trainable["policy"], frozen, rng)
    logps, hidden, head = onpolicy.response_logps(policy, batch, m.policy)
    pg_sum, count, pg = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_eps=h.clip_eps)
    values = token_values(trainable, frozen, batch, None if rng is None else jax.random.fold_in(rng, 1), m)
    vf_sum, _, vf = ppo_value_loss(values, batch["values"], batch["returns"], mask, clip_range=h.vf_clip)
    loss = pg_sum + h.vf_coef * vf_sum
    if h.entropy_coef:
        entropy = chunked_token_entropy(hidden, head, chunk_size=m.policy.chunk_size)
        loss = loss - h.entropy_coef * jnp.sum(jnp.where(mask, entropy, 0.0))
    sums = {"policy_loss": pg_sum, "value_loss": vf_sum, **onpolicy.token_sums(pg), **onpolicy.token_sums(vf)}
    return loss, (count, sums)


def adaptive_kl_coef(kl_coef, kl, *, target: float, horizon: float, batch_size: int):
    """Ziegler et al.'s proportional controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·batch/horizon); β unchanged
    when `target` is 0."""
    if not target:
        return kl_coef
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * batch_size / horizon)


def ppo_step(state: TrainState, batch: dict, *, m: PpoModels, h: PpoHyper, optimizer, grad_accum: int):
    """One PPO iteration on a rollout (`ppo_score`'s output): GAE, whitening, epochs × minibatches of updates,
    the KL controller. A rollout with a non-finite score changes nothing but the step count (`skipped` = 1)."""
    return onpolicy.unless_nonfinite(functools.partial(_ppo_update, m=m, h=h, optimizer=optimizer,
                                                       grad_accum=grad_accum), state, batch, batch["scores"])


def _ppo_update(state, batch, *, m, h, optimizer, grad_accum):
    mask = batch["response_mask"] > 0
    beta = state.frozen["kl_coef"]
    rewards = ppo_rewards(batch["scores"], batch["old_logps"], batch["ref_logps"], mask, kl_coef=beta,
                          kind=h.kl_estimator)
    if h.whiten_rewards:
        rewards = jnp.where(mask, masked_whiten(rewards, mask, shift_mean=False), 0.0)
    advantages, returns = gae_advantages(rewards, batch["values"], mask, gamma=h.gamma, lam=h.lam)
    advantages = jnp.where(mask, masked_whiten(advantages, mask), 0.0)
    train = {k: batch[k] for k in ("tokens", "mask", "response", "response_mask", "old_logps", "values")}
    train.update(advantages=advantages, returns=returns)
    state, per_update = onpolicy.minibatch_updates(
        state, train, functools.partial(ppo_loss, m=m, h=h), optimizer=optimizer, epochs=h.epochs,
        num_minibatches=h.num_minibatches, grad_accum=grad_accum)
    stats = onpolicy.rollout_stats(batch, batch["scores"], beta)
    new_beta = adaptive_kl_coef(beta, stats["kl"], target=h.kl_target, horizon=h.kl_horizon,
                                batch_size=mask.shape[0])
    state = state.replace(frozen={**state.frozen, "kl_coef": new_beta})
    residual_var = masked_var(returns - batch["values"], mask)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics.update(stats)
    metrics.update({
        "ratio_first": per_update["ratio_mean"][0], "policy_loss_first": per_update["policy_loss"][0],
        "kl_estimate": jnp.mean(jnp.sum(jnp.where(mask, kl_penalty(batch["old_logps"], batch["ref_logps"],
                                                                   h.kl_estimator), 0.0), axis=1)),
        "kl_coef": beta, "value_mean": masked_mean(batch["values"], mask),
        "explained_variance": 1.0 - residual_var / jnp.maximum(masked_var(returns, mask), 1e-8),
        "raw_score": jnp.mean(batch["raw_scores"])})
    return state, metrics


# ----------------------------------------------------------------------------------------------------------------
# Task wiring
# ----------------------------------------------------------------------------------------------------------------


class Rollouts:
    """`Task.prepare`: this step's prompts (cut to their bucket's width, `trim_left_padding`) sampled by `engine`
    (default: the policy's KV-cache sampler; rng fold_in(state.rng, 1)) and scored by the learner (`ppo_score`)."""

    def __init__(self, mesh, *, m: PpoModels, sampling: onpolicy.Sampling, eos_id: int, pad_id: int, engine=None,
                 **score_kwargs):
        self.mesh, self.m, self.sampling = mesh, m, sampling
        self.engine = engine or m.policy.rollout_sampler(eos_id=eos_id, pad_id=pad_id)
        self.score = jax.jit(functools.partial(ppo_score, m=m, **score_kwargs))

    def rollout(self, state, prompts: dict, rng) -> dict:
        with jax.set_mesh(self.mesh):
            weights = self.m.policy.weights(state.params["policy"], state.frozen)
            return self.score(state, self.engine.sample(weights, prompts, rng, self.sampling))

    def __call__(self, state, step, batch, draw=None):  # PPO reads no extra prompt batch
        prompts = trim_left_padding({k: batch[k] for k in onpolicy.PROMPT_KEYS})
        return self.rollout(state, prompts, jax.random.fold_in(state.rng, 1)), {}


class RolloutEval:
    """`Task.eval_extra`: mean score, KL, rlhf_reward, EOS rate and response length of sampled responses to the
    held-out prompts (fixed rng, so evaluations are comparable across steps)."""

    def __init__(self, mesh, prompts: dict, seed: int, **rollout_kwargs):
        self.prompts, self.rng = trim_left_padding(prompts), jax.random.PRNGKey(seed + 1)
        self.rollouts, self.mesh = Rollouts(mesh, **rollout_kwargs), mesh
        self.stats = jax.jit(_eval_stats)

    def __call__(self, state) -> dict:
        batch = self.rollouts.rollout(state, self.prompts, self.rng)
        with jax.set_mesh(self.mesh):
            return {k: float(v) for k, v in jax.device_get(self.stats(batch, state)).items()}


def _eval_stats(batch, state):
    stats = onpolicy.rollout_stats(batch, batch["scores"], state.frozen["kl_coef"])
    return {k: stats[k] for k in ("score", "score_std", "kl", "rlhf_reward", "eos_rate", "response_length")}


def _prompt_arrays(split: dict) -> dict:
    return {k: split[k] for k in onpolicy.PROMPT_KEYS}


def describe(config, mesh) -> Description:
    """The PPO task of `config` before data: the rollout of `data.batch_size` prompts scored by `ppo_score`."""
    h = PpoHyper(**config.ppo.to_dict())
    sampling = onpolicy.Sampling(**config.rollout.to_dict())
    model_config, meta, init_path = weights.resolve_model(config)
    b = config.data.batch_size
    onpolicy.check_budget(config, model_config, sampling, b, h.num_minibatches, "data.batch_size")
    policy = weights.trainable_model(config, model_config)
    core = ppo_core(config, policy, h, sampling, onpolicy.reward_model_of(config, meta, model_config, required=True),
                    init_base=weights.initializer(model_config, init_path))
    m, optimizer = core.models, core.optimizer
    identity = {**policy.identity(), "value_from": core.value_from,
                "reward_model": m.reward.backbone.config.checkpoint_identity()}
    task = onpolicy.rl_task(
        "ppo", core, functools.partial(ppo_step, m=m, h=h, optimizer=optimizer, grad_accum=config.grad_accum),
        {"stage": "ppo", **policy.metadata(), "resume_identity": identity,
         "model_params": "params/policy", "model_frozen": "frozen/policy", "init_from": config.init_from,
         "reward_from": config.reward_from, "ppo": dataclasses.asdict(h),
         "rollout": dataclasses.asdict(sampling)})
    sampled = sampler.rollout_shapes(b, config.data.max_prompt_len, sampling)
    return Description(
        task, model_config, meta, init_path,
        abstract_batch=lambda state: jax.eval_shape(functools.partial(ppo_score, m=m), state, sampled),
        rollout=RolloutSpec(m.policy, sampling, b, config.data.max_prompt_len,
                            policy_params=lambda params: params["policy"], scoring_forwards=4),
        parts={"hyper": h, "sampling": sampling, "models": m})


def build_task(config, workdir: str, mesh) -> Task:
    """Policy and tokenizer from `init_from` (an SFT run), reward model from `reward_from`, prompts from
    `data.train` (`prompt` records)."""
    if not config.reward_from:
        raise errors.ConfigError("PPO needs a reward model: set reward_from=checkpoint:DIR (a configs/reward.py run).")
    d = describe(config, mesh)
    h, sampling, m = d.parts["hyper"], d.parts["sampling"], d.parts["models"]
    tokenizer = lm.stage_tokenizer(config, d.meta, d.model_config, "PPO")
    normalization = weights.reward_normalization(weights.parse_source(config.reward_from, "reward_from"))
    data_cfg = config.data
    lm.resolve_chat_template(config, d.meta, tokenizer)
    data = build_prompt_datasets(data_cfg, tokenizer, max_prompt_len=int(data_cfg.max_prompt_len))
    train_data, _ = lm.data_iterators(data.train, data.eval, config)
    eval_prompts = {k: v[: config.eval_prompts] for k, v in _prompt_arrays(data.eval).items()}
    check_rows(mesh, data_cfg.batch_size, "data.batch_size (the rollout)")
    check_rows(mesh, data_cfg.batch_size // h.num_minibatches // config.grad_accum,
               "data.batch_size / ppo.num_minibatches / grad_accum (a micro-batch)")
    if config.eval_prompts:
        check_rows(mesh, len(eval_prompts["input_ids"]), "eval_prompts (held-out prompts, at most the data.eval set)")
    rollout_kwargs = {"m": m, "sampling": sampling, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                      "gain": float(normalization["gain"]), "bias": float(normalization["bias"]),
                      "missing_eos_penalty": h.missing_eos_penalty}
    return d.with_data(
        train_data=train_data, prepare=Rollouts(mesh, **rollout_kwargs),
        eval_extra=RolloutEval(mesh, eval_prompts, config.seed, **rollout_kwargs) if config.eval_prompts else None,
        metadata={"tokenizer": tokenizer.model_path, "data": data.stats,
                  **lm.chat_metadata(config, d.meta, data.stats)})


def ppo_core(config, policy: TrainableModel, h: PpoHyper, sampling, reward_model, *, init_base) -> onpolicy.RlCore:
    """The models, param layout, optimizer and cost of a PPO task; `reward_model` = (config, abstract, logical,
    loader) of the reward model. Resolves `value_from` (`policy.value_model`)."""
    rm_config = reward_model[0]
    value, value_from = value_model(policy, config.value_from, rm_config)
    m = PpoModels(policy=onpolicy.Policy(policy, sampling.temperature, config.loss_chunk), value=value,
                  reward=onpolicy.reward_scorer(rm_config))
    layout = ppo_layout(policy, value, value_from, init_base=init_base, reward_model=reward_model[1:],
                        kl_coef=h.kl_coef)
    optimizer = onpolicy.update_optimizer(config, h.epochs * h.num_minibatches)
    seq = config.data.max_prompt_len + sampling.max_new_tokens
    tokens = config.data.batch_size * seq
    # rollout ≈ 1 forward (sampling) + 4 forwards (policy, reference, value, reward) = 5/3 of a training pass;
    # then epochs × (policy + value) training passes
    flops = tokens * policy.config.flops_per_token(seq) * (5 / 3 + 2 * h.epochs)
    return onpolicy.RlCore(m, layout, optimizer, tokens, flops, value_from)


def ppo_layout(policy: TrainableModel, value: ScalarModel, value_from: str, *, init_base, reward_model,
               kl_coef: float) -> dict:
    """Trained `{"policy", "value": {"model", "head"}}` and frozen `{"policy", "reward", "kl_coef"}` (see the
    module docstring and `stages/onpolicy.py`) as `Task` layout fields."""
    rm_abstract, rm_logical, load_rm = reward_model
    with_reference = policy.layout_with_reference(init_base)

    def init_frozen(shardings):
        return {"policy": with_reference["init_frozen"](shardings["policy"]), "reward": load_rm(shardings["reward"]),
                "kl_coef": jax.jit(lambda: jnp.asarray(kl_coef, jnp.float32), out_shardings=shardings["kl_coef"])()}

    def init_value(shardings, frozen):
        start = frozen["reward"]["model"] if value_from == "reward" else frozen["policy"]
        return value.backbone.init_trainable_copying(shardings, frozen["policy"], start)

    def init_params(shardings, frozen):
        return {"policy": with_reference["init_params"](shardings["policy"], frozen["policy"]),
                "value": {"model": init_value(shardings["value"]["model"], frozen),
                          "head": value.init_head(shardings["value"]["head"])}}

    return {
        "abstract_params": {"policy": with_reference["abstract_params"], "value": value.abstract_trainable},
        "params_logical": {"policy": with_reference["params_logical"], "value": value.trainable_logical},
        "init_params": init_params,
        "abstract_frozen": {"policy": with_reference["abstract_frozen"], "reward": rm_abstract,
                            "kl_coef": jax.ShapeDtypeStruct((), jnp.float32)},
        "frozen_logical": {"policy": with_reference["frozen_logical"], "reward": rm_logical, "kl_coef": ()},
        "init_frozen": init_frozen,
    }

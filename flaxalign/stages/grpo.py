"""GRPO (Shao et al. 2024) and its family — RLOO, REINFORCE++, GSPO, CISPO, DAPO — with verifiable rewards: no value
model, a baseline from G samples of the same prompt (or the batch).

One train step on a batch of P prompts:
  1. rollout (`Task.prepare`, on the host): each prompt repeated G = `group_size` times, responses sampled with the
     KV-cache sampler, cut after EOS; the policy's (old) and the reference's log-probs recomputed in one jitted
     program; completions decoded and scored by the reward functions — plain Python callables over text
     (`flaxalign.rewards`: `exact_answer`, `answer_format`, … or `module:function`) — plus, optionally, a reward
     model (`reward_from`, weight `reward_model_weight`). A reward function that raises stops the run with its
     name (after a checkpoint); non-finite rewards skip the update (logged, `skipped` = 1). With
     `dynamic_sampling`, groups with equal rewards are replaced by informative groups of new prompts (DAPO).
  2. `grpo_step` (pure): DAPO's overlong penalty on the rewards (`overlong_buffer`); advantages from the
     `algorithm`'s estimator (`group_rl.ADVANTAGE_ESTIMATORS`: grpo, rloo, reinforce_pp, reinforce_pp_baseline;
     RLOO and REINFORCE++ put β·k1 in the reward, the others β·k3 in the loss); sampler-mismatch importance weights
     (`sampler_correction`, the gap always logged); then `epochs` × `num_minibatches` updates of the
     `policy_loss` (clip — with DAPO's ε_high and the optional δ — or cispo) at the `importance_sampling_level`
     (token, or sequence: GSPO), aggregated per `loss_type` (dapo/bnpo token-level, grpo sequence-level, dr_grpo).
With LoRA, adapters or a quantized base the reference is the frozen base with the adapters off; full fine-tuning
keeps a frozen copy (only when β > 0: at β = 0 no method needs a reference at all).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flaxalign import errors, weights
from flaxalign.losses.group_rl import (
    ADVANTAGE_ESTIMATORS,
    IMPORTANCE_LEVELS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SAMPLER_CORRECTIONS,
    Episodes,
    estimator_hyper,
    estimator_hyper_defaults,
    grpo_policy_loss,
    overlong_penalty,
    sampler_correction,
)
from flaxalign.losses.rl import kl_penalty
from flaxalign.policy import TrainableModel
from flaxalign.stages import group_rollout, lm, onpolicy
from flaxalign.stages.checks import check_rows
from flaxalign.stages.description import Description, RolloutSpec
from flaxalign.train.state import TrainState
from flaxalign.train.task import Task


@dataclasses.dataclass(frozen=True)
class GrpoHyper:
    """The `grpo` config block, validated (defaults: TRL 1.16 GRPOConfig; the paper's β is 0.04). The string fields
    name entries of the `flaxalign.losses.group_rl` registries; the advantage estimators' own hyper-parameters
    (`group_rl.estimator_hyper_defaults`: scale_rewards, rloo_normalize, …) are `estimator_hyper`, (name, value)
    pairs (`from_config` splits them out of the block)."""
    algorithm: str = "grpo"  # the advantage estimator: grpo, rloo, reinforce_pp, reinforce_pp_baseline
    group_size: int = 8
    epochs: int = 1
    num_minibatches: int = 1
    policy_loss: str = "clip"  # clip (PPO/GRPO/DAPO), cispo
    importance_sampling_level: str = "token"  # token, or sequence (GSPO)
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0  # 0 = clip_eps (symmetric); DAPO's clip-higher uses 0.28
    delta: float = 0.0  # clip: two-sided bound on the unclipped ratio (INTELLECT-2); 0 = off, else > 1
    cispo_max_weight: float = 5.0  # cispo: the cap on the importance weight
    beta: float = 0.04  # GRPO, REINFORCE++-baseline: k3 KL in the loss; RLOO, REINFORCE++: k1 KL in the reward
    loss_type: str = "dapo"
    missing_eos_penalty: float = 0.0
    # truncated importance sampling for the sampler/learner log-prob mismatch (none, token_truncate, token_mask,
    # sequence_truncate, sequence_mask) and its bounds [C_min, C_max]
    sampler_correction: str = "none"
    sampler_correction_min: float = 0.0
    sampler_correction_max: float = 3.0
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last N of rollout.max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # its largest penalty
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards and refill the batch from new prompts
    dynamic_sampling_max_rounds: int = 3  # rollouts per step at most (the first included) before filling
    estimator_hyper: tuple = ()  # ((name, value), …) of the estimators' own hyper-parameters; defaults otherwise

    @classmethod
    def from_config(cls, block) -> "GrpoHyper":
        values = block.to_dict()
        own = {name: values.pop(name) for name in estimator_hyper_defaults() if name in values}
        return cls(**values, estimator_hyper=tuple(sorted(own.items())))

    def __post_init__(self):
        for registry, value in ((ADVANTAGE_ESTIMATORS, self.algorithm), (POLICY_LOSSES, self.policy_loss),
                                (IMPORTANCE_LEVELS, self.importance_sampling_level),
                                (LOSS_AGGREGATIONS, self.loss_type), (SAMPLER_CORRECTIONS, self.sampler_correction)):
            registry.check(value)
        checks = [(self.group_size >= 2, "grpo.group_size must be >= 2 (the baseline needs other samples)"),
                  (self.epochs >= 1, "grpo.epochs must be >= 1"),
                  (self.num_minibatches >= 1, "grpo.num_minibatches must be >= 1"),
                  (self.clip_eps > 0, "grpo.clip_eps must be > 0"),
                  (self.clip_eps_high >= 0, "grpo.clip_eps_high must be >= 0"),
                  (self.delta == 0 or self.delta > 1, "grpo.delta must be 0 (off) or > 1"),
                  (self.cispo_max_weight > 0, "grpo.cispo_max_weight must be > 0"),
                  (self.beta >= 0, "grpo.beta must be >= 0"),
                  (self.missing_eos_penalty >= 0, "grpo.missing_eos_penalty must be >= 0"),
                  (0 <= self.sampler_correction_min < self.sampler_correction_max,
                   "grpo.sampler_correction_min must be >= 0 and < grpo.sampler_correction_max"),
                  (self.overlong_buffer >= 0, "grpo.overlong_buffer must be >= 0"),
                  (self.overlong_penalty >= 0, "grpo.overlong_penalty must be >= 0"),
                  (self.dynamic_sampling_max_rounds >= 1, "grpo.dynamic_sampling_max_rounds must be >= 1"),
                  (self.policy_loss != "cispo" or self.delta == 0,
                   "grpo.delta bounds the clipped surrogate's ratio; policy_loss=cispo caps it with cispo_max_weight")]
        for ok, message in checks:
            if not ok:
                raise errors.ConfigError(f"{message}.")
        self.advantage_hyper()  # validated here, once

    def advantage_hyper(self):
        """β and the chosen estimator's own hyper-parameters (`group_rl.estimator_hyper`)."""
        return estimator_hyper(self.algorithm, self.beta, **dict(self.estimator_hyper))

    def settings(self) -> dict:
        """The block as flat JSON scalars (run metadata)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "estimator_hyper"}
        return {**fields, **dict(self.estimator_hyper)}

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def estimator(self):
        return ADVANTAGE_ESTIMATORS[self.algorithm]

    @property
    def kl_in_loss(self) -> bool:
        return self.needs_reference and not self.estimator.kl_in_reward


def grpo_loss(trainable, frozen, batch, rng, *, m: group_rollout.RolloutModels, h: GrpoHyper,
              max_completion_length: int):
    mask = batch["response_mask"] > 0
    logps, _, _ = onpolicy.response_logps(m.policy.forward(trainable, frozen, rng), batch, m.policy)
    loss_sum, count, metrics = grpo_policy_loss(
        logps, batch["old_logps"], batch["ref_logps"] if h.kl_in_loss else None, batch["advantages"], mask,
        clip_eps=h.clip_eps, clip_eps_high=h.clip_eps_high or None, beta=h.beta if h.kl_in_loss else 0.0,
        loss_type=h.loss_type, max_completion_length=max_completion_length, policy_loss=h.policy_loss,
        importance_sampling_level=h.importance_sampling_level, delta=h.delta or None,
        cispo_max_weight=h.cispo_max_weight, is_weights=batch.get("is_weights"))
    # accumulated_gradients divides the sums by the minibatch's loss count: weight each token mean by this count
    sums = {k: v * count for k, v in metrics.items() if k != "tokens"}
    return loss_sum, (count, {"policy_loss": loss_sum, **sums})


def sequence_kl(batch) -> jax.Array:
    """Σ_t k1(π_old, π_ref) per response `[B]`."""
    return jnp.sum(token_kl(batch), axis=1)


def token_kl(batch) -> jax.Array:
    """k1(π_old, π_ref) per response token `[B, T]`, 0 where masked."""
    mask = batch["response_mask"] > 0
    return jnp.where(mask, kl_penalty(batch["old_logps"], batch["ref_logps"], "k1"), 0.0)


def grpo_advantages_of(batch, rewards, h: GrpoHyper):
    """Advantages `[B]` or `[B, T]` of `grpo.algorithm`'s estimator (`ADVANTAGE_ESTIMATORS`)."""
    episodes = Episodes(rewards, token_kl(batch), batch["response_mask"] > 0, h.group_size)
    return h.estimator.advantages(episodes, h.advantage_hyper())


def grpo_step(state: TrainState, batch: dict, *, m: group_rollout.RolloutModels, h: GrpoHyper, optimizer,
              grad_accum: int):
    """One GRPO/RLOO iteration on a scored rollout; non-finite rewards change nothing but the step count."""
    update = functools.partial(_grpo_update, m=m, h=h, optimizer=optimizer, grad_accum=grad_accum)
    return onpolicy.unless_nonfinite(update, state, batch, batch["rewards"])


def _grpo_update(state, batch, *, m, h, optimizer, grad_accum):
    mask = batch["response_mask"] > 0
    lengths = jnp.sum(mask, axis=1)
    rewards = batch["rewards"]
    if h.overlong_buffer:
        penalty = overlong_penalty(lengths, max_length=mask.shape[1], buffer=h.overlong_buffer,
                                   factor=h.overlong_penalty)
        rewards = rewards + penalty
    advantages = grpo_advantages_of(batch, rewards, h)
    if "group_weight" in batch:  # dynamic sampling's fill: no policy gradient (the shaping would tell them apart)
        advantages = advantages * batch["group_weight"].reshape((-1,) + (1,) * (advantages.ndim - 1))
    train = {k: batch[k] for k in ("tokens", "mask", "response", "response_mask", "old_logps", "ref_logps")}
    train["advantages"] = advantages
    is_weights, sampler_metrics = sampler_correction(
        batch["old_logps"], batch["sampler_logps"], mask, mode=h.sampler_correction,
        clip_min=h.sampler_correction_min, clip_max=h.sampler_correction_max)
    if is_weights is not None:
        train["is_weights"] = jnp.broadcast_to(is_weights, mask.shape)
    loss_fn = functools.partial(grpo_loss, m=m, h=h, max_completion_length=batch["response"].shape[1])
    state, per_update = onpolicy.minibatch_updates(state, train, loss_fn, optimizer=optimizer, epochs=h.epochs,
                                                   num_minibatches=h.num_minibatches, grad_accum=grad_accum)
    grouped = batch["rewards"].reshape(-1, h.group_size)
    token_advantages = jnp.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages, mask.shape)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics.update({
        "reward": jnp.mean(batch["rewards"]), "reward_std": jnp.std(batch["rewards"]),
        "frac_reward_zero_std": jnp.mean((jnp.std(grouped, axis=1) == 0).astype(jnp.float32)),
        "response_length": jnp.mean(lengths.astype(jnp.float32)),
        "eos_rate": jnp.mean(batch["ended"].astype(jnp.float32)),
        "advantage_abs": jnp.sum(jnp.where(mask, jnp.abs(token_advantages), 0)) / jnp.maximum(jnp.sum(mask), 1),
        **sampler_metrics})
    if h.overlong_buffer:
        metrics["overlong_penalty"] = jnp.mean(penalty)
    if h.needs_reference:  # Σ_t k1 per response; without a reference there is nothing to compare with
        metrics["kl"] = jnp.mean(sequence_kl(batch))
    return state, metrics


# ----------------------------------------------------------------------------------------------------------------
# Task wiring
# ----------------------------------------------------------------------------------------------------------------


def describe(config, mesh) -> Description:
    """The GRPO task of `config` before data: the rollout of `data.batch_size` prompts × `grpo.group_size` samples,
    scored by `group_rollout.score_rollout` and rewarded."""
    h = GrpoHyper.from_config(config.grpo)
    sampling = onpolicy.Sampling(**config.rollout.to_dict())
    check_overlong(h, sampling)
    model_config, meta, init_path = weights.resolve_model(config)
    rows = config.data.batch_size * h.group_size
    onpolicy.check_budget(config, model_config, sampling, rows, h.num_minibatches, "data.batch_size × group_size")
    policy = weights.trainable_model(config, model_config)
    rm = onpolicy.reward_model_of(config, meta, model_config)
    core = grpo_core(config, policy, h, sampling, rm, init_base=weights.initializer(model_config, init_path))
    m, optimizer = core.models, core.optimizer
    identity = {**policy.identity(), "algorithm": h.algorithm, "reference": h.needs_reference,
                "reward_model": rm[0].checkpoint_identity() if rm else None}
    task = onpolicy.rl_task(
        "grpo", core, functools.partial(grpo_step, m=m, h=h, optimizer=optimizer, grad_accum=config.grad_accum),
        {"stage": "grpo", **policy.metadata(), "resume_identity": identity, "init_from": config.init_from,
         "model_params": "params", "model_frozen": "frozen/policy", "reward_from": config.reward_from,
         "grpo": h.settings(), "rollout": dataclasses.asdict(sampling)})
    return Description(
        task, model_config, meta, init_path,
        abstract_batch=group_rollout.abstract_rollout_batch(m, sampling, rows, config.data.max_prompt_len,
                                                            with_reference=h.needs_reference),
        rollout=RolloutSpec(m.policy, sampling, rows, config.data.max_prompt_len, policy_params=lambda params: params,
                            scoring_forwards=1 + int(h.needs_reference) + int(rm is not None),
                            rounds=h.dynamic_sampling_max_rounds if h.dynamic_sampling else 1,
                            group_size=h.group_size),
        parts={"hyper": h, "sampling": sampling, "models": m, "reward_model": rm})


def build_task(config, workdir: str, mesh) -> Task:
    """Policy and tokenizer from `init_from` (an SFT run), prompts (with answers) from `data.train`, rewards from
    `rewards` (and `reward_from`)."""
    d = describe(config, mesh)
    h, sampling, m = d.parts["hyper"], d.parts["sampling"], d.parts["models"]
    tokenizer = lm.stage_tokenizer(config, d.meta, d.model_config, "GRPO")
    rewards = group_rollout.reward_setup(config, d.parts["reward_model"], "GRPO")
    rows = config.data.batch_size * h.group_size
    check_rows(mesh, config.data.batch_size, "data.batch_size (the prompts of a rollout)")
    check_rows(mesh, rows // h.num_minibatches // config.grad_accum,
               "data.batch_size × grpo.group_size / grpo.num_minibatches / grad_accum (a micro-batch)")
    data, train_data, eval_prompts = onpolicy.prompt_data(config, d.meta, tokenizer, mesh)
    scorer, eval_extra, rollout_kwargs = group_rollout.rollout_parts(
        mesh, config, rewards, tokenizer, data, eval_prompts, m=m, sampling=sampling,
        with_reference=h.needs_reference, missing_eos_penalty=h.missing_eos_penalty)
    prepare = group_rollout.GroupRollouts(
        mesh, scorer, group_size=h.group_size,
        dynamic_sampling_rounds=h.dynamic_sampling_max_rounds if h.dynamic_sampling else 0, **rollout_kwargs)
    return d.with_data(train_data=train_data, prepare=prepare, eval_extra=eval_extra,
                       metadata={"tokenizer": tokenizer.model_path, "rewards": [name for name, _ in rewards.functions],
                                 "data": data.stats, **lm.chat_metadata(config, d.meta, data.stats)})


def check_overlong(h: GrpoHyper, sampling) -> None:
    if h.overlong_buffer > sampling.max_new_tokens:
        raise errors.ConfigError(f"grpo.overlong_buffer={h.overlong_buffer} exceeds rollout.max_new_tokens="
                                 f"{sampling.max_new_tokens}: the penalty ramps over the last tokens of a response.")


def grpo_core(config, policy: TrainableModel, h: GrpoHyper, sampling, reward_model, *,
              init_base) -> onpolicy.RlCore:
    """The models, param layout, optimizer and cost of a GRPO/RLOO task; `reward_model` = (config, abstract,
    logical, loader) of the optional reward model, or None."""
    rm = reward_model
    m = group_rollout.RolloutModels(policy=onpolicy.Policy(policy, sampling.temperature, config.loss_chunk),
                   reward=onpolicy.reward_scorer(rm[0]) if rm else None)
    layout = group_rollout.rollout_layout(policy, init_base=init_base, reference=h.needs_reference,
                                          frozen_models={"reward": rm[1:]} if rm else None)
    optimizer = onpolicy.update_optimizer(config, h.epochs * h.num_minibatches)
    seq = config.data.max_prompt_len + sampling.max_new_tokens
    tokens = config.data.batch_size * h.group_size * seq
    forwards = 1 + 1 + (1 if h.needs_reference else 0) + (1 if rm else 0)  # sampling, old log-probs, reference, RM
    return onpolicy.RlCore(m, layout, optimizer, tokens, tokens * policy.config.flops_per_token(seq) *
                           (forwards / 3 + h.epochs))



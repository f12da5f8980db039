"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL `OnlineDPOTrainer`):
DPO on pairs the current policy samples itself, ranked as they are drawn.

One train step on a batch of P prompts:
  1. rollout (`Task.prepare`, `group_rollout.GroupRollouts` with G = 2): two responses per prompt sampled from the
     current policy, the reference's log-probs recomputed (and the policy's, for the logged KL), both responses
     rewarded by the reward model (`reward_from`) and/or Python reward functions (`rewards`; a judge that prefers one
     response is a function returning 1 for it), minus `missing_eos_penalty` for a response without EOS.
  2. `online_dpo_step` (pure): in each pair the higher-reward response is the chosen one; a tie states no
     preference and is left out (`skip_ties`; TRL keeps it with the first sample as chosen); one optimizer update
     takes the `loss.loss_type` loss of the DPO family (`preference.DPO_LOSSES`: sigmoid, ipo, hinge, …, with their
     own hyper-parameters) on the pairs' summed log-probs under softmax(logits), against the reference — the frozen
     base with the adapters off under LoRA / adapters / QLoRA, else a frozen copy of the starting policy.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flaxalign import errors, weights
from flaxalign.losses.preference import DPO_LOSSES, dpo_hyper, dpo_loss
from flaxalign.policy import TrainableModel
from flaxalign.stages import group_rollout, lm, onpolicy
from flaxalign.stages.checks import check_rows
from flaxalign.stages.description import Description, RolloutSpec
from flaxalign.train.state import TrainState
from flaxalign.train.task import Task

PAIR_KEYS = ("tokens", "mask", "response", "response_mask", "ref_logps")


@dataclasses.dataclass(frozen=True)
class OnlineDpoHyper:
    """The `loss` block (a DPO-family loss and its hyper-parameters) and `missing_eos_penalty`, validated."""
    loss_type: str = "sigmoid"
    beta: float = 0.1
    hyper: tuple = ()  # (name, value) of the loss's own hyper-parameters (preference.DPO_HYPER_DEFAULTS)
    missing_eos_penalty: float = 0.0
    skip_ties: bool = True  # a pair with equal rewards states no preference: left out (TRL keeps it, first = chosen)

    def __post_init__(self):
        DPO_LOSSES.check(self.loss_type)
        if not self.beta > 0:
            raise errors.ConfigError(f"loss.beta must be > 0, got {self.beta}.")
        dpo_hyper(self.loss_type, self.beta, **dict(self.hyper))
        if self.missing_eos_penalty < 0:
            raise errors.ConfigError(f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}.")

    @classmethod
    def from_config(cls, config) -> "OnlineDpoHyper":
        block = dict(config.loss)
        return cls(loss_type=block.pop("loss_type"), beta=float(block.pop("beta")),
                   hyper=tuple((k, float(v)) for k, v in block.items()),
                   missing_eos_penalty=float(config.missing_eos_penalty), skip_ties=bool(config.skip_ties))


def chosen_first(batch: dict) -> dict:
    """The rollout's rows 2i, 2i + 1 as pairs `[P, 2, ...]`, the higher-reward response first (the first on a tie),
    with their `scores` `[P, 2]`."""
    swap = batch["rewards"].reshape(-1, 2)
    swap = swap[:, 1] > swap[:, 0]

    def pair(x):
        x = x.reshape(-1, 2, *x.shape[1:])
        return jnp.where(swap.reshape(-1, *([1] * (x.ndim - 1))), x[:, ::-1], x)

    return {**{k: pair(batch[k]) for k in PAIR_KEYS}, "scores": pair(batch["rewards"])}


def pair_loss(trainable, frozen, pairs, rng, *, m: group_rollout.RolloutModels, h: OnlineDpoHyper):
    """(Σ per-pair DPO-family losses, (pair count, Σ metrics)) of `chosen_first` pairs; with `skip_ties`, pairs of
    equal scores count for nothing (loss, count and metrics)."""
    rows = {k: v.reshape(-1, *v.shape[2:]) for k, v in pairs.items() if k != "scores"}  # c0, r0, c1, r1, …
    logps, _, _ = onpolicy.response_logps(m.policy.forward(trainable, frozen, rng), rows, m.policy)
    mask = rows["response_mask"] > 0
    policy, ref = (jnp.sum(jnp.where(mask, x, 0.0), axis=1).reshape(-1, 2) for x in (logps, rows["ref_logps"]))
    lengths = jnp.sum(mask, axis=1).reshape(-1, 2)
    losses, metrics = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=h.beta, loss_type=h.loss_type,
                               chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], **dict(h.hyper))
    metrics = {**metrics, "logps/chosen": policy[:, 0], "logps/rejected": policy[:, 1]}
    scores = pairs["scores"]
    weight = (scores[:, 0] != scores[:, 1]) if h.skip_ties else jnp.ones(scores.shape[:1], bool)
    weight = weight.astype(losses.dtype)
    return jnp.sum(weight * losses), (jnp.sum(weight),
                                      {k: jnp.sum(weight * jax.lax.stop_gradient(v)) for k, v in metrics.items()})


def online_dpo_step(state: TrainState, batch: dict, *, m, h: OnlineDpoHyper, optimizer, grad_accum: int):
    """One update on a scored rollout of pairs; non-finite rewards — or, with `skip_ties`, only tied pairs — change
    nothing but the step count (no optimizer update: Adam's momentum would still move the weights)."""
    update = functools.partial(_update, m=m, h=h, optimizer=optimizer, grad_accum=grad_accum)
    rewards = batch["rewards"].reshape(-1, 2)
    decisive = jnp.any(rewards[:, 0] != rewards[:, 1]) if h.skip_ties else True
    return onpolicy.unless_nonfinite(update, state, batch, batch["rewards"], informative=decisive)


def _update(state, batch, *, m, h, optimizer, grad_accum):
    pairs = chosen_first(batch)
    loss_fn = functools.partial(pair_loss, m=m, h=h)
    state, per_update = onpolicy.minibatch_updates(state, pairs, loss_fn, optimizer=optimizer, epochs=1,
                                                   num_minibatches=1, grad_accum=grad_accum)
    mask = batch["response_mask"] > 0
    kl = jnp.sum(jnp.where(mask, batch["old_logps"] - batch["ref_logps"], 0.0), axis=1)  # Σ_t k1, TRL's objective/kl
    scores = pairs["scores"]
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics.update({
        "reward": jnp.mean(batch["rewards"]), "reward_margin": jnp.mean(scores[:, 0] - scores[:, 1]),
        "tie_rate": jnp.mean((scores[:, 0] == scores[:, 1]).astype(jnp.float32)), "kl": jnp.mean(kl),
        "response_length": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "eos_rate": jnp.mean(batch["ended"].astype(jnp.float32))})
    return state, metrics


def online_dpo_core(config, policy: TrainableModel, h: OnlineDpoHyper, sampling, reward_model, *,
                    init_base) -> onpolicy.RlCore:
    """The models, param layout (with the reference), optimizer and cost of an online-DPO task. The log-probs the
    loss compares are those of softmax(logits) (temperature 1, as TRL), whatever temperature samples."""
    rm = reward_model
    m = group_rollout.RolloutModels(policy=onpolicy.Policy(policy, 1.0, config.loss_chunk),
                                    reward=onpolicy.reward_scorer(rm[0]) if rm else None)
    layout = group_rollout.rollout_layout(policy, init_base=init_base, reference=True,
                                          frozen_models={"reward": rm[1:]} if rm else None)
    optimizer = onpolicy.update_optimizer(config, 1)
    seq = config.data.max_prompt_len + sampling.max_new_tokens
    tokens = config.data.batch_size * 2 * seq
    forwards = 1 + 1 + 1 + (1 if rm else 0)  # sampling, policy and reference log-probs, reward model
    return onpolicy.RlCore(m, layout, optimizer, tokens, tokens * policy.config.flops_per_token(seq) *
                           (forwards / 3 + 1))


def describe(config, mesh) -> Description:
    """The online-DPO task of `config` before data: two samples of each of `data.batch_size` prompts, scored by
    `group_rollout.score_rollout` and rewarded."""
    h = OnlineDpoHyper.from_config(config)
    sampling = onpolicy.Sampling(**config.rollout.to_dict())
    model_config, meta, init_path = weights.resolve_model(config)
    onpolicy.check_budget(config, model_config, sampling, config.data.batch_size, 1, "data.batch_size (pairs)")
    policy = weights.trainable_model(config, model_config)
    rm = onpolicy.reward_model_of(config, meta, model_config)
    core = online_dpo_core(config, policy, h, sampling, rm, init_base=weights.initializer(model_config, init_path))
    m, optimizer = core.models, core.optimizer
    identity = {**policy.identity(), "loss_type": h.loss_type,
                "reward_model": rm[0].checkpoint_identity() if rm else None}
    task = onpolicy.rl_task(
        "online_dpo", core,
        functools.partial(online_dpo_step, m=m, h=h, optimizer=optimizer, grad_accum=config.grad_accum),
        {"stage": "online_dpo", **policy.metadata(), "resume_identity": identity,
         "init_from": config.init_from, "model_params": "params", "model_frozen": "frozen/policy",
         "reward_from": config.reward_from, "loss": dataclasses.asdict(h),
         "rollout": dataclasses.asdict(sampling)})
    rows = 2 * config.data.batch_size
    return Description(
        task, model_config, meta, init_path,
        abstract_batch=group_rollout.abstract_rollout_batch(m, sampling, rows, config.data.max_prompt_len,
                                                            with_reference=True),
        rollout=RolloutSpec(m.policy, sampling, rows, config.data.max_prompt_len, policy_params=lambda params: params,
                            scoring_forwards=2 + int(rm is not None), group_size=2),
        parts={"hyper": h, "sampling": sampling, "models": m, "reward_model": rm})


def build_task(config, workdir: str, mesh) -> Task:
    """Policy and tokenizer from `init_from` (an SFT run), prompts from `data.train`, the ranking from `reward_from`
    and/or `rewards`."""
    d = describe(config, mesh)
    h, sampling, m = d.parts["hyper"], d.parts["sampling"], d.parts["models"]
    tokenizer = lm.stage_tokenizer(config, d.meta, d.model_config, "online DPO")
    rewards = group_rollout.reward_setup(config, d.parts["reward_model"], "Online DPO")
    check_rows(mesh, config.data.batch_size // config.grad_accum,
               "data.batch_size / grad_accum (the pairs of a micro-batch)")
    data, train_data, eval_prompts = onpolicy.prompt_data(config, d.meta, tokenizer, mesh)
    scorer, eval_extra, rollout_kwargs = group_rollout.rollout_parts(
        mesh, config, rewards, tokenizer, data, eval_prompts, m=m, sampling=sampling, with_reference=True,
        missing_eos_penalty=h.missing_eos_penalty)
    return d.with_data(train_data=train_data, eval_extra=eval_extra,
                       prepare=group_rollout.GroupRollouts(mesh, scorer, group_size=2, **rollout_kwargs),
                       metadata={"tokenizer": tokenizer.model_path, "rewards": [name for name, _ in rewards.functions],
                                 "data": data.stats, **lm.chat_metadata(config, d.meta, data.stats)})

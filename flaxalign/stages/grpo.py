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
import numpy as np
from absl import logging

from flaxalign import errors, host_rows, sharding, weights
from flaxalign.data.prompt_data import build_prompt_datasets, prompt_texts
from flaxalign.generate import decode_responses
from flaxalign.losses.group_rl import (
    ADVANTAGE_ESTIMATORS,
    IMPORTANCE_LEVELS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SAMPLER_CORRECTIONS,
    SCALE_REWARDS,
    Episodes,
    EstimatorHyper,
    grpo_policy_loss,
    informative_groups,
    overlong_penalty,
    sampler_correction,
)
from flaxalign.losses.rl import kl_penalty
from flaxalign.policy import ScalarModel, TrainableModel
from flaxalign.rewards import resolve_reward_functions, score_completions
from flaxalign.sampler import trim_left_padding
from flaxalign.stages import lm, onpolicy
from flaxalign.stages.checks import check_rows
from flaxalign.train.state import TrainState
from flaxalign.train.task import Task


@dataclasses.dataclass(frozen=True)
class GrpoHyper:
    """The `grpo` config block, validated (defaults: TRL 1.16 GRPOConfig; the paper's β is 0.04). The string fields
    name entries of the `flaxalign.losses.group_rl` registries."""
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
    scale_rewards: str = "group"
    rloo_normalize: bool = False
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
                  (self.scale_rewards in SCALE_REWARDS,
                   f"grpo.scale_rewards must be one of {', '.join(SCALE_REWARDS)}"),
                  (self.missing_eos_penalty >= 0, "grpo.missing_eos_penalty must be >= 0"),
                  (0 <= self.sampler_correction_min < self.sampler_correction_max,
                   "grpo.sampler_correction_min must be >= 0 and < grpo.sampler_correction_max"),
                  (self.overlong_buffer >= 0, "grpo.overlong_buffer must be >= 0"),
                  (self.overlong_penalty >= 0, "grpo.overlong_penalty must be >= 0"),
                  (self.dynamic_sampling_max_rounds >= 1, "grpo.dynamic_sampling_max_rounds must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise errors.ConfigError(f"{message}.")

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def estimator(self):
        return ADVANTAGE_ESTIMATORS[self.algorithm]

    @property
    def kl_in_loss(self) -> bool:
        return self.needs_reference and not self.estimator.kl_in_reward


@dataclasses.dataclass(frozen=True)
class GrpoModels:
    policy: onpolicy.Policy
    reward: ScalarModel | None = None  # None: no reward model


def repeat_prompts(prompts: dict, group_size: int) -> dict:
    """Each prompt row (and its `index`) `group_size` times, consecutively; sharded by rows."""
    return sharding.constrain_rows({k: jnp.repeat(v, group_size, axis=0) for k, v in prompts.items()})


def grpo_score(state: TrainState, rollout: dict, index, *, m: GrpoModels, with_reference: bool,
               learner_logps: bool = True) -> dict:
    """A sampled rollout (the `sampler` contract, its `logps` kept as `sampler_logps`) with each row's record
    `index`, the reward model's raw
    `rm_scores` (zeros without one) and, when `learner_logps`, the learner's `old_logps` and `ref_logps` (zeros
    without a reference), recomputed here rather than taken from the sampler. Sharded by rows, so that each process
    scores the rows it holds."""
    batch = {k: rollout[k] for k in ("tokens", "mask", "response", "response_mask", "ended")}
    batch["index"] = index
    mask = batch["response_mask"] > 0
    batch["sampler_logps"] = jnp.where(mask, jnp.asarray(rollout["logps"], jnp.float32), 0.0)
    if m.reward is not None:
        batch["rm_scores"] = onpolicy.reward_model_scores(m.reward, state.frozen, batch["tokens"], batch["mask"])
    else:
        batch["rm_scores"] = jnp.zeros(mask.shape[:1], jnp.float32)
    if learner_logps:
        zero = jnp.zeros((), jnp.float32)
        logps, _, _ = onpolicy.response_logps(m.policy.forward(state.params, state.frozen), batch, m.policy)
        batch["old_logps"] = jnp.where(mask, logps, zero)
        if with_reference:
            reference = m.policy.reference(state.params, state.frozen)
            ref_logps, _, _ = onpolicy.response_logps(reference, batch, m.policy)
            batch["ref_logps"] = jnp.where(mask, ref_logps, zero)
        else:
            batch["ref_logps"] = jnp.zeros_like(batch["old_logps"])
    return sharding.constrain_rows(batch)


def grpo_loss(trainable, frozen, batch, rng, *, m: GrpoModels, h: GrpoHyper, max_completion_length: int):
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
    return h.estimator.advantages(episodes, EstimatorHyper(h.beta, h.scale_rewards, h.rloo_normalize))


def grpo_step(state: TrainState, batch: dict, *, m: GrpoModels, h: GrpoHyper, optimizer, grad_accum: int):
    """One GRPO/RLOO iteration on a scored rollout; non-finite rewards change nothing but the step count."""
    update = functools.partial(_grpo_update, m=m, h=h, optimizer=optimizer, grad_accum=grad_accum)
    return onpolicy.unless_nonfinite(update, state, batch, batch["rewards"])


def _grpo_update(state, batch, *, m, h, optimizer, grad_accum):
    mask = batch["response_mask"] > 0
    lengths = jnp.sum(mask, axis=1)
    rewards = batch["rewards"]
    if h.overlong_buffer:
        penalty = overlong_penalty(lengths, max_length=mask.shape[1], buffer=min(h.overlong_buffer, mask.shape[1]),
                                   factor=h.overlong_penalty)
        rewards = rewards + penalty
    advantages = grpo_advantages_of(batch, rewards, h)
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
# Host side: decoding and the reward functions
# ----------------------------------------------------------------------------------------------------------------


class Scorer:
    """Reward functions (+ the optional reward model) over one rollout: total reward `[B]` and per-function means.

    Each process decodes and scores the rollout rows it owns, and the per-row rewards are all-gathered
    (`host_rows`), so every process returns the same totals: reward functions are Python on the host, and a
    multi-process run splits that work instead of leaving it to one process."""

    def __init__(self, functions, weights, tokenizer, records, *, reward_model_weight: float, gain: float,
                 bias: float, missing_eos_penalty: float):
        self.functions, self.weights, self.tokenizer, self.records = functions, weights, tokenizer, records
        self.rm_weight, self.gain, self.bias, self.penalty = reward_model_weight, gain, bias, missing_eos_penalty
        # decided over all records, so that every process passes the functions the same columns
        self.with_answers = any("answer" in r for r in records)

    def __call__(self, rollout: dict) -> tuple[np.ndarray, dict]:
        """`rollout`: `grpo_score`'s, whose `index` is each row's record."""
        rows = host_rows.owned_rows(rollout["response"])
        host = {k: host_rows.local_rows(rollout[k], rows)
                for k in ("response", "response_mask", "ended", "rm_scores", "index")}
        failure, columns = None, np.zeros((len(rows), len(self.functions) + 2))
        try:
            if len(rows):  # a process holding only rows another process owns has nothing to score
                columns = self._score(host)
        except Exception as error:  # noqa: BLE001 - every process stops, none waits for the failed one
            failure = error
        host_rows.raise_together(failure)
        columns = host_rows.gather_rows(columns, rows, rollout["response"].shape[0])
        total, rm, per_function = columns[:, 0], columns[:, 1], columns[:, 2:]
        logged = {f"rewards/{name}": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                  for (name, _), v in zip(self.functions, per_function.T)}
        if self.rm_weight:
            logged["rewards/reward_model"] = float(np.mean(rm))
        return total, logged

    def _score(self, host: dict) -> np.ndarray:
        """`[rows, 2 + functions]`: total reward, normalised reward-model score, each function's rewards."""
        records = [self.records[int(i)] for i in host["index"]]
        completions = decode_responses(self.tokenizer, host["response"], host["response_mask"])
        columns = {"answer": [r.get("answer") for r in records]} if self.with_answers else {}
        total, per_function = score_completions(self.functions, self.weights, prompt_texts(records), completions,
                                                columns)
        rm = self.gain * np.asarray(host["rm_scores"], np.float64) + self.bias
        if self.rm_weight:
            total = total + self.rm_weight * rm
        total = total - self.penalty * (1.0 - np.asarray(host["ended"], np.float64))
        return np.stack([total, rm, *per_function.values()], axis=1)


class GrpoRollouts:
    """`Task.prepare`: the prompts (cut to their bucket's width, `trim_left_padding`) repeated G times, sampled by
    `engine` (default: the policy's KV-cache sampler; rng fold_in(state.rng, 1)), scored by the learner
    (`grpo_score`), rewarded on the host (`Scorer`).

    With `grpo.dynamic_sampling` (DAPO), groups whose G rewards are all equal are dropped and the batch is refilled
    with the informative groups of further rollouts of the next prompt batches (`draw`, rng fold_in(…, round)), at most
    `dynamic_sampling_max_rounds` rollouts in all; slots still empty then keep the first rollout's dropped groups
    (which teach nothing but their KL term). Logged: `dynamic_sampling/rounds`, `/dropped_groups`, `/filled_groups`;
    the per-function reward means are the first rollout's."""

    def __init__(self, mesh, scorer: Scorer, h: GrpoHyper, *, m: GrpoModels, sampling: onpolicy.Sampling,
                 eos_id: int, pad_id: int, with_reference: bool, engine=None):
        self.mesh, self.scorer, self.sampling, self.m, self.h = mesh, scorer, sampling, m, h
        self.engine = engine or m.policy.rollout_sampler(eos_id=eos_id, pad_id=pad_id)
        self.repeat = jax.jit(functools.partial(repeat_prompts, group_size=h.group_size))
        self.score = jax.jit(functools.partial(grpo_score, m=m, with_reference=with_reference))
        self.select = jax.jit(select_rows)

    def __call__(self, state, step, batch, draw=None):
        rollout, rewards, logged = self._rollout(state, batch, 0)
        if self.h.dynamic_sampling:
            rollout, rewards, counts = self._refill(state, rollout, rewards, draw)
            logged.update(counts)
        bad = int(np.sum(~np.isfinite(rewards)))
        if bad:
            logging.warning("step %d: %d of %d rewards are not finite; this update is skipped.", step, bad,
                            rewards.size)
        rows = sharding.batch_sharding(self.mesh, rewards.size, 1)
        rollout["rewards"] = jax.make_array_from_callback(rewards.shape, rows,
                                                          lambda index: rewards[index].astype(np.float32))
        return rollout, logged

    def _rollout(self, state, batch, round_: int):
        rng = jax.random.fold_in(state.rng, 1)
        with jax.set_mesh(self.mesh):
            prompts = self.repeat(trim_left_padding({k: batch[k] for k in (*onpolicy.PROMPT_KEYS, "index")}))
            weights = self.m.policy.weights(state.params, state.frozen)
            sampled = self.engine.sample(weights, {k: prompts[k] for k in onpolicy.PROMPT_KEYS},
                                         jax.random.fold_in(rng, round_) if round_ else rng, self.sampling)
            rollout = self.score(state, sampled, prompts["index"])
        rewards, logged = self.scorer(rollout)
        return rollout, rewards, logged

    def _refill(self, state, rollout, rewards, draw):
        g = self.h.group_size
        groups = rewards.size // g
        rollouts, kept, dropped = [rollout], [], []
        for round_ in range(self.h.dynamic_sampling_max_rounds):
            if round_:
                if draw is None or len(kept) >= groups:
                    break
                more, more_rewards, _ = self._rollout(state, draw(), round_)
                rollouts.append(more)
                rewards = np.concatenate([rewards, more_rewards])
            start = round_ * groups
            # a non-finite reward keeps its group: the step is then skipped as without dynamic sampling
            informative = np.asarray(informative_groups(np.nan_to_num(rewards[start * g:], nan=np.inf), g))
            kept += [start + i for i in np.flatnonzero(informative)]
            dropped += [start + i for i in np.flatnonzero(~informative)]
        filled = dropped[: max(groups - len(kept), 0)]  # the first rollout's dropped groups come first
        chosen = np.asarray((kept[:groups] + filled)[:groups])
        rows = (chosen[:, None] * g + np.arange(g)).reshape(-1)
        with jax.set_mesh(self.mesh):
            selected = self.select(rollouts, rows)
        counts = {"dynamic_sampling/rounds": float(len(rollouts)), "dynamic_sampling/dropped_groups": float(
            len(dropped)), "dynamic_sampling/filled_groups": float(len(filled))}
        return selected, rewards[rows], counts


def select_rows(rollouts: list[dict], rows) -> dict:
    """Rows `rows` of the rollouts stacked in order; prompts of different bucket widths are left-padded (mask 0) to
    the widest, which changes no log-prob. Sharded by rows."""
    width = max(r["tokens"].shape[1] for r in rollouts)

    def left_pad(x):
        return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)))

    stacked = {k: jnp.concatenate([left_pad(r[k]) if k in ("tokens", "mask") else r[k] for r in rollouts])
               for k in rollouts[0]}
    return sharding.constrain_rows({k: v[rows] for k, v in stacked.items()})


class GrpoEval:
    """`Task.eval_extra`: each reward function's mean over held-out prompts, for greedy responses and for one
    sampled response per prompt at the rollout temperature (fixed rng)."""

    def __init__(self, mesh, prompts: dict, scorer: Scorer, seed: int, *, m: GrpoModels,
                 sampling: onpolicy.Sampling, eos_id: int, pad_id: int, with_reference: bool, engine=None):
        self.mesh, self.scorer, self.rng = mesh, scorer, jax.random.PRNGKey(seed + 1)
        self.prompts = trim_left_padding(prompts)
        self.m, self.settings = m, {"greedy": sampling.greedy(), "sampled": sampling}
        self.engine = engine or m.policy.rollout_sampler(eos_id=eos_id, pad_id=pad_id)
        self.score = jax.jit(functools.partial(grpo_score, m=m, with_reference=with_reference, learner_logps=False))

    def __call__(self, state) -> dict:
        prompts = {k: self.prompts[k] for k in onpolicy.PROMPT_KEYS}
        out = {}
        for name, sampling in self.settings.items():
            with jax.set_mesh(self.mesh):
                sampled = self.engine.sample(self.m.policy.weights(state.params, state.frozen), prompts, self.rng,
                                             sampling)
                rollout = self.score(state, sampled, self.prompts["index"])
            total, logged = self.scorer(rollout)
            out[f"reward_{name}"] = float(np.nanmean(total))
            out.update({f"{key.split('/', 1)[1]}_{name}": value for key, value in logged.items()})
            out[f"response_length_{name}"] = float(jnp.mean(jnp.sum(rollout["response_mask"], axis=1)))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Task wiring
# ----------------------------------------------------------------------------------------------------------------


def build_task(config, workdir: str, mesh) -> Task:
    """Policy and tokenizer from `init_from` (an SFT run), prompts (with answers) from `data.train`, rewards from
    `rewards` (and `reward_from`)."""
    h = GrpoHyper(**config.grpo.to_dict())
    sampling = onpolicy.Sampling(**config.rollout.to_dict())
    model_config, meta, init_path = weights.resolve_model(config)
    tokenizer = lm.stage_tokenizer(config, meta, model_config, "GRPO")
    functions = resolve_reward_functions(config.rewards) if config.rewards.strip() else []
    if not functions and not config.reward_from:
        raise errors.ConfigError("GRPO needs rewards: name reward functions in `rewards` and/or set reward_from.")
    weights_of_rewards = _weights(config.reward_weights)
    policy = weights.trainable_model(config, model_config)

    data_cfg = config.data
    rows = data_cfg.batch_size * h.group_size
    onpolicy.check_budget(config, model_config, sampling, rows, h.num_minibatches, "data.batch_size × group_size")
    lm.resolve_chat_template(config, meta, tokenizer)
    data = build_prompt_datasets(data_cfg, tokenizer, max_prompt_len=int(data_cfg.max_prompt_len))
    train_data, _ = lm.data_iterators(data.train, data.eval, config)
    check_rows(mesh, data_cfg.batch_size, "data.batch_size (the prompts of a rollout)")
    check_rows(mesh, rows // h.num_minibatches // config.grad_accum,
               "data.batch_size × grpo.group_size / grpo.num_minibatches / grad_accum (a micro-batch)")
    if config.eval_prompts:
        check_rows(mesh, min(config.eval_prompts, len(data.eval["input_ids"])),
                   "eval_prompts (held-out prompts, at most the data.eval set)")

    rm = None
    normalization = {"gain": 1.0, "bias": 0.0}
    if config.reward_from:
        reward_path = weights.parse_source(config.reward_from, "reward_from")
        rm = weights.reward_from(reward_path, meta or {"tokenizer": tokenizer.model_path}, model_config)
        normalization = weights.reward_normalization(reward_path)
    with_reference = h.needs_reference
    core = grpo_core(config, policy, h, sampling, rm, init_base=weights.initializer(model_config, init_path))
    m, layout, optimizer = core.models, core.layout, core.optimizer
    rollout_kwargs = {"m": m, "sampling": sampling, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                      "with_reference": with_reference}
    scorer = functools.partial(Scorer, functions, weights_of_rewards, tokenizer, reward_model_weight=float(
        config.reward_model_weight) if rm else 0.0, gain=float(normalization["gain"]),
        bias=float(normalization["bias"]), missing_eos_penalty=h.missing_eos_penalty)
    eval_extra = None
    if config.eval_prompts:
        eval_prompts = {k: v[: config.eval_prompts] for k, v in data.eval.items()}
        eval_extra = GrpoEval(mesh, eval_prompts, scorer(data.records["eval"]), config.seed, **rollout_kwargs)
    identity = {**policy.identity(), "algorithm": h.algorithm, "reference": with_reference,
                "reward_model": rm[0].checkpoint_identity() if rm else None}
    return Task(
        name="grpo", optimizer=optimizer,
        train_step=functools.partial(grpo_step, m=m, h=h, optimizer=optimizer, grad_accum=config.grad_accum),
        eval_step=None, train_data=train_data, eval_batches=None, tokens_per_step=core.tokens,
        flops_per_step=core.flops, prepare=GrpoRollouts(mesh, scorer(data.records["train"]), h, **rollout_kwargs),
        eval_extra=eval_extra,
        metadata={"stage": "grpo", **policy.metadata(), "resume_identity": identity, "tokenizer": tokenizer.model_path,
                  "init_from": config.init_from, "model_params": "params", "model_frozen": "frozen/policy",
                  "reward_from": config.reward_from, "rewards": [name for name, _ in functions],
                  "grpo": dataclasses.asdict(h), "rollout": dataclasses.asdict(sampling), "data": data.stats,
                  **lm.chat_metadata(config, meta, data.stats)},
        **layout)


def grpo_core(config, policy: TrainableModel, h: GrpoHyper, sampling, reward_model, *,
              init_base) -> onpolicy.RlCore:
    """The models, param layout, optimizer and cost of a GRPO/RLOO task; `reward_model` = (config, abstract,
    logical, loader) of the optional reward model, or None."""
    rm = reward_model
    m = GrpoModels(policy=onpolicy.Policy(policy, sampling.temperature, config.loss_chunk),
                   reward=onpolicy.reward_scorer(rm[0]) if rm else None)
    layout = grpo_layout(policy, init_base=init_base, reference=h.needs_reference,
                         reward_model=rm[1:] if rm else None)
    optimizer = onpolicy.update_optimizer(config, h.epochs * h.num_minibatches)
    seq = config.data.max_prompt_len + sampling.max_new_tokens
    tokens = config.data.batch_size * h.group_size * seq
    forwards = 1 + 1 + (1 if h.needs_reference else 0) + (1 if rm else 0)  # sampling, old log-probs, reference, RM
    return onpolicy.RlCore(m, layout, optimizer, tokens, tokens * policy.config.flops_per_token(seq) *
                           (forwards / 3 + h.epochs))


def _weights(text: str):
    if not text.strip():
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise errors.ConfigError(f"reward_weights={text!r} must be comma-separated numbers.") from None


def grpo_layout(policy: TrainableModel, *, init_base, reference: bool, reward_model) -> dict:
    """Trained: the policy's trained part. Frozen: `{"policy"}` — its frozen base, or with a reference and full
    fine-tuning the reference copy; absent when neither exists — plus `{"reward"}` when a reward model scores too."""
    own = policy.layout_with_reference(init_base) if reference else policy.layout(init_base)
    parts = {}  # frozen key -> (abstract, logical, init)
    if jax.tree.leaves(own["abstract_frozen"]):
        parts["policy"] = (own["abstract_frozen"], own["frozen_logical"], own["init_frozen"])
    if reward_model is not None:
        parts["reward"] = reward_model

    def init_frozen(shardings):
        return {key: init(shardings[key]) for key, (_, _, init) in parts.items()}

    def init_params(shardings, frozen):
        return own["init_params"](shardings, frozen.get("policy", {}))

    return {**own, "abstract_frozen": {key: part[0] for key, part in parts.items()},
            "frozen_logical": {key: part[1] for key, part in parts.items()}, "init_frozen": init_frozen,
            "init_params": init_params}

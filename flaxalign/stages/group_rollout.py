"""What the stages that sample groups of responses and reward them on the host share (GRPO and its family, online
DPO): prompts repeated G times, sampled by the policy's engine, scored by the learner (old and reference log-probs,
the reward model) in one jitted program, rewarded by Python functions over the decoded text on each process's own
rows (`Scorer`), DAPO's dynamic sampling, the held-out evaluation, the state layout, and reading the reward settings
(`rewards`, `reward_weights`, `reward_from`) from a config.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from flaxalign import errors, host_rows, sampler, sharding, weights
from flaxalign.data.prompt_data import prompt_texts
from flaxalign.generate import decode_responses
from flaxalign.losses.group_rl import informative_groups
from flaxalign.policy import ScalarModel, TrainableModel
from flaxalign.rewards import resolve_reward_functions, score_completions
from flaxalign.sampler import trim_left_padding
from flaxalign.stages import onpolicy
from flaxalign.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class RolloutModels:
    """The models a sampled-and-scored rollout needs."""
    policy: onpolicy.Policy
    reward: ScalarModel | None = None  # None: no reward model


def repeat_prompts(prompts: dict, group_size: int) -> dict:
    """Each prompt row (and its `index`) `group_size` times, consecutively; sharded by rows."""
    return sharding.constrain_rows({k: jnp.repeat(v, group_size, axis=0) for k, v in prompts.items()})


def score_rollout(state: TrainState, rollout: dict, index, *, m: RolloutModels, with_reference: bool,
                  learner_logps: bool = True) -> dict:
    """A sampled rollout (the `sampler` contract, its `logps` kept as `sampler_logps`) with each row's record
    `index`, the reward model's raw `rm_scores` (zeros without one) and, when `learner_logps`, the learner's
    `old_logps` and `ref_logps` (zeros without a reference), recomputed here rather than taken from the sampler.
    Sharded by rows, so that each process scores the rows it holds."""
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


def abstract_rollout_batch(m: RolloutModels, sampling, rows: int, prompt_len: int, *, with_reference: bool):
    """abstract train state -> the abstract train batch of a group-rollout stage: `score_rollout`'s output of a
    rollout of `rows` rows of prompts `prompt_len` wide, with its `rewards` and `group_weight`."""

    def batch(state) -> dict:
        score = functools.partial(score_rollout, m=m, with_reference=with_reference)
        out = jax.eval_shape(score, state, sampler.rollout_shapes(rows, prompt_len, sampling),
                             jax.ShapeDtypeStruct((rows,), jnp.int32))
        return {**out, "rewards": jax.ShapeDtypeStruct((rows,), jnp.float32),
                "group_weight": jax.ShapeDtypeStruct((rows,), jnp.float32)}

    return batch


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
        """`rollout`: `score_rollout`'s, whose `index` is each row's record."""
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


class GroupRollouts:
    """`Task.prepare`: the prompts (cut to their bucket's width, `trim_left_padding`) repeated G times, sampled by
    `engine` (default: the policy's KV-cache sampler; rng fold_in(state.rng, 1)), scored by the learner
    (`score_rollout`), rewarded on the host (`Scorer`).

    With `dynamic_sampling_rounds` > 0 (DAPO's dynamic sampling), groups whose G rewards are all equal are dropped
    and the batch is refilled with the informative groups of further rollouts of the next prompt batches (`draw`,
    rng fold_in(…, round)), at most `dynamic_sampling_rounds` rollouts in all; slots still empty then keep the first
    rollout's dropped groups with `group_weight` 0 (the step zeroes their advantages: they teach nothing but their KL
    term, even where reward shaping in the step would tell their samples apart). Logged: `dynamic_sampling/rounds`,
    `/dropped_groups`, `/filled_groups`; the per-function reward means are the first rollout's. The rollout carries
    `rewards` and `group_weight` (1 for every row without dynamic sampling), both `[B]`."""

    def __init__(self, mesh, scorer: Scorer, *, group_size: int, m: RolloutModels, sampling: onpolicy.Sampling,
                 eos_id: int, pad_id: int, with_reference: bool, dynamic_sampling_rounds: int = 0, engine=None):
        self.mesh, self.scorer, self.sampling, self.m = mesh, scorer, sampling, m
        self.group_size, self.dynamic_sampling_rounds = group_size, dynamic_sampling_rounds
        self.engine = engine or m.policy.rollout_sampler(eos_id=eos_id, pad_id=pad_id)
        self.repeat = jax.jit(functools.partial(repeat_prompts, group_size=group_size))
        self.score = jax.jit(functools.partial(score_rollout, m=m, with_reference=with_reference))
        self.pad = jax.jit(left_pad_rollout, static_argnames="width")
        self.select = jax.jit(select_rows)

    def __call__(self, state, step, batch, draw=None):
        rollout, rewards, logged = self._rollout(state, batch, 0)
        group_weight = np.ones(rewards.size, np.float32)
        if self.dynamic_sampling_rounds:
            rollout, rewards, group_weight, counts = self._refill(state, rollout, rewards, draw,
                                                                  batch["input_ids"].shape[1])
            logged.update(counts)
        bad = int(np.sum(~np.isfinite(rewards)))
        if bad:
            logging.warning("step %d: %d of %d rewards are not finite; this update is skipped.", step, bad,
                            rewards.size)
        rows = sharding.batch_sharding(self.mesh, rewards.size, 1)
        for name, values in (("rewards", rewards), ("group_weight", group_weight)):
            rollout[name] = jax.make_array_from_callback(values.shape, rows,
                                                         lambda index, v=values: v[index].astype(np.float32))
        return rollout, logged

    def _rollout(self, state, batch, round_: int):
        rng = jax.random.fold_in(state.rng, 1)
        with jax.set_mesh(self.mesh):
            prompts = self.repeat(trim_left_padding({k: batch[k] for k in (*onpolicy.PROMPT_KEYS, "index")}))
            weights = self.m.policy.weights(state.params, state.frozen)
            sampled = self.engine.sample(weights, {k: prompts[k] for k in onpolicy.PROMPT_KEYS},
                                         jax.random.fold_in(rng, round_) if round_ else rng, self.sampling,
                                         group_size=self.group_size)
            rollout = self.score(state, sampled, prompts["index"])
        rewards, logged = self.scorer(rollout)
        return rollout, rewards, logged

    def _refill(self, state, rollout, rewards, draw, prompt_width: int):
        g = self.group_size
        groups = rewards.size // g
        rollouts, kept, dropped = [rollout], [], []
        widths = [prompt_width + self.sampling.max_new_tokens]  # untrimmed prompt + response, per round
        for round_ in range(self.dynamic_sampling_rounds):
            if round_:
                if draw is None or len(kept) >= groups:
                    break
                batch = draw()
                widths.append(batch["input_ids"].shape[1] + self.sampling.max_new_tokens)
                more, more_rewards, _ = self._rollout(state, batch, round_)
                rollouts.append(more)
                rewards = np.concatenate([rewards, more_rewards])
            grouped = rewards[round_ * groups * g:].reshape(-1, g)
            # a group with a non-finite reward is kept: the step is then skipped, as without dynamic sampling
            finite = np.isfinite(grouped).all(axis=1)
            informative = np.asarray(informative_groups(np.where(np.isfinite(grouped), grouped, 0).reshape(-1), g))
            informative = informative | ~finite
            kept += [round_ * groups + i for i in np.flatnonzero(informative)]
            dropped += [round_ * groups + i for i in np.flatnonzero(~informative)]
        filled = dropped[: max(groups - len(kept), 0)]  # the first rollout's dropped groups come first
        chosen = np.asarray((kept[:groups] + filled)[:groups])
        counts = {"dynamic_sampling/rounds": float(len(rollouts)), "dynamic_sampling/dropped_groups": float(
            len(dropped)), "dynamic_sampling/filled_groups": float(len(filled))}
        # 1 for the informative (or non-finite) groups, 0 for the fill
        group_weight = np.repeat((np.arange(groups) < min(len(kept), groups)).astype(np.float32), g)
        if len(rollouts) == 1 and np.array_equal(chosen, np.arange(groups)):
            return rollout, rewards, group_weight, counts  # every group of the first rollout is kept, in order
        rows = (chosen[:, None] * g + np.arange(g)).reshape(-1)
        # one width for every round (the widest untrimmed prompt + response): one compile of the selection per
        # number of rounds, whatever the prompt buckets
        width = max(max(widths), *(r["tokens"].shape[1] for r in rollouts))
        with jax.set_mesh(self.mesh):
            selected = self.select([self.pad(r, width=width) for r in rollouts], rows)
        return selected, rewards[rows], group_weight, counts


def left_pad_rollout(rollout: dict, *, width: int) -> dict:
    """`tokens` and `mask` left-padded (mask 0) to `width` columns, which changes no log-prob (positions come from the
    mask)."""
    def pad(x):
        return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)))
    return {k: pad(v) if k in ("tokens", "mask") else v for k, v in rollout.items()}


def select_rows(rollouts: list[dict], rows) -> dict:
    """Rows `rows` of same-width rollouts stacked in order, sharded by rows. (The indices are replicated: each
    device gathers from the whole stacked rollout — a host-side choice of at most a few rollouts' rows.)"""
    stacked = {k: jnp.concatenate([r[k] for r in rollouts]) for k in rollouts[0]}
    return sharding.constrain_rows({k: v[rows] for k, v in stacked.items()})


class GroupEval:
    """`Task.eval_extra`: each reward function's mean over held-out prompts, for greedy responses and for one
    sampled response per prompt at the rollout temperature (fixed rng)."""

    def __init__(self, mesh, prompts: dict, scorer: Scorer, seed: int, *, m: RolloutModels,
                 sampling: onpolicy.Sampling, eos_id: int, pad_id: int, with_reference: bool, engine=None):
        self.mesh, self.scorer, self.rng = mesh, scorer, jax.random.PRNGKey(seed + 1)
        self.prompts = trim_left_padding(prompts)
        self.m, self.settings = m, {"greedy": sampling.greedy(), "sampled": sampling}
        self.engine = engine or m.policy.rollout_sampler(eos_id=eos_id, pad_id=pad_id)
        self.score = jax.jit(functools.partial(score_rollout, m=m, with_reference=with_reference, learner_logps=False))

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


def reward_weights(text: str):
    if not text.strip():
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise errors.ConfigError(f"reward_weights={text!r} must be comma-separated numbers.") from None


def rollout_layout(policy: TrainableModel, *, init_base, reference: bool, frozen_models: dict | None = None) -> dict:
    """Trained: the policy's trained part. Frozen: `{"policy"}` — its frozen base, or with a reference and full
    fine-tuning the reference copy; absent when neither exists — plus each of `frozen_models` (key → (abstract,
    logical axes, loader)), e.g. `{"reward": …}` when a reward model scores, `{"teacher": …}` when one teaches."""
    own = policy.layout_with_reference(init_base) if reference else policy.layout(init_base)
    parts = {}  # frozen key -> (abstract, logical, init)
    if jax.tree.leaves(own["abstract_frozen"]):
        parts["policy"] = (own["abstract_frozen"], own["frozen_logical"], own["init_frozen"])
    parts.update(frozen_models or {})

    def init_frozen(shardings):
        return {key: init(shardings[key]) for key, (_, _, init) in parts.items()}

    def init_params(shardings, frozen):
        return own["init_params"](shardings, frozen.get("policy", {}))

    return {**own, "abstract_frozen": {key: part[0] for key, part in parts.items()},
            "frozen_logical": {key: part[1] for key, part in parts.items()}, "init_frozen": init_frozen,
            "init_params": init_params}


@dataclasses.dataclass(frozen=True)
class RewardSetup:
    """The reward settings of a config: Python functions (name, fn), their weights, the optional reward model
    ((config, abstract, logical, loader) as `weights.reward_from` gives it) and its normalisation."""
    functions: list
    weights: list | None
    reward_model: tuple | None
    gain: float = 1.0
    bias: float = 0.0

    def scorer(self, tokenizer, records, *, reward_model_weight: float, missing_eos_penalty: float) -> Scorer:
        return Scorer(self.functions, self.weights, tokenizer, records, gain=self.gain, bias=self.bias,
                      reward_model_weight=reward_model_weight if self.reward_model else 0.0,
                      missing_eos_penalty=missing_eos_penalty)


def rollout_parts(mesh, config, rewards: RewardSetup, tokenizer, data, eval_prompts: dict | None, *,
                  m: RolloutModels, sampling, with_reference: bool, missing_eos_penalty: float):
    """What a group-rollout stage wires the same way: (the training records' `Scorer`, the `GroupEval` of the held-out
    `eval_prompts` (`onpolicy.prompt_data`) or None, the keyword arguments of `GroupRollouts`)."""
    kwargs = {"m": m, "sampling": sampling, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
              "with_reference": with_reference}
    scorer = functools.partial(rewards.scorer, tokenizer, reward_model_weight=float(config.reward_model_weight),
                               missing_eos_penalty=missing_eos_penalty)
    eval_extra = None
    if eval_prompts is not None:
        eval_extra = GroupEval(mesh, eval_prompts, scorer(data.records["eval"]), config.seed, **kwargs)
    return scorer(data.records["train"]), eval_extra, kwargs


def reward_setup(config, reward_model, stage: str) -> RewardSetup:
    """`rewards` (comma-separated function names), `reward_weights` and the reward model of a config
    (`onpolicy.reward_model_of`, or None) with its normalisation; one of the two sources is required."""
    functions = resolve_reward_functions(config.rewards) if config.rewards.strip() else []
    if not functions and not config.reward_from:
        raise errors.ConfigError(f"{stage} needs rewards: name reward functions in `rewards` and/or set reward_from.")
    if reward_model is None:
        return RewardSetup(functions, reward_weights(config.reward_weights), None)
    normalization = weights.reward_normalization(weights.parse_source(config.reward_from, "reward_from"))
    return RewardSetup(functions, reward_weights(config.reward_weights), reward_model, float(normalization["gain"]),
                       float(normalization["bias"]))

"""The GRPO family: group-baseline policy gradients with verifiable rewards, as registries of small pure pieces.

A GRPO-stage update is `advantages → per-token policy loss (× sampler-mismatch weights) + β·k3 → aggregation`; each
arrow is a table keyed by the config's string (`flaxalign.registry.Registry`), so a new method is one registered
function here plus its test:
  ADVANTAGE_ESTIMATORS  `grpo.algorithm`: grpo, rloo, reinforce_pp, reinforce_pp_baseline (+ whether β·KL goes into the
                        reward or into the loss, and the estimator's own hyper-parameters: `grpo` config fields)
  POLICY_LOSSES         `grpo.policy_loss`: clip (PPO/GRPO/DAPO, optional two-sided δ), cispo
  IMPORTANCE_LEVELS     `grpo.importance_sampling_level`: token, sequence (GSPO)
  LOSS_AGGREGATIONS     `grpo.loss_type`: grpo, bnpo, dr_grpo, dapo
  SAMPLER_CORRECTIONS   `grpo.sampler_correction`: none, token/sequence × truncate/mask
plus DAPO's overlong reward shaping and its dynamic-sampling group filter.

Tensors, masks and the `(loss_sum, count, metrics)` convention are those of `flaxalign.losses.rl`: `[B, T]` over
response tokens, masked positions selected away before any arithmetic, batches of consecutive groups of G completions
of one prompt. Semantics follow TRL 1.16 `GRPOTrainer` / `RLOOTrainer` where TRL has the method, verl's
`core_algos` for REINFORCE++; where this module departs from them the docstring says so.
"""

import dataclasses
import numbers
import types
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxalign.losses.rl import (
    RLLossError,
    _aggregate,
    _bool,
    _known,
    _one_of,
    _require,
    _token_means,
    _where,
    gae_advantages,
    kl_penalty,
    masked_whiten,
)
from flaxalign.registry import Registry

SCALE_REWARDS = ("group", "batch", "none")
_STD_EPS = 1e-4  # TRL GRPO/RLOO: advantages / (std + 1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Group baselines: GRPO and RLOO advantages (TRL 1.16 `_generate_and_score_completions`)
# ----------------------------------------------------------------------------------------------------------------


def _groups(rewards, group_size):
    _require(isinstance(group_size, numbers.Integral) and group_size >= 1,
             f"group_size must be a positive int, got {group_size!r}.")
    _require(jnp.ndim(rewards) == 1, f"rewards must be [B], got shape {jnp.shape(rewards)}.")
    _require(rewards.shape[0] % group_size == 0,
             f"the batch of {rewards.shape[0]} rewards is not a whole number of groups of {group_size}.")
    return rewards.reshape(-1, group_size)


def _std(x, axis=None, keepdims=False):
    """The unbiased (Bessel-corrected) standard deviation, TRL's `nanstd` without NaNs; needs ≥ 2 entries."""
    n = x.size if axis is None else x.shape[axis]
    centred = x - jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(centred), axis=axis, keepdims=keepdims) / (n - 1))


def grpo_advantages(rewards, group_size, *, scale_rewards="group"):
    """GRPO advantages (Shao et al. 2024) `[B]` from rewards `[B]` laid out as consecutive groups of G = group_size
    completions per prompt: A_i = (r_i − mean_group(r)) / (s + 1e-4), with s per `scale_rewards` (TRL 1.16):
      "group" (default, or True): the unbiased std of r_i's group (0 when G = 1, so A = 0)
      "batch": the unbiased std of all B rewards (PPO-Lite; the mean stays the group mean)
      "none" (or False): no division (Dr. GRPO)
    TRL's NaN handling of unscorable completions is not reproduced: rewards must be finite. In TRL the rewards of the
    whole generation batch (all processes) are normalised together: pass all of them.
    """
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    _one_of(scale_rewards, SCALE_REWARDS, "scale_rewards")
    grouped = _groups(rewards, group_size)
    advantages = (grouped - jnp.mean(grouped, axis=1, keepdims=True)).reshape(-1)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        std = _std(grouped, axis=1, keepdims=True) if group_size > 1 else jnp.zeros_like(grouped)
        std = jnp.broadcast_to(std, grouped.shape).reshape(-1)
    else:
        std = _std(rewards) if rewards.shape[0] > 1 else jnp.zeros((), rewards.dtype)
    return advantages / (std + _STD_EPS)


def rloo_advantages(rewards, group_size, *, normalize=False):
    """RLOO advantages (Kool et al. 2019; Ahmadian et al. 2024) `[B]` from rewards `[B]` in consecutive groups of G:
    the leave-one-out baseline A_i = r_i − (Σ_group r − r_i)/(G − 1) = G/(G − 1)·(r_i − mean_group(r)); 0 for G = 1
    (as TRL). `normalize` is TRL 1.16's `normalize_advantages` (default False): A ← (A − mean_B(A)) / (std_B(A) + 1e-4)
    over the whole batch, std unbiased. TRL's RLOO folds its KL penalty into the rewards first: pass
    r − β·Σ_t m·kl_penalty(old_logps, ref_logps, "k1") (TRL RLOOConfig β = 0.05), clipped to `reward_clip_range`
    before that if set.
    """
    grouped = _groups(rewards, group_size)
    if group_size > 1:
        baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
        advantages = (grouped - baseline).reshape(-1)
    else:
        advantages = jnp.zeros_like(rewards)
    if not normalize:
        return advantages
    if rewards.shape[0] == 1:
        return jnp.zeros_like(advantages)
    return (advantages - jnp.mean(advantages)) / (_std(advantages) + _STD_EPS)




# ----------------------------------------------------------------------------------------------------------------
# REINFORCE++ (Hu et al. 2025; verl `compute_reinforce_plus_plus{,_baseline}_outcome_advantage`)
# ----------------------------------------------------------------------------------------------------------------


def reinforce_pp_advantages(rewards, kl, mask, *, beta=0.0):
    """REINFORCE++ advantages `[B, T]`: the outcome reward R_b `[B]` on each row's last real token, a per-token KL
    penalty in the reward (kl `[B, T]`, e.g. k1(π_old, π_ref)), the undiscounted return-to-go, whitened over every real
    token of the batch (no critic, no group baseline):
      r_t = −β·kl_t + R·[t = last real token],   G_t = Σ_{s ≥ t} r_s,   A = (G − mean_batch G)·rsqrt(var_batch G + 1e-8)
    (variance unbiased, as verl's `masked_whiten`); 0 on masked positions."""
    m = _bool(mask)
    kl = _where(m, kl).astype(rewards.dtype)
    width = m.shape[-1]
    last = width - 1 - jnp.argmax(m[:, ::-1], axis=-1)
    at_last = (jnp.arange(width) == last[:, None]) & jnp.any(m, axis=-1, keepdims=True)
    per_token = _where(m, -beta * kl + jnp.where(at_last, rewards[:, None], 0))
    returns, _ = gae_advantages(per_token, jnp.zeros_like(per_token), m, gamma=1.0, lam=1.0)
    return _where(m, masked_whiten(returns, m))


def reinforce_pp_baseline_advantages(rewards, mask, group_size):
    """REINFORCE++-baseline advantages `[B, T]`: the group mean as baseline, then whitening over every real token of
    the batch (KL belongs in the loss, as GRPO's):  A_t = whiten_batch(R_b − mean_group(R)) on row b's real tokens."""
    grouped = _groups(rewards, group_size)
    centred = (grouped - jnp.mean(grouped, axis=1, keepdims=True)).reshape(-1)
    m = _bool(mask)
    return _where(m, masked_whiten(jnp.broadcast_to(centred[:, None], m.shape), m))


# ----------------------------------------------------------------------------------------------------------------
# Advantage estimators
# ----------------------------------------------------------------------------------------------------------------


class Episodes(NamedTuple):
    """What an advantage estimator sees of a scored rollout."""
    rewards: jax.Array  # [B] sequence rewards, consecutive groups of `group_size`
    kl: jax.Array  # [B, T] per-token k1(π_old, π_ref), 0 where masked or without a reference
    mask: jax.Array  # [B, T] real response tokens
    group_size: int


class Estimator(NamedTuple):
    """An advantage estimator: `advantages(episodes, h) -> [B] or [B, T]`, where `h` holds β (`h.beta`) and the
    estimator's own hyper-parameters (`hyper`: name → default; the `grpo` config block gets one field per name),
    validated by `check(h)`."""
    advantages: Callable[[Episodes, types.SimpleNamespace], jax.Array]
    kl_in_reward: bool  # True: β·KL shapes the reward inside `advantages`; False: the loss adds β·k3 per token
    hyper: dict = {}
    check: Callable | None = None


def _check_scale_rewards(h):
    _one_of(h.scale_rewards, SCALE_REWARDS, "grpo.scale_rewards")


ADVANTAGE_ESTIMATORS = Registry("grpo.algorithm", RLLossError)
ADVANTAGE_ESTIMATORS.register("grpo", Estimator(
    lambda e, h: grpo_advantages(e.rewards, e.group_size, scale_rewards=h.scale_rewards), kl_in_reward=False,
    hyper={"scale_rewards": "group"}, check=_check_scale_rewards))
ADVANTAGE_ESTIMATORS.register("rloo", Estimator(  # TRL RLOO: r − β·Σ_t k1 before the leave-one-out baseline
    lambda e, h: rloo_advantages(e.rewards - h.beta * jnp.sum(_where(_bool(e.mask), e.kl), axis=-1), e.group_size,
                                 normalize=h.rloo_normalize), kl_in_reward=True, hyper={"rloo_normalize": False}))
ADVANTAGE_ESTIMATORS.register("reinforce_pp", Estimator(
    lambda e, h: reinforce_pp_advantages(e.rewards, e.kl, e.mask, beta=h.beta), kl_in_reward=True))
ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", Estimator(
    lambda e, h: reinforce_pp_baseline_advantages(e.rewards, e.mask, e.group_size), kl_in_reward=False))


def estimator_hyper_defaults() -> dict:
    """name → default of every registered estimator's own hyper-parameters (the `grpo` config block's fields)."""
    defaults = {}
    for _, entry in ADVANTAGE_ESTIMATORS.items():
        for name, default in entry.hyper.items():
            defaults.setdefault(name, default)
    return defaults


def estimator_hyper(algorithm: str, beta: float, **hyper) -> types.SimpleNamespace:
    """`algorithm`'s hyper-parameters: β, then its own (`Estimator.hyper`) from `hyper` or their defaults. Every
    value is validated by the check of the estimator it belongs to; names that belong to another estimator are
    then ignored, any other name is refused."""
    known = estimator_hyper_defaults()
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise RLLossError(f"Unknown advantage-estimator hyper-parameter {', '.join(unknown)}; known: "
                          f"{', '.join(known)}.")

    def filled(entry):
        return types.SimpleNamespace(beta=beta, **{name: hyper.get(name, default)
                                                   for name, default in entry.hyper.items()})

    for _, entry in ADVANTAGE_ESTIMATORS.items():
        if entry.check is not None:
            entry.check(filled(entry))
    return filled(ADVANTAGE_ESTIMATORS[algorithm])


# ----------------------------------------------------------------------------------------------------------------
# Policy-loss forms, importance-sampling levels and aggregations (TRL 1.16 `GRPOTrainer._compute_loss`)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyLossHyper:
    clip_eps: float = 0.2  # ε_low
    clip_eps_high: float | None = None  # ε_high; None = ε_low
    delta: float | None = None  # clip: two-sided bound on the unclipped ratio (INTELLECT-2); None = off
    cispo_max_weight: float = 5.0  # cispo: the cap on the importance weight (TRL's epsilon_high under cispo)

    @property
    def eps_high(self):
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


POLICY_LOSSES = Registry("grpo.policy_loss", RLLossError)


@POLICY_LOSSES.register("clip")
def clipped_surrogate(logps, log_weights, advantages, h: PolicyLossHyper):
    """PPO's clipped surrogate as GRPO uses it, with DAPO's decoupled clip (Yu et al. 2025: ε_high > ε_low lets
    unlikely tokens rise) and INTELLECT-2's two-sided bound δ (Prime Intellect 2025) on the unclipped ratio:
      w = exp(log_weights),   ℓ = −min(min(w, δ)·A, clip(w, 1 − ε_low, 1 + ε_high)·A)
    Flags: `clip_ratio/low_mean` (w < 1 − ε_low, A < 0), `clip_ratio/high_mean` (w > 1 + ε_high, A > 0), either."""
    del logps
    w = jnp.exp(log_weights)
    unclipped = w if h.delta is None else jnp.minimum(w, h.delta)
    per_token = -jnp.minimum(unclipped * advantages, jnp.clip(w, 1 - h.clip_eps, 1 + h.eps_high) * advantages)
    low, high = (w < 1 - h.clip_eps) & (advantages < 0), (w > 1 + h.eps_high) & (advantages > 0)
    return per_token, {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}


@POLICY_LOSSES.register("cispo")
def cispo_surrogate(logps, log_weights, advantages, h: PolicyLossHyper):
    """CISPO (MiniMax-M1, 2025; TRL loss_type="cispo"): REINFORCE on every token, weighted by the importance weight
    clipped from above and treated as a constant, so no token's gradient is dropped:
      ℓ = −sg(min(w, w_max))·A·log π,   w = exp(log_weights)
    Flag `cispo_clip_ratio`: w > w_max and A > 0 (as TRL)."""
    w = jnp.exp(log_weights)
    per_token = -jax.lax.stop_gradient(jnp.minimum(w, h.cispo_max_weight)) * advantages * logps
    return per_token, {"cispo_clip_ratio": (w > h.cispo_max_weight) & (advantages > 0)}


def token_log_weights(log_ratio, m):
    """log w_t = log π_t − log π_old,t (PPO, GRPO): one importance weight per token `[B, T]`."""
    return log_ratio


def sequence_log_weights(log_ratio, m):
    """GSPO (Zheng et al. 2025): one length-normalised weight per sequence `[B, 1]`,
      log s_b = (1/|y_b|)·Σ_t (log π_t − log π_old,t)   (|y_b| clamped to ≥ 1),
    whose gradient is s_b·mean_t ∇log π_t: every token of a sequence is clipped together."""
    return jnp.sum(log_ratio, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1)


IMPORTANCE_LEVELS = Registry("grpo.importance_sampling_level", RLLossError)
IMPORTANCE_LEVELS.register("token", token_log_weights)
IMPORTANCE_LEVELS.register("sequence", sequence_log_weights)

LOSS_AGGREGATIONS = Registry("grpo.loss_type", RLLossError)


@LOSS_AGGREGATIONS.register("grpo")
def per_sequence_mean(per_token, m, max_completion_length):
    """Σ_b (Σ_t m·ℓ / max(|o_b|, 1)) and B: each sequence's token mean, then the mean over sequences (GRPO paper)."""
    return _aggregate(per_token, m, "sequence")


@LOSS_AGGREGATIONS.register("bnpo")
def local_token_mean(per_token, m, max_completion_length):
    """Σ m·ℓ and Σ m (TRL divides per micro-batch by its local token count; a caller that sums the counts over
    micro-batches, as the GRPO stage does, gets `dapo`)."""
    return _aggregate(per_token, m, "token")


@LOSS_AGGREGATIONS.register("dr_grpo")
def constant_length_sum(per_token, m, max_completion_length):
    """Dr. GRPO (Liu et al. 2025): Σ m·ℓ and B·L, L = max_completion_length (default T): no length bias."""
    loss_sum, _ = _aggregate(per_token, m, "token")
    length = m.shape[-1] if max_completion_length is None else max_completion_length
    return loss_sum, jnp.asarray(m.shape[0] * length, loss_sum.dtype)


@LOSS_AGGREGATIONS.register("dapo")
def global_token_mean(per_token, m, max_completion_length):
    """DAPO (Yu et al. 2025): Σ m·ℓ and Σ m, divided by the count summed over the whole accumulated batch."""
    return _aggregate(per_token, m, "token")


GRPO_LOSS_TYPES = LOSS_AGGREGATIONS.names


def grpo_policy_loss(logps, old_logps, ref_logps, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, beta=0.0,
                     loss_type="dapo", max_completion_length=None, policy_loss="clip",
                     importance_sampling_level="token", delta=None, cispo_max_weight=5.0, is_weights=None):
    """The GRPO family's policy loss (TRL 1.16 `GRPOTrainer._compute_loss`). With the sequence advantage A_b `[B]`
    broadcast over its tokens (or per-token advantages `[B, T]`), per real token
      ℓ_t = c_t·form(log π, log w, A) + β·k3(logps_t, ref_logps_t)
    where log w comes from `importance_sampling_level` ("token": log π − log π_old; "sequence": GSPO's per-sequence
    mean), `form` is the `policy_loss` entry ("clip", "cispo") and c_t the optional sampler-mismatch weights
    `is_weights` (`[B, T]` or `[B, 1]`, from `sampler_correction`; constants). `ref_logps` may be None when β = 0.
    The sum is aggregated per `loss_type` (`LOSS_AGGREGATIONS`; TRL's default "dapo"): "bnpo" and "dapo" return the
    same numbers and differ in what the caller sums `count` over before dividing.

    TRL spellings: GSPO is importance_sampling_level="sequence" with loss_type="grpo"; TRL's loss_type="cispo" is
    policy_loss="cispo" with loss_type="dapo" and cispo_max_weight = its epsilon_high. Metrics are token means as TRL
    logs them (the form's flags, `kl` when ref_logps is given, `tokens`); under "sequence" with `[B]` advantages TRL
    averages the flags over sequences, here every token of a sequence carries its sequence's flag (a token mean).
    With δ ≤ 1 + ε_high TRL's flags see the δ-capped ratio (it then never reports high clipping); these see the raw
    one. The loss values agree in both cases.
    """
    form = POLICY_LOSSES[policy_loss]
    aggregate = LOSS_AGGREGATIONS[loss_type]
    log_weights_of = IMPORTANCE_LEVELS[importance_sampling_level]
    h = PolicyLossHyper(clip_eps, clip_eps_high, delta, cispo_max_weight)
    _require(not _known(h.clip_eps) or h.clip_eps > 0, f"clip_eps must be > 0, got {h.clip_eps}.")
    _require(not _known(h.eps_high) or h.eps_high > 0, f"clip_eps_high must be > 0, got {h.eps_high}.")
    _require(delta is None or not _known(delta) or delta > 1, f"delta must be > 1 (or None), got {delta}.")
    _require(not _known(cispo_max_weight) or cispo_max_weight > 0,
             f"cispo_max_weight must be > 0, got {cispo_max_weight}.")
    _require(ref_logps is not None or (_known(beta) and beta == 0),
             f"grpo_policy_loss needs ref_logps when beta != 0 (got beta={beta}).")
    _require(max_completion_length is None or not _known(max_completion_length) or max_completion_length > 0,
             f"max_completion_length must be > 0, got {max_completion_length}.")
    m = _bool(mask)
    advantages = jax.lax.stop_gradient(advantages)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = _where(m, advantages)
    logps = _where(m, logps)
    log_ratio = _where(m, logps - jax.lax.stop_gradient(_where(m, old_logps)))
    per_token, flags = form(logps, log_weights_of(log_ratio, m), advantages, h)
    if is_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(_where(m, is_weights))
    kl = {}
    if ref_logps is not None:
        kl["kl"] = kl_penalty(logps, jax.lax.stop_gradient(_where(m, ref_logps)), "k3")
        per_token = per_token + beta * kl["kl"]
    loss_sum, count = aggregate(jnp.broadcast_to(per_token, m.shape), m, max_completion_length)
    flags = {k: jnp.broadcast_to(v, m.shape) for k, v in flags.items()}
    return loss_sum, count, _token_means(m, loss_sum.dtype, **flags, **kl)


# ----------------------------------------------------------------------------------------------------------------
# Sampler/learner mismatch, overlong shaping, dynamic sampling
# ----------------------------------------------------------------------------------------------------------------


class _Correction(NamedTuple):
    level: str | None  # "token" | "sequence"; None: no correction
    mask: bool  # True: weights outside [C_min, C_max] become 0; False: they are clipped into it


SAMPLER_CORRECTIONS = Registry("grpo.sampler_correction", RLLossError)
SAMPLER_CORRECTIONS.register("none", _Correction(None, False))
SAMPLER_CORRECTIONS.register("token_truncate", _Correction("token", False))
SAMPLER_CORRECTIONS.register("token_mask", _Correction("token", True))
SAMPLER_CORRECTIONS.register("sequence_truncate", _Correction("sequence", False))
SAMPLER_CORRECTIONS.register("sequence_mask", _Correction("sequence", True))


def sampler_correction(old_logps, sampler_logps, mask, *, mode="token_truncate", clip_min=0.0, clip_max=3.0):
    """Importance weights for tokens drawn by a sampler whose log-probs differ from the learner's (a bf16 cache,
    another engine, top-k/top-p filtering): truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; TRL's vllm_importance_sampling_*). With d_t = old_logps_t −
    sampler_logps_t on real tokens (0 elsewhere):
      token modes:     w_t = exp(d_t)            `[B, T]`
      sequence modes:  w_b = exp(Σ_t d_t)        `[B, 1]`
      *_truncate: clip(w, C_min, C_max);   *_mask: w where C_min ≤ w ≤ C_max, else 0
    Returns `(weights or None for "none", metrics)`, the metrics scalars over real tokens: `sampler/logp_gap_mean` and
    `sampler/logp_gap_max` (|d_t|, logged whatever the mode) and, with a correction, `sampler/is_weight_{min,mean,max}`
    (over tokens, or sequences for sequence modes)."""
    correction = SAMPLER_CORRECTIONS[mode]
    _require(not _known(clip_min) or clip_min >= 0, f"sampler_correction_min must be >= 0, got {clip_min}.")
    _require(not _known(clip_max) or not _known(clip_min) or clip_max > clip_min,
             f"sampler_correction_max must be > sampler_correction_min, got {clip_max} <= {clip_min}.")
    m = _bool(mask)
    gap = _where(m, jax.lax.stop_gradient(old_logps - sampler_logps))
    tokens = jnp.maximum(jnp.sum(m), 1).astype(gap.dtype)
    metrics = {"sampler/logp_gap_mean": jnp.sum(jnp.abs(gap)) / tokens, "sampler/logp_gap_max": jnp.max(jnp.abs(gap))}
    if correction.level is None:
        return None, metrics
    if correction.level == "sequence":
        weights, real = jnp.exp(jnp.sum(gap, axis=-1, keepdims=True)), jnp.ones((m.shape[0], 1), bool)
    else:
        weights, real = jnp.exp(gap), m
    if correction.mask:
        weights = jnp.where((weights >= clip_min) & (weights <= clip_max), weights, 0)
    else:
        weights = jnp.clip(weights, clip_min, clip_max)
    count = jnp.maximum(jnp.sum(real), 1).astype(gap.dtype)
    metrics.update({"sampler/is_weight_mean": jnp.sum(_where(real, weights)) / count,
                    "sampler/is_weight_min": jnp.min(jnp.where(real, weights, jnp.inf)),
                    "sampler/is_weight_max": jnp.max(jnp.where(real, weights, -jnp.inf))})
    return weights, metrics


def overlong_penalty(lengths, *, max_length, buffer, factor=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13) `[B]`, added to the reward; with L = max_length and
    C = buffer (0 < C ≤ L):
      0 for |y| ≤ L − C,   factor·((L − C) − |y|)/C for L − C < |y| ≤ L,   −factor for |y| > L."""
    _require(not _known(buffer) or not _known(max_length) or 0 < buffer <= max_length,
             f"the overlong buffer must be in (0, max_new_tokens = {max_length}], got {buffer}.")
    lengths = jnp.asarray(lengths, jnp.float32)
    start = max_length - buffer
    ramp = jnp.where(lengths > start, (start - lengths) / buffer, 0.0)
    return factor * jnp.where(lengths > max_length, -1.0, ramp)


def informative_groups(rewards, group_size):
    """DAPO's dynamic-sampling filter `[B / G]` bool: the groups whose rewards are not all equal (a group with zero
    reward variance has zero GRPO advantage everywhere and teaches nothing)."""
    grouped = _groups(rewards, group_size)
    return jnp.max(grouped, axis=1) > jnp.min(grouped, axis=1)

"""Policy-gradient RL math shared by PPO and the GRPO family (`flaxalign.losses.group_rl`): KL estimators, masked
statistics, GAE and the PPO-RLHF rewards and policy/value losses.

Token tensors are `[B, T]` over the response (completion) tokens only, with a `mask [B, T]` (bool, or 0/1 float) that
is 1 on the real response tokens up to and including the first EOS and 0 after it (the "EOS+1" convention: a row whose
EOS is at index e has e + 1 real tokens) and on padding. Masked positions never enter a sum, a count or a statistic:
they are selected away with `jnp.where` before any arithmetic, so even NaN/inf there leaks into no value and no
gradient. Per-sequence quantities (scores, GRPO/RLOO rewards and advantages) are `[B]`; GRPO/RLOO batches hold
consecutive groups of G completions of one prompt (B = n_prompts·G).

The losses return `(loss_sum, count, metrics)` and the loss is `loss_sum / count`. Summing `loss_sum` and `count`
separately over micro-batches (gradient accumulation) or data-parallel shards and dividing once, by max(Σ count, 1),
gives exactly the big-batch loss (DESIGN §3). `metrics` are means over this call's real tokens (gradients stopped) plus
`tokens`, the real-token count: weight them by `tokens` to combine micro-batches. Inputs that PPO/GRPO treat as data
(old log-probs, reference log-probs, advantages, old values, returns) have their gradients stopped, so passing the
current log-probs as `old_logps` (TRL's `per_token_logps.detach()` when num_iterations = 1) gives ratio 1 with the
policy gradient −A·∇log π.

Semantics follow "The N Implementation Details of RLHF with PPO" (Huang et al. 2023) and TRL 1.16 (`GRPOTrainer`,
`RLOOTrainer`); PPO follows TRL ≤ 0.x `PPOTrainer` and `trl.trainer.utils.masked_*` (removed from TRL 1.x). Where this
module departs from TRL the docstring says so. All functions are jit-able and keep the dtype (float32 or float64);
hyper-parameters are Python numbers or traced scalars, validated when concrete; string options and `group_size` are
static.
"""

import numbers

import jax
import jax.numpy as jnp

from flaxalign.errors import ConfigError

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token", "sequence")
_WHITEN_EPS = 1e-8  # TRL `masked_whiten`


class RLLossError(ConfigError, ValueError):
    """An RL-loss hyper-parameter is invalid (a `ValueError`, and a `ConfigError` for `flaxalign.main`)."""


def _require(ok: bool, message: str):
    if not ok:
        raise RLLossError(message)


def _known(x) -> bool:
    """True for concrete Python/NumPy numbers (checked); traced or array hyper-parameters are not validated."""
    return isinstance(x, numbers.Real)


def _one_of(value, valid, what):
    _require(value in valid, f"Unknown {what} {value!r}; valid ones: {', '.join(valid)}.")


def _bool(mask):
    return jnp.asarray(mask).astype(bool)


def _where(m, x):
    """x on real tokens, 0 elsewhere (the select that keeps padding out of every sum, value and gradient)."""
    return jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))


def _token_means(m, dtype, **per_token):
    """{name: mean of x over real tokens} (0 for no real token), gradients stopped, plus `tokens` = Σ m."""
    tokens = jnp.sum(m).astype(dtype)
    metrics = {k: jnp.sum(_where(m, jnp.asarray(v, dtype))) / jnp.maximum(tokens, 1) for k, v in per_token.items()}
    return jax.lax.stop_gradient({**metrics, "tokens": tokens})


def _aggregate(per_token, m, aggregation):
    """(sum, count) of per-token losses: "token" (Σ_bt m·ℓ, Σ_bt m) or "sequence" (Σ_b mean_t ℓ, B). A row without
    real tokens contributes 0 to the sequence sum and 1 to its count (as TRL's `grpo` loss, which divides by
    max(|o_b|, 1) and averages over all B rows)."""
    x = _where(m, per_token)
    if aggregation == "token":
        return jnp.sum(x), jnp.sum(m).astype(x.dtype)
    per_sequence = jnp.sum(x, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1).astype(x.dtype)
    return jnp.sum(per_sequence), jnp.asarray(x.shape[0], x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# KL estimators and masked statistics
# ----------------------------------------------------------------------------------------------------------------


def kl_penalty(logps, ref_logps, kind="k1"):
    """Per-token estimate `[B, T]` of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL
    divergence"), with logr = log π − log π_ref = logps − ref_logps:
      k1 = logr                       unbiased, can be negative (PPO-RLHF reward penalty; TRL RLOO's reward KL)
      k2 = ½·logr²                    biased, low variance (TRL PPO's logged `approxkl` between π and π_old)
      k3 = exp(−logr) − 1 + logr      unbiased and ≥ 0; equals TRL GRPO's exp(ref − logp) − (ref − logp) − 1 and
                                      TRL PPO's `kl_estimator="k3"` (logr' = ref − logp; exp(logr') − 1 − logr')
    Each is exactly 0 where logps == ref_logps. Elementwise and unmasked: select with the mask before summing.
    """
    _one_of(kind, KL_KINDS, "KL estimator kind")
    logr = logps - ref_logps
    if kind == "k1":
        return logr
    if kind == "k2":
        return 0.5 * jnp.square(logr)
    return jnp.expm1(-logr) + logr


def masked_mean(x, mask, axis=None):
    """Σ m·x / Σ m over `axis` (every axis for None): TRL's `masked_mean`. Like TRL it does not clamp the count, so
    an all-masked row (or batch) gives 0/0 = nan; the losses below clamp where TRL does."""
    m = jnp.broadcast_to(_bool(mask), jnp.shape(x))
    return jnp.sum(_where(m, x), axis=axis) / jnp.sum(m, axis=axis).astype(jnp.result_type(x))


def masked_var(x, mask, unbiased=True):
    """Variance of the real entries of x over every axis: mean_m((x − mean_m(x))²), times the Bessel correction
    n/(n − 1) with n = Σ m when `unbiased` (TRL's `masked_var`, whose default is unbiased). Needs n ≥ 2 when unbiased:
    n = 1 gives 0·1/0 = nan (TRL raises for n = 0 and divides by zero for n = 1)."""
    m = jnp.broadcast_to(_bool(mask), jnp.shape(x))
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(_where(m, x) - mean), m)
    if unbiased:
        n = jnp.sum(m).astype(var.dtype)
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True, unbiased=True):
    """(x − μ)·rsqrt(σ² + 1e-8) with μ, σ² the masked mean and variance over every axis (TRL's `masked_whiten`; TRL
    has no `unbiased` argument and always uses the unbiased variance); μ is added back when `shift_mean=False` (PPO's
    reward whitening keeps the mean). Masked positions of the output are left as computed from their (meaningless)
    inputs: callers must select them away (e.g. `jnp.where(mask, whitened, 0)`) as TRL's PPO does after whitening."""
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased)
    whitened = (x - mean) * jax.lax.rsqrt(var + _WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------------------------
# PPO-RLHF (Huang et al. 2023; TRL ≤ 0.x PPOTrainer)
# ----------------------------------------------------------------------------------------------------------------


def ppo_rewards(scores, logps, ref_logps, mask, *, kl_coef=0.05, kind="k1"):
    """Per-token PPO-RLHF rewards `[B, T]` (Ziegler et al. 2019; Huang et al. 2023): a KL penalty on every real token
    and the reward-model score `[B]` of the whole response on the row's last real token (its EOS):
      r_t = −β·k(logps_t, ref_logps_t) + score·[t = last real token],   0 on masked positions
    with k the `kind` estimator of `kl_penalty` (TRL PPOConfig defaults: β = 0.05, k1). A row without real tokens gets
    all zeros. TRL's PPOTrainer adds the score one index later (sequence_length + 1, the first pad position, when it
    exists) and keeps that position for values and the value loss; here the score sits on the last masked-in token and
    nothing after it is used, so the mask alone defines the episode."""
    m = _bool(mask)
    non_score = _where(m, -kl_coef * kl_penalty(_where(m, logps), _where(m, ref_logps), kind))
    width = m.shape[-1]
    last = width - 1 - jnp.argmax(m[:, ::-1], axis=-1)
    at_last = (jnp.arange(width) == last[:, None]) & jnp.any(m, axis=-1, keepdims=True)
    return non_score + jnp.where(at_last, scores[:, None].astype(non_score.dtype), 0)


def gae_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over each row's real tokens t₁ < … < t_n:
      δ_k = r_{t_k} + γ·V_{t_{k+1}} − V_{t_k},   A_{t_k} = δ_k + γλ·A_{t_{k+1}},   V_{t_{n+1}} = A_{t_{n+1}} = 0
    (the episode ends at EOS: no bootstrap value after the last real token), and returns R_t = A_t + V_t.
    rewards, values, mask `[B, T]`; returns `(advantages, returns)`, each `[B, T]` and 0 on masked positions.

    A reverse `jax.lax.scan` over T carries (V, A) of the next real token; masked positions pass the carry through, so
    for the usual right-padded mask this is TRL PPO's loop with V = 0 after EOS, and left padding or holes are skipped
    rather than read. Whitening the advantages (`masked_whiten(advantages, mask)`, then mask) is the caller's step.
    """
    m = _bool(mask)
    dtype = jnp.result_type(rewards, values)
    rewards, values = _where(m, rewards).astype(dtype), _where(m, values).astype(dtype)

    def step(carry, xs):
        next_value, next_advantage = carry
        reward, value, real = xs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(real, value, next_value), jnp.where(real, advantage, next_advantage))
        return carry, jnp.where(real, advantage, 0)

    zeros = jnp.zeros(rewards.shape[:1], dtype)
    _, advantages_TxB = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, m.T), reverse=True)
    advantages = advantages_TxB.T
    return advantages, _where(m, advantages + values)


def ppo_policy_loss(logps, old_logps, advantages, mask, *, clip_eps=0.2, aggregation="token"):
    """PPO clipped surrogate (Schulman et al. 2017; TRL PPO) on per-token log-probs and advantages `[B, T]`:
      ρ_t = exp(logps_t − old_logps_t),   ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))
    Returns `(loss_sum, count, metrics)`: for `aggregation="token"` (TRL) Σ m·ℓ and the real-token count; for
    `"sequence"` Σ_b (mean of ℓ over row b's real tokens) and B. Metrics (token means): `clipfrac` (share of tokens
    whose clipped term is the larger, i.e. active), `approx_kl` = ½(logps − old_logps)² (TRL averages it over all
    B·T positions, padding as 0; here over real tokens), `ratio_mean`, and `tokens`.
    """
    _one_of(aggregation, AGGREGATIONS, "aggregation")
    _require(not _known(clip_eps) or clip_eps > 0, f"clip_eps must be > 0, got {clip_eps}.")
    m = _bool(mask)
    log_ratio = _where(m, logps - jax.lax.stop_gradient(old_logps))
    advantages = jax.lax.stop_gradient(_where(m, advantages))
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    loss_sum, count = _aggregate(jnp.maximum(unclipped, clipped), m, aggregation)
    metrics = _token_means(m, loss_sum.dtype, clipfrac=clipped > unclipped, approx_kl=0.5 * jnp.square(log_ratio),
                           ratio_mean=ratio)
    return loss_sum, count, metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip_range=0.2):
    """Clipped value loss (TRL PPO, Huang et al. 2023 detail "value function loss clipping") per real token:
      ℓ_t = ½·max((V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)²)
    values, old_values, returns `[B, T]`. Returns `(Σ m·ℓ, Σ m, metrics)` with `vf_clipfrac` (share of real tokens
    where the clipped error is the larger) and `tokens`. TRL also counts the position after EOS (its `padding_mask_p1`);
    here only the masked-in tokens."""
    _require(not _known(clip_range) or clip_range > 0, f"clip_range must be > 0, got {clip_range}.")
    m = _bool(mask)
    values = _where(m, values)
    old_values = jax.lax.stop_gradient(_where(m, old_values))
    returns = jax.lax.stop_gradient(_where(m, returns))
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(jnp.clip(values, old_values - clip_range, old_values + clip_range) - returns)
    loss_sum, count = _aggregate(0.5 * jnp.maximum(unclipped, clipped), m, "token")
    return loss_sum, count, _token_means(m, loss_sum.dtype, vf_clipfrac=clipped > unclipped)

"""The RL math (`flaxalign.losses.rl`) against the independent loop implementations of `rl_reference.py` in float64
and float32, and its properties: the EOS+1 mask convention, padding that never enters a value or a gradient, ratio 1
and zero KL at the fixed points, micro-batch invariance of the (sum, count) losses, jit, and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from flaxalign.losses import group_rl, rl
from tests.losses import rl_reference as ref

RTOL = {jnp.float64: 1e-9, jnp.float32: 1e-5}
ATOL = {jnp.float64: 1e-12, jnp.float32: 1e-6}
DTYPES = [jnp.float64, jnp.float32]
X = ref.INPUTS
MASK = ref.MASK


def _close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL[dtype], atol=ATOL[dtype])


def _rounded(dtype, *arrays):
    """The inputs as the function sees them in `dtype`, as float64 for the reference."""
    return [np.asarray(np.asarray(a, dtype), np.float64) for a in arrays]


def _call(fn, dtype, *args, **kwargs):
    """fn on `dtype` arrays (bool arrays kept bool) inside `jax.enable_x64` for float64; NumPy (trees) out."""
    def arr(a):
        a = np.asarray(a)
        return jnp.asarray(a) if a.dtype == bool else jnp.asarray(a, dtype)

    with jax.enable_x64(dtype == jnp.float64):
        out = fn(*[arr(a) for a in args], **kwargs)
        jax.tree.map(lambda leaf: None if leaf.dtype == bool else np.testing.assert_equal(leaf.dtype, dtype), out)
        return jax.tree.map(np.asarray, out)


def _close_loss(out, expected, dtype):
    """(loss_sum, count, metrics) against the reference's (sum, count, metrics)."""
    (loss_sum, count, metrics), (ref_sum, ref_count, ref_metrics) = out, expected
    _close(loss_sum, ref_sum, dtype)
    _close(count, ref_count, dtype)
    assert set(metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        _close(metrics[k], v, dtype)


# ------------------------------------------------------------------------------------------------------------------
# KL estimators and masked statistics
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", rl.KL_KINDS)
def test_kl_penalty_matches_reference(kind, dtype):
    logps, ref_logps = _rounded(dtype, X["logps"], X["ref_logps"])
    _close(_call(losses.kl_penalty, dtype, logps, ref_logps, kind=kind), ref.kl(logps, ref_logps, kind), dtype)


def test_k3_is_trl_grpo_sign_convention():
    """TRL GRPO: exp(ref − logp) − (ref − logp) − 1, i.e. k3 of logr = logp − ref, and ≥ 0."""
    k3 = _call(losses.kl_penalty, jnp.float64, X["logps"][MASK], X["ref_logps"][MASK], kind="k3")
    _close(k3, ref.trl_grpo_k3(X["logps"][MASK], X["ref_logps"][MASK]), jnp.float64)
    assert (k3 >= 0).all()


@pytest.mark.parametrize("kind", rl.KL_KINDS)
def test_kl_is_exactly_zero_when_policy_is_reference(kind):
    for dtype in DTYPES:
        assert (_call(losses.kl_penalty, dtype, X["logps"], X["logps"], kind=kind) == 0).all()


def test_kl_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        losses.kl_penalty(jnp.zeros(2), jnp.zeros(2), kind="abs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mean_matches_reference(dtype):
    (x,) = _rounded(dtype, X["values"])
    _close(_call(losses.masked_mean, dtype, x, MASK), ref.masked_mean(x, MASK), dtype)
    _close(_call(functools.partial(losses.masked_mean, axis=1), dtype, x, MASK), ref.masked_mean(x, MASK, 1), dtype)
    _close(_call(functools.partial(losses.masked_mean, axis=0), dtype, x, MASK), ref.masked_mean(x, MASK, 0), dtype)
    float_mask = _call(losses.masked_mean, dtype, x, MASK.astype(np.float64))
    _close(float_mask, ref.masked_mean(x, MASK), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_reference(unbiased, dtype):
    (x,) = _rounded(dtype, X["values"])
    _close(_call(losses.masked_var, dtype, x, MASK, unbiased=unbiased), ref.masked_var(x, MASK, unbiased), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_matches_reference(unbiased, shift_mean, dtype):
    (x,) = _rounded(dtype, X["advantages"])
    out = _call(losses.masked_whiten, dtype, x, MASK, shift_mean=shift_mean, unbiased=unbiased)
    _close(np.where(MASK, out, 0), ref.masked_whiten(x, MASK, shift_mean, unbiased), dtype)
    if shift_mean:  # whitened real tokens: mean 0, variance 1 (the one the whitening used)
        real = out[MASK]
        np.testing.assert_allclose(real.mean(), 0, atol=1e-5)
        np.testing.assert_allclose(real.var(ddof=1 if unbiased else 0), 1, rtol=1e-5)


def test_masked_statistics_ignore_padding():
    nan_padded = np.where(MASK, X["values"], np.nan)
    for fn in (losses.masked_mean, losses.masked_var):
        assert _call(fn, jnp.float64, nan_padded, MASK) == _call(fn, jnp.float64, X["values"], MASK)
    whitened = _call(losses.masked_whiten, jnp.float64, nan_padded, MASK)
    np.testing.assert_array_equal(whitened[MASK], _call(losses.masked_whiten, jnp.float64, X["values"], MASK)[MASK])


# ------------------------------------------------------------------------------------------------------------------
# GAE and PPO rewards
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
def test_gae_matches_reference_loop(gamma, lam, dtype):
    """Rows of lengths 7 (EOS in the last column), 3, 5, 1, 6, 4; V = 0 after each row's EOS."""
    rewards, values = _rounded(dtype, X["rewards"], X["values"])
    advantages, returns = _call(functools.partial(losses.gae_advantages, gamma=gamma, lam=lam), dtype, rewards,
                                values, MASK)
    ref_advantages, ref_returns = ref.gae(rewards, values, MASK, gamma, lam)
    _close(advantages, ref_advantages, dtype)
    _close(returns, ref_returns, dtype)
    assert (advantages[~MASK] == 0).all() and (returns[~MASK] == 0).all()


def test_gae_skips_holes_and_left_padding():
    """Real tokens that are not a prefix: the carry passes through masked positions."""
    mask = ref.IRREGULAR_MASK
    out = _call(losses.gae_advantages, jnp.float64, X["rewards"], X["values"], mask)
    for actual, expected in zip(out, ref.gae(X["rewards"], X["values"], mask, 1.0, 0.95)):
        _close(actual, expected, jnp.float64)


def test_gae_lambda_one_is_monte_carlo_return():
    """γ = λ = 1: A_t = Σ_{k ≥ t} r_k − V_t, the reward-to-go minus the value, and R_t the reward-to-go."""
    advantages, returns = _call(functools.partial(losses.gae_advantages, gamma=1.0, lam=1.0), jnp.float64,
                                X["rewards"], X["values"], MASK)
    to_go = np.where(MASK, np.cumsum(np.where(MASK, X["rewards"], 0)[:, ::-1], axis=1)[:, ::-1], 0)
    _close(returns, to_go, jnp.float64)
    _close(advantages, np.where(MASK, to_go - X["values"], 0), jnp.float64)


def test_gae_eos_is_terminal():
    """The last real token's advantage is r − V (no bootstrap from the position after EOS)."""
    advantages, _ = _call(losses.gae_advantages, jnp.float64, X["rewards"], X["values"], MASK)
    for b, n in enumerate(ref.LENGTHS):
        np.testing.assert_allclose(advantages[b, n - 1], X["rewards"][b, n - 1] - X["values"][b, n - 1], rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", rl.KL_KINDS)
def test_ppo_rewards_match_reference(kind, dtype):
    scores, logps, ref_logps = _rounded(dtype, X["scores"], X["logps"], X["ref_logps"])
    out = _call(functools.partial(losses.ppo_rewards, kl_coef=0.1, kind=kind), dtype, scores, logps, ref_logps, MASK)
    _close(out, ref.ppo_rewards(scores, logps, ref_logps, MASK, 0.1, kind), dtype)


def test_ppo_rewards_score_on_eos():
    """With π = π_ref the rewards are the score on each row's EOS (the last real token) and 0 elsewhere; a row with no
    real tokens gets nothing."""
    mask = MASK.copy()
    mask[3] = False
    out = _call(losses.ppo_rewards, jnp.float64, X["scores"], X["logps"], X["logps"], mask)
    expected = np.zeros((ref.B, ref.T))
    for b, n in enumerate(ref.LENGTHS):
        if b != 3:
            expected[b, n - 1] = X["scores"][b]
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------------------------------------------------------
# PPO losses
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", rl.AGGREGATIONS)
def test_ppo_policy_loss_matches_reference(aggregation, dtype, clip_eps=0.2):
    logps, old, adv = _rounded(dtype, X["logps"], X["old_logps"], X["advantages"])
    out = _call(functools.partial(losses.ppo_policy_loss, clip_eps=clip_eps, aggregation=aggregation), dtype, logps,
                old, adv, MASK)
    expected = ref.ppo_policy(logps, old, adv, MASK, clip_eps, aggregation)
    _close_loss(out, expected, dtype)
    assert 0 < expected[2]["clipfrac"] < 1  # both branches are exercised


@pytest.mark.parametrize("dtype", DTYPES)
def test_ppo_value_loss_matches_reference(dtype, clip_range=0.2):
    values, old, returns = _rounded(dtype, X["values"], X["old_values"], X["returns"])
    out = _call(functools.partial(losses.ppo_value_loss, clip_range=clip_range), dtype, values, old, returns, MASK)
    expected = ref.ppo_value(values, old, returns, MASK, clip_range)
    _close_loss(out, expected, dtype)
    assert 0 < expected[2]["vf_clipfrac"] < 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(dtype):
    loss_sum, count, metrics = _call(losses.ppo_policy_loss, dtype, X["logps"], X["logps"], X["advantages"], MASK)
    assert metrics["ratio_mean"] == 1 and metrics["clipfrac"] == 0 and metrics["approx_kl"] == 0
    (adv,) = _rounded(dtype, X["advantages"])
    _close(loss_sum / count, -adv[MASK].mean(), dtype)
    assert count == MASK.sum()


def test_on_policy_gradient_is_minus_advantage():
    """old_logps = logps (TRL's detach when num_iterations = 1): ∂L/∂logp_t = −A_t / n on real tokens, 0 on padding."""
    with jax.enable_x64(True):
        logps, adv = jnp.asarray(X["logps"]), jnp.asarray(X["advantages"])

        def loss(lp):
            loss_sum, count, _ = losses.ppo_policy_loss(lp, lp, adv, MASK)
            return loss_sum / count

        grad = np.asarray(jax.grad(loss)(logps))
    np.testing.assert_allclose(grad, np.where(MASK, -X["advantages"] / MASK.sum(), 0), rtol=1e-12)


def _junk_padding(arrays, fill):
    return [np.where(MASK, a, fill) for a in arrays]


@jax.jit
def _everything(logps, old, ref_logps, adv, rewards, values, old_values, returns, scores):
    """Every loss, metric, gradient, GAE, reward and KL mean of the module on one batch (compiled once)."""
    def policy(lp, v):
        out = [losses.ppo_policy_loss(lp, old, adv, MASK, aggregation=agg) for agg in rl.AGGREGATIONS]
        out.append(losses.ppo_value_loss(v, old_values, returns, MASK))
        out += [losses.grpo_policy_loss(lp, old, ref_logps, adv, MASK, beta=0.04, loss_type=t)
                for t in group_rl.GRPO_LOSS_TYPES]
        return sum(o[0] for o in out), out

    (_, out), grads = jax.value_and_grad(policy, argnums=(0, 1), has_aux=True)(logps, values)
    gae = losses.gae_advantages(rewards, values, MASK)
    shaped = losses.ppo_rewards(scores, logps, ref_logps, MASK, kind="k3")
    return out, grads, gae, shaped, losses.masked_mean(losses.kl_penalty(logps, ref_logps, "k3"), MASK)


@pytest.mark.parametrize("fill", [np.nan, np.inf, -1e4])
def test_padding_never_enters_losses_kl_values_or_gradients(fill):
    """Values at masked positions change nothing: not the (sum, count), metrics, GAE, rewards, or any gradient."""
    names = ("logps", "old_logps", "ref_logps", "advantages", "rewards", "values", "old_values", "returns")
    clean = [X[k] for k in names]
    with jax.enable_x64(True):
        expected = _everything(*map(jnp.asarray, clean), jnp.asarray(X["scores"]))
        actual = _everything(*map(jnp.asarray, _junk_padding(clean, fill)), jnp.asarray(X["scores"]))
        expected, actual = jax.tree.map(np.asarray, (expected, actual))
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
    assert np.isfinite(expected[1][0]).all() and expected[0][0][0].dtype == np.float64


def _halves(arrays, split=2):
    return [a[:split] for a in arrays], [a[split:] for a in arrays]


def _assert_micro_batch_invariant(fn, arrays, split=2):
    """fn's (sum, count) over the batch == the sums of its (sum, count) over two row slices; metrics (token means)
    == the token-weighted mean of the slices' metrics."""
    with jax.enable_x64(True):
        whole = jax.tree.map(np.asarray, fn(*map(jnp.asarray, arrays)))
        parts = [jax.tree.map(np.asarray, fn(*map(jnp.asarray, half))) for half in _halves(arrays, split)]
    np.testing.assert_allclose(sum(p[0] for p in parts), whole[0], rtol=1e-12)
    np.testing.assert_allclose(sum(p[1] for p in parts), whole[1], rtol=1e-12)
    tokens = sum(p[2]["tokens"] for p in parts)
    np.testing.assert_allclose(tokens, whole[2]["tokens"])
    for k, v in whole[2].items():
        if k != "tokens":
            np.testing.assert_allclose(sum(p[2][k] * p[2]["tokens"] for p in parts) / tokens, v, rtol=1e-12)


@pytest.mark.parametrize("aggregation", rl.AGGREGATIONS)
def test_ppo_policy_loss_is_micro_batch_invariant(aggregation):
    fn = functools.partial(losses.ppo_policy_loss, aggregation=aggregation)
    _assert_micro_batch_invariant(fn, [X["logps"], X["old_logps"], X["advantages"], MASK])


def test_ppo_value_loss_is_micro_batch_invariant():
    _assert_micro_batch_invariant(losses.ppo_value_loss, [X["values"], X["old_values"], X["returns"], MASK], split=3)


@pytest.mark.parametrize("loss_type", group_rl.GRPO_LOSS_TYPES)
def test_grpo_policy_loss_is_micro_batch_invariant(loss_type):
    fn = functools.partial(losses.grpo_policy_loss, beta=0.04, loss_type=loss_type, max_completion_length=9)
    _assert_micro_batch_invariant(fn, [X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], MASK])


def test_micro_batch_sums_give_the_same_gradient():
    """Gradient accumulation: Σ_micro ∇(loss_sum_micro) / Σ count == ∇(loss over the whole batch)."""
    with jax.enable_x64(True):
        logps, old, adv = (jnp.asarray(X[k]) for k in ("logps", "old_logps", "advantages"))

        def loss_sum(lp, rows):
            return losses.ppo_policy_loss(lp[rows], old[rows], adv[rows], MASK[rows])[:2]

        whole_count = loss_sum(logps, slice(None))[1]
        whole = jax.grad(lambda lp: loss_sum(lp, slice(None))[0] / whole_count)(logps)
        halves = (slice(0, 3), slice(3, None))
        grads = [np.asarray(jax.grad(lambda lp, r=r: loss_sum(lp, r)[0])(logps)) for r in halves]
        counts = [np.asarray(loss_sum(logps, r)[1]) for r in halves]
        whole = np.asarray(whole)
    np.testing.assert_allclose(sum(grads) / sum(counts), whole, rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# GRPO / RLOO
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [2, 3])
@pytest.mark.parametrize("scale_rewards", group_rl.SCALE_REWARDS)
def test_grpo_advantages_match_reference(scale_rewards, group_size, dtype):
    (rewards,) = _rounded(dtype, X["seq_rewards"])
    out = _call(functools.partial(losses.grpo_advantages, group_size=group_size, scale_rewards=scale_rewards), dtype,
                rewards)
    _close(out, ref.grpo_advantages(rewards, group_size, scale_rewards), dtype)


def test_grpo_advantages_bool_scale_and_single_generation():
    r = X["seq_rewards"]
    for flag, name in ((True, "group"), (False, "none")):
        np.testing.assert_array_equal(_call(functools.partial(losses.grpo_advantages, group_size=3,
                                                              scale_rewards=flag), jnp.float64, r),
                                      _call(functools.partial(losses.grpo_advantages, group_size=3,
                                                              scale_rewards=name), jnp.float64, r))
    assert (_call(functools.partial(losses.grpo_advantages, group_size=1), jnp.float64, r) == 0).all()
    tied = _call(functools.partial(losses.grpo_advantages, group_size=3), jnp.float64, np.full(6, 0.5))
    assert (tied == 0).all()  # a group of equal rewards: 0/(0 + 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 3, 6])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_reference(normalize, group_size, dtype):
    (rewards,) = _rounded(dtype, X["seq_rewards"])
    out = _call(functools.partial(losses.rloo_advantages, group_size=group_size, normalize=normalize), dtype, rewards)
    _close(out, ref.rloo_advantages(rewards, group_size, normalize) if group_size > 1 or not normalize
           else np.zeros(6), dtype)


def test_rloo_is_scaled_group_centering():
    """A_i = G/(G − 1)·(r_i − mean_group): the leave-one-out baseline."""
    r = X["seq_rewards"].reshape(2, 3)
    expected = (3 / 2 * (r - r.mean(1, keepdims=True))).reshape(-1)
    _close(_call(functools.partial(losses.rloo_advantages, group_size=3), jnp.float64, r.reshape(-1)), expected,
           jnp.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", group_rl.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta, clip_eps_high", [(0.0, None), (0.04, 0.28)])
def test_grpo_policy_loss_matches_reference(beta, clip_eps_high, loss_type, dtype):
    logps, old, ref_logps, adv = _rounded(dtype, X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"])
    fn = functools.partial(losses.grpo_policy_loss, beta=beta, clip_eps_high=clip_eps_high, loss_type=loss_type,
                           max_completion_length=10)
    out = _call(fn, dtype, logps, old, ref_logps, adv, MASK)
    expected = ref.grpo_loss(logps, old, ref_logps, adv, MASK, 0.2, clip_eps_high, beta, loss_type, 10)
    _close_loss(out, expected, dtype)
    assert expected[2]["clip_ratio/low_mean"] > 0 and expected[2]["clip_ratio/high_mean"] > 0


def test_grpo_policy_loss_variants():
    """Per-token advantages [B, T]; no reference with β = 0; dr_grpo defaults to the padded width T; an empty row
    counts as a sequence in `grpo` (TRL: mask.sum(-1).clamp(min=1), then the mean over all B)."""
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["advantages"], MASK]
    out = _call(functools.partial(losses.grpo_policy_loss, beta=0.1, loss_type="bnpo"), jnp.float64, *args)
    _close_loss(out, ref.grpo_loss(*args, 0.2, None, 0.1, "bnpo"), jnp.float64)

    with jax.enable_x64(True):
        no_ref = losses.grpo_policy_loss(jnp.asarray(X["logps"]), jnp.asarray(X["old_logps"]), None,
                                         jnp.asarray(X["seq_advantages"]), MASK, loss_type="dr_grpo")
    expected = ref.grpo_loss(X["logps"], X["old_logps"], None, X["seq_advantages"], MASK, 0.2, None, 0.0, "dr_grpo")
    _close_loss(jax.tree.map(np.asarray, no_ref), expected, jnp.float64)
    assert float(no_ref[1]) == ref.B * ref.T and "kl" not in no_ref[2]

    mask = MASK.copy()
    mask[3] = False
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], mask]
    out = _call(functools.partial(losses.grpo_policy_loss, loss_type="grpo"), jnp.float64, *args)
    _close_loss(out, ref.grpo_loss(*args, 0.2, None, 0.0, "grpo"), jnp.float64)
    assert out[1] == ref.B


def test_grpo_on_policy_at_reference():
    """π = π_old = π_ref: ratio 1, KL exactly 0, no clipping, and every loss type is −Σ m·A / its count."""
    adv = X["seq_advantages"]
    for loss_type in group_rl.GRPO_LOSS_TYPES:
        loss_sum, _, metrics = _call(functools.partial(losses.grpo_policy_loss, beta=0.5, loss_type=loss_type),
                                     jnp.float64, X["logps"], X["logps"], X["logps"], adv, MASK)
        assert metrics["kl"] == 0 and metrics["clip_ratio/region_mean"] == 0
        if loss_type == "grpo":
            _close(loss_sum, -adv.sum(), jnp.float64)
        else:
            _close(loss_sum, -(adv * MASK.sum(1)).sum(), jnp.float64)


# ------------------------------------------------------------------------------------------------------------------
# jit and errors
# ------------------------------------------------------------------------------------------------------------------


def test_jit_matches_eager():
    calls = [
        (functools.partial(losses.kl_penalty, kind="k3"), (X["logps"], X["ref_logps"])),
        (losses.masked_whiten, (X["advantages"], MASK)),
        (losses.masked_var, (X["values"], MASK)),
        (losses.gae_advantages, (X["rewards"], X["values"], MASK)),
        (losses.ppo_rewards, (X["scores"], X["logps"], X["ref_logps"], MASK)),
        (functools.partial(losses.ppo_policy_loss, aggregation="sequence"),
         (X["logps"], X["old_logps"], X["advantages"], MASK)),
        (losses.ppo_value_loss, (X["values"], X["old_values"], X["returns"], MASK)),
        (functools.partial(losses.grpo_advantages, group_size=3, scale_rewards="batch"), (X["seq_rewards"],)),
        (functools.partial(losses.rloo_advantages, group_size=2, normalize=True), (X["seq_rewards"],)),
        (functools.partial(losses.grpo_policy_loss, beta=0.04, loss_type="grpo"),
         (X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], MASK)),
    ]
    for fn, args in calls:
        args = [jnp.asarray(a) if a.dtype == bool else jnp.asarray(a, jnp.float32) for a in args]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jax.jit(fn)(*args),
                     fn(*args))


# Non-default values of every hyper-parameter that may be traced, and the defaults (clip_eps_high's default, None,
# means clip_eps: here TRACED's 0.1)
TRACED = {"clip_eps": 0.1, "clip_eps_high": 0.3, "beta": 0.3, "gamma": 0.7, "lam": 0.4, "kl_coef": 0.2,
          "clip_range": 0.05}
DEFAULTS = {"clip_eps": 0.2, "clip_eps_high": 0.1, "beta": 0.0, "gamma": 1.0, "lam": 0.95, "kl_coef": 0.05,
            "clip_range": 0.2}


def _hyper_outputs(clip_eps, clip_eps_high, beta, gamma, lam, kl_coef, clip_range):
    """Every output of the five losses that take these hyper-parameters, on the shared inputs in float32."""
    x = {k: jnp.asarray(v, jnp.float32) for k, v in X.items()}
    return {
        "ppo_policy_loss": losses.ppo_policy_loss(x["logps"], x["old_logps"], x["advantages"], MASK,
                                                  clip_eps=clip_eps),
        "ppo_value_loss": losses.ppo_value_loss(x["values"], x["old_values"], x["returns"], MASK,
                                                clip_range=clip_range),
        "grpo_policy_loss": losses.grpo_policy_loss(x["logps"], x["old_logps"], x["ref_logps"], x["seq_advantages"],
                                                    MASK, clip_eps=clip_eps, clip_eps_high=clip_eps_high, beta=beta,
                                                    loss_type="grpo"),
        "gae_advantages": losses.gae_advantages(x["rewards"], x["values"], MASK, gamma=gamma, lam=lam),
        "ppo_rewards": losses.ppo_rewards(x["scores"], x["logps"], x["ref_logps"], MASK, kl_coef=kl_coef),
    }


def _max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_traced_hyper_parameters():
    """clip ranges, β, γ, λ and the KL coefficient may be traced (e.g. scheduled), and the traced value is the one
    used: every output (loss sums, counts, metrics, both GAE outputs) under jit with non-default traced values
    equals the eager call with the same values — and each value, put back to its default alone, changes some
    output, so a traced value that were ignored (or replaced by its default) would show."""
    jitted = jax.jit(lambda values: _hyper_outputs(**values))
    traced = jitted({k: jnp.float32(v) for k, v in TRACED.items()})
    eager = _hyper_outputs(**TRACED)
    assert jax.tree.structure(traced) == jax.tree.structure(eager)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), traced, eager)
    for name, default in DEFAULTS.items():
        reset = jitted({k: jnp.float32(v) for k, v in {**TRACED, name: default}.items()})
        assert _max_difference(reset, eager) > 1e-3, name


@pytest.mark.parametrize("call, match", [
    (lambda: losses.ppo_policy_loss(*[jnp.zeros((2, 3))] * 3, MASK[:2, :3], aggregation="batch"), "token, sequence"),
    (lambda: losses.ppo_policy_loss(*[jnp.zeros((2, 3))] * 3, MASK[:2, :3], clip_eps=0.0), "clip_eps must be > 0"),
    (lambda: losses.ppo_value_loss(*[jnp.zeros((2, 3))] * 3, MASK[:2, :3], clip_range=-1), "clip_range"),
    (lambda: losses.grpo_advantages(jnp.zeros(6), 3, scale_rewards="max"), "group, batch, none"),
    (lambda: losses.grpo_advantages(jnp.zeros(6), 4), "not a whole number of groups of 4"),
    (lambda: losses.rloo_advantages(jnp.zeros(6), 0), "group_size must be a positive int"),
    (lambda: losses.rloo_advantages(jnp.zeros((2, 3)), 3), r"rewards must be \[B\]"),
    (lambda: losses.grpo_policy_loss(*[jnp.zeros((2, 3))] * 4, MASK[:2, :3], loss_type="cispo"),
     "grpo, bnpo, dr_grpo, dapo"),
    (lambda: losses.grpo_policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(2), MASK[:2, :3],
                                     beta=0.1), "needs ref_logps when beta != 0"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, rl.RLLossError)

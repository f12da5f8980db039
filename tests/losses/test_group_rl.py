"""The GRPO family (`flaxalign.losses.group_rl`) against the independent loops of `group_rl_reference.py` in float64
and float32: GSPO, CISPO, the two-sided δ clip and the sampler-mismatch weights inside the policy loss (values, metrics
and gradients), REINFORCE++ and REINFORCE++-baseline advantages, the sampler correction, DAPO's overlong penalty and
dynamic-sampling filter; micro-batch invariance, padding that never leaks, the registries and the errors. Each test
also checks that its inputs exercise what it tests (clip flags set, the new form differing from plain GRPO), so that
an implementation which ignored the option would fail."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from flaxalign.losses import group_rl, rl
from tests.losses import group_rl_reference as gref
from tests.losses import rl_reference as ref
from tests.losses.test_rl import DTYPES, _assert_micro_batch_invariant, _call, _close, _close_loss, _rounded

X = {**ref.INPUTS, **gref.EXTRA}
MASK = ref.MASK

# ------------------------------------------------------------------------------------------------------------------
# The policy loss: importance level × form × sampler weights. Sequence log-weights of the shared inputs are
# exp(mean_t(logπ − logπ_old)) = [1.026, 0.741, 1.061, 0.763, 1.141, 0.904]; token weights lie in [0.64, 1.82].
# ------------------------------------------------------------------------------------------------------------------

CASES = {
    # GSPO as TRL spells it; ε small enough that whole sequences clip: row 5 (s 0.904, A < 0) low, row 0 (s 1.026,
    # A > 0) high
    "gspo": dict(adv="seq_advantages", importance_sampling_level="sequence", clip_eps=0.05, clip_eps_high=0.02,
                 loss_type="grpo", beta=0.04),
    "gspo_token_advantages": dict(adv="advantages", importance_sampling_level="sequence", clip_eps=0.05,
                                  clip_eps_high=0.02, loss_type="dapo"),
    # CISPO (TRL: loss_type="cispo" = our dapo aggregation); w_max 1.2 caps row 0's tokens of weight 1.29 and 1.30
    "cispo": dict(adv="seq_advantages", policy_loss="cispo", cispo_max_weight=1.2, beta=0.04),
    "cispo_sequence": dict(adv="seq_advantages", policy_loss="cispo", importance_sampling_level="sequence",
                           cispo_max_weight=1.02, loss_type="grpo"),
    # δ = 1.3 > 1 + ε_high binds on three tokens with w > 1.3 and A < 0 (rows 2 and 4)
    "delta": dict(adv="seq_advantages", delta=1.3, clip_eps_high=0.28, loss_type="bnpo", beta=0.04),
    "delta_below_clip": dict(adv="advantages", delta=1.1, loss_type="dr_grpo", max_completion_length=10),
    "is_token": dict(adv="seq_advantages", is_weights="is_weights", loss_type="dr_grpo", beta=0.04),
    "is_sequence_cispo": dict(adv="advantages", is_weights="is_seq_weights", policy_loss="cispo",
                              cispo_max_weight=1.2, loss_type="grpo"),
    "everything": dict(adv="advantages", importance_sampling_level="sequence", clip_eps_high=0.02, delta=1.1,
                       is_weights="is_weights", beta=0.04),
}
PLAIN_KEYS = ("clip_eps", "clip_eps_high", "beta", "loss_type", "max_completion_length")
PLAIN = dict(policy_loss="clip", importance_sampling_level="token", delta=None)  # every new option off


def _case(name):
    """(grpo_policy_loss keyword arguments, advantage input name, is_weights input name or None)."""
    kw = dict(CASES[name])
    return kw, kw.pop("adv"), kw.pop("is_weights", None)


def _ours(kw, with_weights):
    """grpo_policy_loss with every array positional: (logps, old, ref, advantages, mask[, is_weights])."""
    if with_weights:
        return lambda lp, old, r, a, m, c: losses.grpo_policy_loss(lp, old, r, a, m, is_weights=c, **kw)
    return lambda lp, old, r, a, m: losses.grpo_policy_loss(lp, old, r, a, m, **kw)


def _arrays(name, dtype=jnp.float64):
    """(logps, old, ref, advantages, weights or None) as `dtype` rounds them, in float64."""
    _, adv, weights = _case(name)
    arrays = _rounded(dtype, *[X[k] for k in ("logps", "old_logps", "ref_logps", adv)])
    return (*arrays, None if weights is None else _rounded(dtype, X[weights])[0])


def _loss(name, dtype, lp, old, r, a, c):
    kw, _, _ = _case(name)
    return _call(_ours(kw, c is not None), dtype, lp, old, r, a, MASK, *([] if c is None else [c]))


def _grad(kw, dtype, lp, old, r, a, c, **overrides):
    """∂(loss_sum / count)/∂logps of grpo_policy_loss(**kw, **overrides), in `dtype`."""
    kw = {**kw, **overrides}
    with jax.enable_x64(dtype == jnp.float64):
        fixed = [None if x is None else jnp.asarray(x, dtype) for x in (old, r, a, c)]

        def loss(logps):
            loss_sum, count, _ = losses.grpo_policy_loss(logps, fixed[0], fixed[1], fixed[2], MASK,
                                                         is_weights=fixed[3], **kw)
            return loss_sum / count

        grad = jax.grad(loss)(jnp.asarray(lp, dtype))
        assert grad.dtype == dtype
        return np.asarray(grad, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_policy_loss_matches_reference(name, dtype):
    lp, old, r, a, c = _arrays(name, dtype)
    kw, _, _ = _case(name)
    expected = gref.policy_loss(lp, old, r, a, MASK, is_weights=c, **kw)
    _close_loss(_loss(name, dtype, lp, old, r, a, c), expected, dtype)
    flags = [k for k in expected[2] if "clip" in k]
    assert flags and all(expected[2][k] > 0 for k in flags), expected[2]  # every clip branch is exercised


@pytest.mark.parametrize("name", CASES)
def test_each_form_differs_from_plain_grpo(name):
    """The options change the loss and its gradient: a form that ignored them would match plain GRPO."""
    kw, _, _ = _case(name)
    lp, old, r, a, c = _arrays(name)
    plain_kw = {k: v for k, v in kw.items() if k in PLAIN_KEYS}
    plain = _call(_ours(plain_kw, False), jnp.float64, lp, old, r, a, MASK)
    ours = _loss(name, jnp.float64, lp, old, r, a, c)
    assert abs(ours[0] - plain[0]) > 1e-3 * abs(plain[0])
    difference = np.abs(_grad(kw, jnp.float64, lp, old, r, a, c) - _grad(plain_kw, jnp.float64, lp, old, r, a, None))
    assert difference.max() > 1e-4


def test_reference_reduces_to_plain_grpo():
    """The new reference with every option off is rl_reference's GRPO loss (a check of the reference itself)."""
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], MASK]
    for loss_type in group_rl.GRPO_LOSS_TYPES:
        ours = gref.policy_loss(*args, clip_eps_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=9)
        plain = ref.grpo_loss(*args, 0.2, 0.28, 0.04, loss_type, 9)
        assert ours == plain


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_policy_loss_gradient_matches_reference(name, dtype):
    lp, old, r, a, c = _arrays(name, dtype)
    kw, _, _ = _case(name)
    expected = gref.policy_loss_grad(lp, old, r, a, MASK, is_weights=c, **kw)
    grad = _grad(kw, dtype, lp, old, r, a, c)
    np.testing.assert_allclose(grad, expected, rtol={jnp.float64: 1e-9, jnp.float32: 2e-5}[dtype],
                               atol={jnp.float64: 1e-13, jnp.float32: 1e-7}[dtype])
    assert (grad[~MASK] == 0).all() and (grad[MASK] != 0).any()


@pytest.mark.parametrize("level, cap", [("token", 1.2), ("sequence", 1.02)])
def test_cispo_gradient_is_clipped_weight_times_advantage(level, cap):
    """CISPO: ∂L/∂logπ_t = −sg(min(w, w_max))·A·m/Σm on every real token, 0 on padding — no token's gradient is
    dropped (the weight is a constant even where it is capped), while the clip form's gradient is 0 on its clipped
    tokens."""
    logps, old, adv = X["logps"], X["old_logps"], X["seq_advantages"]
    d = np.where(MASK, logps - old, 0)
    w = np.exp(d if level == "token" else (d.sum(1) / MASK.sum(1))[:, None])
    expected = np.where(MASK, -np.minimum(w, cap) * adv[:, None] / MASK.sum(), 0)
    kw = dict(policy_loss="cispo", importance_sampling_level=level, cispo_max_weight=cap, loss_type="dapo")
    grad = _grad(kw, jnp.float64, logps, old, X["ref_logps"], adv, None)
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert (grad[MASK] != 0).all()
    assert (np.broadcast_to(w, MASK.shape)[MASK] > cap).any()  # the cap binds somewhere
    clip_grad = _grad({**kw, **PLAIN, "importance_sampling_level": level}, jnp.float64, logps, old, X["ref_logps"],
                      adv, None, clip_eps=0.05, clip_eps_high=0.02)
    assert (clip_grad[MASK] == 0).any()


def test_gspo_gradient_is_one_value_per_sequence():
    """GSPO with sequence advantages and β = 0 (loss_type grpo): ℓ_b = −min(s_b·A_b, clip(s_b)·A_b) on every token
    of row b, so ∂L/∂logπ_bt = −A_b·s_b/(B·|y_b|) for the rows whose unclipped term is the smaller and 0 for the
    clipped rows (row 0 high, row 5 low) — the whole sequence clips together."""
    logps, old, adv = X["logps"], X["old_logps"], X["seq_advantages"]
    n = MASK.sum(1)
    s = np.exp(np.where(MASK, logps - old, 0).sum(1) / n)
    clipped = ((s < 0.95) & (adv < 0)) | ((s > 1.02) & (adv > 0))
    np.testing.assert_array_equal(clipped, [True, False, False, False, False, True])
    expected = np.where(MASK & ~clipped[:, None], (-adv * s / (ref.B * n))[:, None], 0)
    kw = _case("gspo")[0]
    grad = _grad(kw, jnp.float64, logps, old, X["ref_logps"], adv, None, beta=0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    token_level = _grad(kw, jnp.float64, logps, old, X["ref_logps"], adv, None, beta=0.0,
                        importance_sampling_level="token")
    assert np.abs(token_level - grad).max() > 1e-3


def test_two_sided_delta_bounds_the_negative_advantage_ratio():
    """δ: a token with w > δ and A < 0 costs −δ·A (not −w·A) and gets no gradient; others are unchanged."""
    logps, old, adv = X["logps"], X["old_logps"], X["seq_advantages"]
    w = np.exp(np.where(MASK, logps - old, 0))
    bound = MASK & (w > 1.3) & (adv[:, None] < 0)
    assert bound.sum() == 3
    kw = _case("delta")[0]
    with_delta = _grad(kw, jnp.float64, logps, old, X["ref_logps"], adv, None, beta=0.0)
    without = _grad(kw, jnp.float64, logps, old, X["ref_logps"], adv, None, beta=0.0, delta=None)
    assert (with_delta[bound] == 0).all() and (without[bound] != 0).all()
    np.testing.assert_array_equal(with_delta[~bound], without[~bound])


def test_is_weights_scale_the_policy_term_not_the_kl():
    """c·ℓ_policy + β·k3: with c = 2 everywhere the policy part doubles and the KL part does not."""
    lp, old, r, a = (X[k] for k in ("logps", "old_logps", "ref_logps", "seq_advantages"))

    def loss(c, beta):
        kw = dict(beta=beta, loss_type="bnpo")
        fn = _ours(kw, c is not None)
        return _call(fn, jnp.float64, lp, old, r, a, MASK, *([] if c is None else [c]))[0]

    twos = np.full((ref.B, ref.T), 2.0)
    policy, total = loss(None, 0.0), loss(None, 0.5)
    _close(loss(twos, 0.5), 2 * policy + (total - policy), jnp.float64)
    _close(loss(twos[:, :1], 0.0), 2 * policy, jnp.float64)  # [B, 1] weights broadcast over the tokens


@pytest.mark.parametrize("name", CASES)
def test_new_forms_are_micro_batch_invariant(name):
    """(loss_sum, count) summed over row slices == the whole batch's, for every aggregation used here (sequence
    weights are per row, so GSPO splits like GRPO); metrics combine token-weighted."""
    kw, adv, weights = _case(name)
    arrays = [X["logps"], X["old_logps"], X["ref_logps"], X[adv], MASK] + ([X[weights]] if weights else [])
    _assert_micro_batch_invariant(_ours(kw, weights is not None), arrays, split=2)
    _assert_micro_batch_invariant(_ours(kw, weights is not None), arrays, split=5)


# ------------------------------------------------------------------------------------------------------------------
# Padding
# ------------------------------------------------------------------------------------------------------------------

_PADDED = ("logps", "old_logps", "ref_logps", "advantages", "sampler_logps", "is_weights", "kl")


@jax.jit
def _everything(x):
    """Every new loss form (value, metrics, gradient), sampler correction and REINFORCE++ advantage on one batch."""
    out = {}
    for name in CASES:
        kw, adv, weights = _case(name)

        def loss(lp, kw=kw, adv=adv, weights=weights):
            loss_sum, count, metrics = losses.grpo_policy_loss(lp, x["old_logps"], x["ref_logps"], x[adv], MASK,
                                                               is_weights=None if weights is None else x[weights],
                                                               **kw)
            return loss_sum / count, (loss_sum, count, metrics)

        out[name] = jax.grad(loss, has_aux=True)(x["logps"])
    for mode in group_rl.SAMPLER_CORRECTIONS:
        out[mode] = losses.sampler_correction(x["old_logps"], x["sampler_logps"], MASK, mode=mode, clip_max=1.5)
    out["reinforce_pp"] = losses.reinforce_pp_advantages(x["seq_rewards"], x["kl"], MASK, beta=0.05)
    out["reinforce_pp_baseline"] = losses.reinforce_pp_baseline_advantages(x["seq_rewards"], MASK, 3)
    return out


@pytest.mark.parametrize("fill", [np.nan, np.inf, -1e4])
def test_padding_never_enters_the_new_forms(fill):
    """Whatever sits on masked positions of log-probs, advantages, sampler log-probs, sampler weights or KL changes
    no value, metric, gradient or weight."""
    clean = {**X, "kl": np.where(MASK, X["kl"], 0.0)}
    junk = {**clean, **{k: np.where(MASK, clean[k], fill) for k in _PADDED}}
    with jax.enable_x64(True):
        expected, actual = (jax.tree.map(np.asarray, _everything(jax.tree.map(jnp.asarray, x)))
                            for x in (clean, junk))
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(expected))


# ------------------------------------------------------------------------------------------------------------------
# Sampler/learner mismatch
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_min", [0.0, 0.8])
@pytest.mark.parametrize("mode", group_rl.SAMPLER_CORRECTIONS.names)
def test_sampler_correction_matches_reference(mode, clip_min, dtype, clip_max=1.5):
    old, sampler = _rounded(dtype, X["old_logps"], X["sampler_logps"])
    weights, metrics = _call(functools.partial(losses.sampler_correction, mode=mode, clip_min=clip_min,
                                               clip_max=clip_max), dtype, old, sampler, MASK)
    ref_weights, ref_metrics = gref.sampler_correction(old, sampler, MASK, mode, clip_min, clip_max)
    assert set(metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        _close(metrics[k], v, dtype)
    if mode == "none":
        assert weights is None
        return
    _close(weights, ref_weights, dtype)
    raw, _ = gref.sampler_correction(old, sampler, MASK, mode.split("_")[0] + "_truncate", 0.0, np.inf)
    real = MASK if mode.startswith("token") else np.ones((ref.B, 1), bool)
    changed = real & (ref_weights != raw)
    assert changed.any() and (raw[real] != 1).all()  # the bounds bind somewhere; the weights are not trivial
    if mode.endswith("mask"):
        assert (ref_weights[changed] == 0).all()
    else:
        assert set(ref_weights[changed]) <= {clip_min, clip_max}


def test_sampler_correction_weights_are_constants_and_split_by_rows():
    """No gradient flows into the weights; each row's weights depend on that row alone."""
    with jax.enable_x64(True):
        old, sampler = jnp.asarray(X["old_logps"]), jnp.asarray(X["sampler_logps"])
        for mode in ("token_truncate", "sequence_mask"):
            grads = jax.grad(lambda o, s, mode=mode: jnp.sum(losses.sampler_correction(o, s, MASK, mode=mode)[0]),
                             argnums=(0, 1))(old, sampler)
            assert all((np.asarray(g) == 0).all() for g in grads)
            whole = np.asarray(losses.sampler_correction(old, sampler, MASK, mode=mode)[0])
            parts = [np.asarray(losses.sampler_correction(old[rows], sampler[rows], MASK[rows], mode=mode)[0])
                     for rows in (slice(0, 2), slice(2, None))]
            np.testing.assert_array_equal(np.concatenate(parts), whole)


# ------------------------------------------------------------------------------------------------------------------
# REINFORCE++
# ------------------------------------------------------------------------------------------------------------------

_EMPTY_ROW_MASK = MASK.copy()
_EMPTY_ROW_MASK[3] = False
MASKS = {"prefix": MASK, "irregular": ref.IRREGULAR_MASK, "empty_row": _EMPTY_ROW_MASK}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_reinforce_pp_advantages_match_reference(beta, mask_name, dtype):
    mask = MASKS[mask_name]
    rewards, kl = _rounded(dtype, X["seq_rewards"], np.where(mask, X["kl"], 700.0))
    out = _call(functools.partial(losses.reinforce_pp_advantages, beta=beta), dtype, rewards, kl, mask)
    expected = gref.reinforce_pp_advantages(rewards, kl, mask, beta)
    _close(out, expected, dtype)
    assert (out[~mask] == 0).all()
    np.testing.assert_allclose(expected[mask].mean(), 0, atol=1e-12)  # whitened over the batch's real tokens
    np.testing.assert_allclose(expected[mask].var(ddof=1), 1, rtol=1e-6)
    if beta:  # the KL in the reward matters: tokens of a row no longer share one advantage
        plain = gref.reinforce_pp_advantages(rewards, kl, mask, 0.0)
        assert np.abs(plain - expected).max() > 1e-3
        assert any(len(set(expected[b][mask[b]])) > 1 for b in range(ref.B))


def test_reinforce_pp_reward_sits_on_the_last_real_token():
    """β = 0: the return-to-go is R_b on each real token of row b (also with holes and left padding), so the
    advantage is R_b whitened over all real tokens — the outcome reward is counted exactly once per row."""
    for mask in MASKS.values():
        out = _call(functools.partial(losses.reinforce_pp_advantages, beta=0.0), jnp.float64, X["seq_rewards"],
                    X["kl"], mask)
        expected = np.where(mask, X["seq_rewards"][:, None], 0)
        _close(out, ref.masked_whiten(expected, mask), jnp.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("group_size", [2, 3])
def test_reinforce_pp_baseline_advantages_match_reference(group_size, mask_name, dtype):
    mask = MASKS[mask_name]
    (rewards,) = _rounded(dtype, X["seq_rewards"])
    out = _call(functools.partial(losses.reinforce_pp_baseline_advantages, group_size=group_size), dtype, rewards,
                mask)
    expected = gref.reinforce_pp_baseline_advantages(rewards, mask, group_size)
    _close(out, expected, dtype)
    assert (out[~mask] == 0).all()
    grpo = ref.grpo_advantages(rewards, group_size, "group")  # group-normalised instead of batch-whitened
    assert np.abs(np.where(mask, grpo[:, None], 0) - expected).max() > 1e-2


# ------------------------------------------------------------------------------------------------------------------
# Advantage estimators
# ------------------------------------------------------------------------------------------------------------------


def test_advantage_estimators_dispatch():
    """Each registered estimator computes its method (checked against the references) and says where β·KL goes."""
    beta, mask = 0.05, MASK
    kl = np.where(mask, X["kl"], 0.0)
    rewards = X["seq_rewards"]
    expected = {
        "grpo": (ref.grpo_advantages(rewards, 3, "batch"), False),
        "rloo": (ref.rloo_advantages(rewards - beta * kl.sum(1), 3, True), True),
        "reinforce_pp": (gref.reinforce_pp_advantages(rewards, kl, mask, beta), True),
        "reinforce_pp_baseline": (gref.reinforce_pp_baseline_advantages(rewards, mask, 3), False),
    }
    assert group_rl.ADVANTAGE_ESTIMATORS.names == tuple(expected)
    with jax.enable_x64(True):
        episodes = group_rl.Episodes(jnp.asarray(rewards), jnp.asarray(kl), jnp.asarray(mask), 3)
        for name, (advantages, kl_in_reward) in expected.items():
            estimator = group_rl.ADVANTAGE_ESTIMATORS[name]
            hyper = group_rl.estimator_hyper(name, beta, scale_rewards="batch", rloo_normalize=True)
            _close(np.asarray(estimator.advantages(episodes, hyper)), advantages, jnp.float64)
            assert estimator.kl_in_reward is kl_in_reward, name


def test_estimator_hyper_parameters_belong_to_their_estimator():
    """Each estimator gets β and its own fields (defaults filled in); another estimator's field is validated and
    ignored, an unknown one or an invalid value is refused with the valid ones."""
    assert group_rl.estimator_hyper_defaults() == {"scale_rewards": "group", "rloo_normalize": False}
    assert vars(group_rl.estimator_hyper("grpo", 0.1)) == {"beta": 0.1, "scale_rewards": "group"}
    assert vars(group_rl.estimator_hyper("rloo", 0.1, scale_rewards="batch", rloo_normalize=True)) == {
        "beta": 0.1, "rloo_normalize": True}
    assert vars(group_rl.estimator_hyper("reinforce_pp", 0.2, scale_rewards="none")) == {"beta": 0.2}
    for algorithm in ("grpo", "rloo"):  # a value is checked by its own estimator whichever one runs
        with pytest.raises(group_rl.RLLossError, match="scale_rewards.*group, batch, none"):
            group_rl.estimator_hyper(algorithm, 0.0, scale_rewards="max")
    with pytest.raises(group_rl.RLLossError, match="known: scale_rewards, rloo_normalize"):
        group_rl.estimator_hyper("grpo", 0.0, normalise=True)
    with pytest.raises(group_rl.RLLossError, match="grpo, rloo, reinforce_pp"):
        group_rl.estimator_hyper("ppo", 0.0)


# ------------------------------------------------------------------------------------------------------------------
# DAPO: overlong penalty, informative groups
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_penalty_matches_reference(factor):
    lengths = np.arange(0, 25)
    out = np.asarray(losses.overlong_penalty(jnp.asarray(lengths), max_length=20, buffer=5, factor=factor))
    np.testing.assert_allclose(out, gref.overlong_penalty(lengths, 20, 5, factor), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[[15, 16, 18, 20, 21]], factor * np.array([0, -0.2, -0.6, -1, -1]), rtol=1e-6)
    assert (out[:16] == 0).all()
    jitted = jax.jit(functools.partial(losses.overlong_penalty, max_length=20, buffer=5, factor=factor))
    np.testing.assert_allclose(jitted(jnp.asarray(lengths)), out, rtol=1e-6)


def test_informative_groups():
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    for group_size, expected in ((3, [False, True]), (2, [False, True, True]), (1, [False] * 6), (6, [True])):
        out = np.asarray(losses.informative_groups(jnp.asarray(rewards), group_size))
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out, gref.informative_groups(rewards, group_size))
    assert np.asarray(losses.informative_groups(jnp.asarray(X["seq_rewards"]), 2)).all()
    assert not np.asarray(losses.informative_groups(jnp.full(6, 0.3), 3)).any()


# ------------------------------------------------------------------------------------------------------------------
# jit, traced hyper-parameters, registries and errors
# ------------------------------------------------------------------------------------------------------------------

TRACED = {"delta": 1.25, "cispo_max_weight": 1.1, "clip_min": 0.8, "clip_max": 1.4, "beta": 0.3, "factor": 0.7}
DEFAULTS = {"delta": 4.0, "cispo_max_weight": 5.0, "clip_min": 0.0, "clip_max": 3.0, "beta": 0.0, "factor": 1.0}


def _hyper_outputs(delta, cispo_max_weight, clip_min, clip_max, beta, factor):
    x = {k: jnp.asarray(v, jnp.float32) for k, v in X.items()}
    args = (x["logps"], x["old_logps"], x["ref_logps"], x["advantages"], MASK)
    return {
        "delta": losses.grpo_policy_loss(*args, delta=delta),
        "cispo": losses.grpo_policy_loss(*args, policy_loss="cispo", cispo_max_weight=cispo_max_weight),
        "sampler": [losses.sampler_correction(x["old_logps"], x["sampler_logps"], MASK, mode=mode,
                                              clip_min=clip_min, clip_max=clip_max)
                    for mode in ("token_truncate", "sequence_mask")],
        "reinforce_pp": losses.reinforce_pp_advantages(x["seq_rewards"], x["kl"], MASK, beta=beta),
        "overlong": losses.overlong_penalty(jnp.arange(25), max_length=20, buffer=5, factor=factor),
    }


def test_traced_hyper_parameters():
    """δ, w_max, the sampler bounds, REINFORCE++'s β and the overlong factor may be traced, and the traced value is
    the one used: the jitted outputs equal the eager ones, and putting any one back to its default changes some."""
    jitted = jax.jit(lambda values: _hyper_outputs(**values))
    traced = jitted({k: jnp.float32(v) for k, v in TRACED.items()})
    eager = _hyper_outputs(**TRACED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), traced, eager)
    for name, default in DEFAULTS.items():
        reset = jitted({k: jnp.float32(v) for k, v in {**TRACED, name: default}.items()})
        difference = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                         for a, b in zip(jax.tree.leaves(reset), jax.tree.leaves(eager)))
        assert difference > 1e-3, name


_Z = jnp.zeros((2, 3))
_M = MASK[:2, :3]
REGISTRIES = [
    ("grpo.algorithm", lambda bad: group_rl.ADVANTAGE_ESTIMATORS[bad], "ppo",
     ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")),
    ("grpo.policy_loss", lambda bad: losses.grpo_policy_loss(_Z, _Z, None, _Z, _M, policy_loss=bad), "gspo",
     ("clip", "cispo")),
    ("grpo.importance_sampling_level", lambda bad: losses.grpo_policy_loss(_Z, _Z, None, _Z, _M,
                                                                          importance_sampling_level=bad), "seq",
     ("token", "sequence")),
    ("grpo.loss_type", lambda bad: losses.grpo_policy_loss(_Z, _Z, None, _Z, _M, loss_type=bad), "cispo",
     ("grpo", "bnpo", "dr_grpo", "dapo")),
    ("grpo.sampler_correction", lambda bad: losses.sampler_correction(_Z, _Z, _M, mode=bad), "token",
     ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")),
]


@pytest.mark.parametrize("what, call, bad, valid", REGISTRIES, ids=[r[0] for r in REGISTRIES])
def test_registry_unknown_name_is_one_line_listing_the_valid_ones(what, call, bad, valid):
    with pytest.raises(rl.RLLossError) as info:
        call(bad)
    assert str(info.value) == f"Unknown {what} {bad!r}; valid ones: {', '.join(valid)}."
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call, match", [
    (lambda: losses.grpo_policy_loss(_Z, _Z, None, _Z, _M, delta=1.0), "delta must be > 1"),
    (lambda: losses.grpo_policy_loss(_Z, _Z, None, _Z, _M, policy_loss="cispo", cispo_max_weight=0.0),
     "cispo_max_weight must be > 0"),
    (lambda: losses.sampler_correction(_Z, _Z, _M, clip_min=-0.1), "sampler_correction_min must be >= 0"),
    (lambda: losses.sampler_correction(_Z, _Z, _M, clip_min=2.0, clip_max=2.0), "must be > sampler_correction_min"),
    (lambda: losses.overlong_penalty(jnp.arange(3), max_length=10, buffer=0), "overlong buffer must be in"),
    (lambda: losses.overlong_penalty(jnp.arange(3), max_length=10, buffer=11), "overlong buffer must be in"),
    (lambda: losses.reinforce_pp_baseline_advantages(jnp.zeros(6), MASK, 4), "not a whole number of groups of 4"),
    (lambda: losses.informative_groups(jnp.zeros(6), 0), "group_size must be a positive int"),
])
def test_bad_arguments(call, match):
    with pytest.raises(rl.RLLossError, match=match):
        call()

"""The preference losses against independent float64 NumPy formulas (`preference_reference.py`) in float64 and
float32, against loss values recorded from TRL 1.16 itself, and their errors, gradients and batch behaviour."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from flaxalign.errors import ConfigError
from flaxalign.losses import preference
from tests.losses import preference_reference as ref

RTOL = {jnp.float64: 1e-9, jnp.float32: 1e-5}
ATOL = {jnp.float64: 1e-12, jnp.float32: 1e-6}
DTYPES = [jnp.float64, jnp.float32]

# Mean losses computed by TRL 1.16's own trainer code on the inputs of `preference_reference.py`, float64 (ORPO:
# float32, which TRL casts to); regenerate with `python -m tests.losses.test_preference_parity`.
RECORDED_TRL = {
    ("dpo", "sigmoid", 0.1, 0.0): 0.67908941313725,
    ("dpo", "robust", 0.1, 0.0): 0.67908941313725,
    ("dpo", "hinge", 0.1, 0.0): 0.9583333333333334,
    ("dpo", "ipo", 0.1, 0.0): 23.30486281137208,
    ("dpo", "sigmoid_norm", 0.1, 0.0): 0.6841835697938686,
    ("dpo", "nca_pair", 0.1, 0.0): 1.379390414206968,
    ("dpo", "bco_pair", 0.1, 0.0): 1.368895785005744,
    ("dpo", "sppo_hard", 0.1, 0.0): 48.583333333333336,
    ("dpo", "aot", 0.1, 0.0): 0.6787028344990255,
    ("dpo", "aot_unpaired", 0.1, 0.0): 0.6727824183067107,
    ("dpo", "apo_zero", 0.1, 0.0): 0.9895939431314541,
    ("dpo", "apo_down", 0.1, 0.0): 0.9937838458437009,
    ("dpo", "discopop", 0.1, 0.0): 0.8198504231459772,
    ("dpo", "exo_pair", 0.1, 0.001): 2.69628965273097,
    ("dpo", "robust", 0.5, 0.2): 0.6776461075848359,
    ("dpo", "aot", 0.5, 0.1): 0.7602746278776986,
    ("dpo", "aot_unpaired", 0.5, 0.1): 0.6214224883198155,
    ("dpo", "hinge", 0.5, 0.0): 0.9375,
    ("dpo", "ipo", 0.5, 0.0): 0.7650581715674436,
    ("dpo", "discopop", 0.5, 0.0): 0.7994304106106385,
    "orpo": 0.7906788475811481,
    "simpo": 0.863452870191885,
    "cpo": 1.2581240750774043,
    "kto": 0.559575807566204,
    "reward": 0.9440528807278197,
}


def _run(fn, dtype, *args, **kwargs):
    """fn on `dtype` arrays (lists → arrays, bool lists kept bool), float64 inside `jax.enable_x64`; NumPy out."""
    def arr(a):
        return jnp.asarray(a) if isinstance(a[0], bool) else jnp.asarray(a, dtype)

    with jax.enable_x64(dtype == jnp.float64):
        args = [arr(a) for a in args]
        kwargs = {k: arr(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        out, metrics = fn(*args, **kwargs)
        assert out.dtype == dtype
        return np.asarray(out), {k: np.asarray(v) for k, v in metrics.items()}


def _dpo(dtype, loss_type, beta=0.1, eps=0.0, inputs=ref.DPO_INPUTS, lengths=ref.DPO_LENGTHS, **kwargs):
    lengths = {k: jnp.asarray(v) for k, v in lengths.items()}
    return _run(losses.dpo_loss, dtype, *inputs.values(), beta=beta, loss_type=loss_type, label_smoothing=eps,
                **lengths, **kwargs)


def _ref_dpo(loss_type, beta=0.1, eps=0.0, inputs=ref.DPO_INPUTS, lengths=ref.DPO_LENGTHS, **kwargs):
    return ref.dpo(*inputs.values(), beta=beta, loss_type=loss_type, eps=eps, len_c=lengths["chosen_lengths"],
                   len_r=lengths["rejected_lengths"], **kwargs)


def _close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype])


# ------------------------------------------------------------------------------------------------------------------
# values


def test_loss_type_list():
    assert losses.DPO_LOSS_TYPES == ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair",
                                     "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                                     "discopop")
    assert {case[0] for case in ref.DPO_CASES} == set(losses.DPO_LOSS_TYPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("loss_type,beta,eps", ref.DPO_CASES + [("sigmoid", 0.1, 0.1), ("sigmoid", 0.5, 0.3),
                                                                ("exo_pair", 0.5, 0.2)])
def test_dpo_matches_reference(loss_type, beta, eps, dtype):
    out, metrics = _dpo(dtype, loss_type, beta, eps)
    _close(out, _ref_dpo(loss_type, beta, eps), dtype)
    hw = np.subtract(ref.DPO_INPUTS["chosen_logps"], ref.DPO_INPUTS["ref_chosen_logps"])
    hl = np.subtract(ref.DPO_INPUTS["rejected_logps"], ref.DPO_INPUTS["ref_rejected_logps"])
    _close(metrics["rewards/chosen"], beta * hw, dtype)
    _close(metrics["rewards/rejected"], beta * hl, dtype)
    _close(metrics["rewards/margins"], beta * (hw - hl), dtype)
    np.testing.assert_array_equal(metrics["rewards/accuracies"], (hw > hl).astype(float))


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_discopop_tau(tau):
    out, _ = _dpo(jnp.float64, "discopop", 0.5, discopop_tau=tau)
    _close(out, _ref_dpo("discopop", 0.5, tau=tau), jnp.float64)


def test_recorded_trl_values():
    for key, expected in RECORDED_TRL.items():
        if key[0] == "dpo":
            _, loss_type, beta, eps = key
            out, _ = _dpo(jnp.float64, loss_type, beta, eps)
        elif key == "orpo":
            out, _ = _run(losses.orpo_loss, jnp.float64, *ref.AVG_INPUTS.values(), beta=0.1, chosen_nll=[0.75] * 6)
        elif key == "simpo":
            out, _ = _run(losses.simpo_loss, jnp.float64, *ref.AVG_INPUTS.values(), beta=2.0, gamma=0.5)
        elif key == "cpo":
            out, _ = _run(losses.cpo_loss, jnp.float64, ref.DPO_INPUTS["chosen_logps"],
                          ref.DPO_INPUTS["rejected_logps"], beta=0.1, cpo_alpha=0.5, chosen_nll=[1.25] * 6)
        elif key == "kto":
            out, _ = _run(losses.kto_loss, jnp.float64, *ref.KTO_INPUTS.values(), beta=0.5, desirable_weight=1.5,
                          undesirable_weight=0.75)
        else:
            rw = ref.REWARD_INPUTS
            out, _ = _run(losses.bradley_terry_loss, jnp.float64, rw["chosen"], rw["rejected"], margin=rw["margin"],
                          center_coef=0.01)
        np.testing.assert_allclose(out.mean(), expected, rtol=1e-6, err_msg=str(key))


def test_aot_sorts_over_the_batch():
    """The margins are ordered differently under the policy and the reference, so `aot` ≠ `sigmoid`; the per-pair
    losses are sorted, so permuting the batch leaves them unchanged (each depends on the whole batch)."""
    sigmoid, _ = _dpo(jnp.float64, "sigmoid")
    for loss_type in ("aot", "aot_unpaired"):
        out, _ = _dpo(jnp.float64, loss_type)
        assert np.abs(out - sigmoid).max() > 1e-3
        perm = [3, 0, 5, 1, 4, 2]
        permuted = {k: [v[j] for j in perm] for k, v in ref.DPO_INPUTS.items()}
        _close(_dpo(jnp.float64, loss_type, inputs=permuted)[0], out, jnp.float64)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_use_each_length(loss_type):
    out, _ = _dpo(jnp.float64, loss_type)
    same = {"chosen_lengths": ref.DPO_LENGTHS["chosen_lengths"], "rejected_lengths": ref.DPO_LENGTHS["chosen_lengths"]}
    assert np.abs(_dpo(jnp.float64, loss_type, lengths=same)[0] - out).min() > 1e-4  # each pair's lengths differ
    zero = {"chosen_lengths": [0] * 6, "rejected_lengths": [1] * 6}  # TRL clamps an empty completion to 1 token
    _close(_dpo(jnp.float64, loss_type, lengths=zero)[0], _dpo(jnp.float64, loss_type, lengths={
        "chosen_lengths": [1] * 6, "rejected_lengths": [1] * 6})[0], jnp.float64)


def test_cdpo_label_smoothing():
    """ε > 0 in `sigmoid` is cDPO: the ε-mixture of the DPO losses with the preference kept and flipped."""
    plain, _ = _dpo(jnp.float64, "sigmoid", 0.5)
    flipped, _ = _dpo(jnp.float64, "sigmoid", 0.5, inputs={
        "chosen_logps": ref.DPO_INPUTS["rejected_logps"], "rejected_logps": ref.DPO_INPUTS["chosen_logps"],
        "ref_chosen_logps": ref.DPO_INPUTS["ref_rejected_logps"],
        "ref_rejected_logps": ref.DPO_INPUTS["ref_chosen_logps"]})
    _close(_dpo(jnp.float64, "sigmoid", 0.5, 0.2)[0], 0.8 * plain + 0.2 * flipped, jnp.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_orpo_matches_reference(dtype):
    c, r = ref.AVG_INPUTS["chosen"], ref.AVG_INPUTS["rejected"]
    out, metrics = _run(losses.orpo_loss, dtype, c, r, beta=0.2)
    expected, log_odds = ref.orpo(c, r, beta=0.2)
    _close(out, expected, dtype)
    _close(metrics["log_odds_chosen"], log_odds, dtype)
    _close(metrics["log_odds_ratio"], ref.logsig(log_odds), dtype)
    _close(metrics["nll_loss"], -np.asarray(c), dtype)
    _close(metrics["rewards/margins"], 0.2 * (np.asarray(c) - np.asarray(r)), dtype)
    out, metrics = _run(losses.orpo_loss, dtype, c, r, beta=0.2, chosen_nll=ref.NLL)
    _close(out, ref.orpo(c, r, beta=0.2, nll=np.asarray(ref.NLL))[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_reference(beta, gamma, eps, dtype):
    c, r = ref.AVG_INPUTS["chosen"], ref.AVG_INPUTS["rejected"]
    out, metrics = _run(losses.simpo_loss, dtype, c, r, beta=beta, gamma=gamma, label_smoothing=eps)
    _close(out, ref.simpo(c, r, beta=beta, gamma=gamma, eps=eps), dtype)
    _close(metrics["rewards/chosen"], beta * np.asarray(c), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("loss_type,eps,alpha", [("sigmoid", 0.0, 1.0), ("sigmoid", 0.1, 0.5), ("hinge", 0.0, 1.0),
                                                 ("ipo", 0.0, 1.0), ("sigmoid", 0.0, 0.0)])
def test_cpo_matches_reference(loss_type, eps, alpha, dtype):
    c, r = ref.DPO_INPUTS["chosen_logps"], ref.DPO_INPUTS["rejected_logps"]
    nll = {"chosen_nll": ref.NLL} if alpha else {}
    out, metrics = _run(losses.cpo_loss, dtype, c, r, beta=0.1, loss_type=loss_type, label_smoothing=eps,
                        cpo_alpha=alpha, **nll)
    _close(out, ref.cpo(c, r, beta=0.1, loss_type=loss_type, eps=eps, alpha=alpha, nll=ref.NLL if alpha else 0.0),
           dtype)
    _close(metrics["nll_loss"], ref.NLL if alpha else np.zeros(6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kl_shift,w_d,w_u", [(0.0, 1.0, 1.0), (0.0, 1.5, 0.75), (-2.0, 1.0, 1.0)])
def test_kto_matches_reference(kl_shift, w_d, w_u, dtype):
    i = dict(ref.KTO_INPUTS)
    i["kl_logps"] = [v + kl_shift for v in i["kl_logps"]]
    out, metrics = _run(losses.kto_loss, dtype, *i.values(), beta=0.5, desirable_weight=w_d, undesirable_weight=w_u)
    expected, z0 = ref.kto(*i.values(), beta=0.5, w_d=w_d, w_u=w_u)
    _close(out, expected, dtype)
    _close(metrics["kl"], np.full(6, z0), dtype)
    assert (z0 == 0.0) == (kl_shift < 0)
    _close(metrics["rewards"], 0.5 * np.subtract(i["logps"], i["ref_logps"]), dtype)
    np.testing.assert_array_equal(metrics["desirable"], np.asarray(i["desirable"], float))


def test_kto_given_kl_and_its_gradient():
    i = ref.KTO_INPUTS
    args = [jnp.asarray(i[k], jnp.float32) for k in ("logps", "ref_logps")] + [jnp.asarray(i["desirable"])]
    kl_args = [jnp.asarray(i[k], jnp.float32) for k in ("kl_logps", "ref_kl_logps")]
    z0 = losses.kto_kl(*kl_args)
    from_kl, _ = losses.kto_loss(*args, kl=z0, beta=0.5)
    _close(np.asarray(from_kl), np.asarray(losses.kto_loss(*args, *kl_args, beta=0.5)[0]), jnp.float32)
    _close(np.asarray(losses.kto_loss(*args, kl=-0.3, beta=0.5)[0]),  # a negative estimate is clamped to 0
           np.asarray(losses.kto_loss(*args, kl=0.0, beta=0.5)[0]), jnp.float32)
    grad_kl = jax.grad(lambda kl_logps: losses.kto_loss(*args, kl_logps, kl_args[1], beta=0.5)[0].mean())(kl_args[0])
    np.testing.assert_array_equal(grad_kl, 0.0)  # z₀ is a stop-gradient reference point


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("use_margin,center", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_bradley_terry_matches_reference(use_margin, center, dtype):
    rw = ref.REWARD_INPUTS
    margin = {"margin": rw["margin"]} if use_margin else {}
    out, metrics = _run(losses.bradley_terry_loss, dtype, rw["chosen"], rw["rejected"], center_coef=center, **margin)
    _close(out, ref.bradley_terry(rw["chosen"], rw["rejected"], margin=margin.get("margin"), center=center), dtype)
    diff = np.subtract(rw["chosen"], rw["rejected"])
    _close(metrics["margin"], diff, dtype)
    np.testing.assert_array_equal(metrics["accuracy"], (diff > 0).astype(float))  # a tie (0.1, 0.1) is not correct


# ------------------------------------------------------------------------------------------------------------------
# numerics, gradients, jit


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_log1mexp_is_stable(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray([-1e-8, -1e-3, -0.5, -np.log(2.0), -1.0, -50.0], dtype)
        out = np.asarray(preference.log1mexp(x))
        grads = np.asarray(jax.vmap(jax.grad(preference.log1mexp))(x))
    expected = ref.log1mexp(np.asarray(x, np.float64))
    np.testing.assert_allclose(out, expected, rtol=RTOL[dtype], atol=0)  # log(1e-8) and −1.9e-22 alike
    # d/dx log(1 − eˣ) = −eˣ/(1 − eˣ) = −1/expm1(−x)
    np.testing.assert_allclose(grads, -1 / np.expm1(-np.asarray(x, np.float64)), rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_gradients_are_finite(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        c, r, rc, rr = (jnp.asarray(v, dtype) for v in ref.DPO_INPUTS.values())
        lengths = {k: jnp.asarray(v) for k, v in ref.DPO_LENGTHS.items()}
        for loss_type, beta, eps in ref.DPO_CASES:
            fn = functools.partial(losses.dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=eps, **lengths)
            grads = jax.grad(lambda c, r, fn=fn: fn(c, r, rc, rr)[0].mean(), argnums=(0, 1))(c, r)
            assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0 for g in grads), loss_type
        near_zero = jnp.asarray([-1e-8, -1e-6, -0.3, -50.0], dtype)  # ORPO where p → 1 and p → 0
        others = jnp.asarray([-1e-7, -2.0, -1e-8, -49.0], dtype)
        for fn in (losses.orpo_loss, losses.simpo_loss, functools.partial(losses.cpo_loss, cpo_alpha=0.0)):
            grads = jax.grad(lambda a, b, fn=fn: fn(a, b)[0].mean(), argnums=(0, 1))(near_zero, others)
            assert all(np.isfinite(np.asarray(g)).all() for g in grads), fn
        i = ref.KTO_INPUTS
        kto = jax.grad(lambda x: losses.kto_loss(x, *(jnp.asarray(i[k]) for k in list(i)[1:]))[0].mean())
        assert np.isfinite(np.asarray(kto(jnp.asarray(i["logps"], dtype)))).all()
        bt = jax.grad(lambda a: losses.bradley_terry_loss(a, a[::-1], center_coef=0.1)[0].mean())
        assert np.isfinite(np.asarray(bt(jnp.asarray(ref.REWARD_INPUTS["chosen"], dtype)))).all()


def test_dpo_gradient_matches_the_dpo_formula():
    """∂L/∂log π(y_w) = −β·σ(−βΔ) for DPO: a check of the direction of the update, not only of the values."""
    with jax.enable_x64(True):
        c, r, rc, rr = (jnp.asarray(v, jnp.float64) for v in ref.DPO_INPUTS.values())
        grad = jax.grad(lambda c: losses.dpo_loss(c, r, rc, rr, beta=0.5)[0].sum())(c)
        delta = (c - rc) - (r - rr)
        np.testing.assert_allclose(np.asarray(grad), -0.5 * np.asarray(jax.nn.sigmoid(-0.5 * delta)), rtol=1e-12)


def test_jit_matches_eager():
    c, r, rc, rr = (jnp.asarray(v, jnp.float32) for v in ref.DPO_INPUTS.values())
    lengths = {k: jnp.asarray(v) for k, v in ref.DPO_LENGTHS.items()}
    for loss_type in ("ipo", "aot", "exo_pair"):
        fn = functools.partial(losses.dpo_loss, beta=0.1, loss_type=loss_type, label_smoothing=1e-3, **lengths)
        np.testing.assert_allclose(jax.jit(fn)(c, r, rc, rr)[0], fn(c, r, rc, rr)[0], rtol=1e-6)
    traced_beta = jax.jit(lambda beta: losses.dpo_loss(c, r, rc, rr, beta=beta)[0])(0.1)  # not validated when traced
    np.testing.assert_allclose(traced_beta, losses.dpo_loss(c, r, rc, rr, beta=0.1)[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# errors


def _dpo_call(**kwargs):
    a = jnp.zeros(2)
    return losses.dpo_loss(a, a, a, a, **kwargs)


def test_unknown_loss_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'simpo'") as info:
        _dpo_call(loss_type="simpo")
    assert all(name in str(info.value) for name in losses.DPO_LOSS_TYPES)
    assert isinstance(info.value, ConfigError)  # `flaxalign.main` prints it and exits 2
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        losses.cpo_loss(jnp.zeros(2), jnp.zeros(2), loss_type="exo_pair", cpo_alpha=0.0)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    a = jnp.zeros(2)
    for call in (lambda: _dpo_call(beta=beta), lambda: losses.orpo_loss(a, a, beta=beta),
                 lambda: losses.simpo_loss(a, a, beta=beta), lambda: losses.cpo_loss(a, a, beta=beta, cpo_alpha=0.0),
                 lambda: losses.kto_loss(a, a, a > 0, a, a, beta=beta)):
        with pytest.raises(ValueError, match="beta must be > 0"):
            call()


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_missing_lengths(loss_type):
    with pytest.raises(ValueError, match=f"'{loss_type}'.*chosen_lengths and rejected_lengths"):
        _dpo_call(loss_type=loss_type)
    with pytest.raises(ValueError, match=loss_type):
        _dpo_call(loss_type=loss_type, chosen_lengths=jnp.ones(2))


def test_label_smoothing_ranges():
    with pytest.raises(ValueError, match="'exo_pair' needs 0 < label_smoothing < 1"):
        _dpo_call(loss_type="exo_pair")  # TRL's default ε = 0 would give log(0)
    with pytest.raises(ValueError, match="'robust' needs label_smoothing < 0.5"):
        _dpo_call(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        _dpo_call(label_smoothing=-0.1)
    with pytest.raises(ValueError, match="discopop_tau must be > 0"):
        _dpo_call(loss_type="discopop", discopop_tau=0.0)


def test_cpo_and_kto_need_their_inputs():
    a = jnp.zeros(2)
    with pytest.raises(ValueError, match="chosen_nll"):
        losses.cpo_loss(a, a)
    with pytest.raises(ValueError, match="kl_logps and ref_kl_logps"):
        losses.kto_loss(a, a, a > 0)

"""GKD's generalized Jensen–Shannon divergence (`flaxalign.losses.distill`) against an independent NumPy float64
implementation written from the equations, in float64 (tight) and float32 (loose); its properties (zero exactly at
equal logits, positive otherwise, symmetric at β = 1/2, the end points are the two KLs); its analytic gradient; the
chunked version against the unchunked one for a student and a teacher of different widths; and the errors.

With p_S = softmax(z_S/τ), p_T = softmax(z_T/τ) and m = β·p_T + (1−β)·p_S, JSD_β = β·KL(p_T‖m) + (1−β)·KL(p_S‖m) for
0 < β < 1. This is not continuous at the end points and is not meant to be: the mixture formula tends to 0 as β → 0
or β → 1 (m → p_S, resp. p_T, and its weight on the other KL vanishes), whereas TRL's `generalized_jsd_loss` — which
flaxalign follows — special-cases β = 0 as the forward KL(p_T‖p_S) and β = 1 as the reverse KL(p_S‖p_T) (the limits
of JSD_β/β and JSD_β/(1−β)). So the end points are tested as those KLs, not as limits of the interior values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign.errors import ConfigError
from flaxalign.losses.distill import DistillLossError, chunked_generalized_jsd, generalized_jsd
from flaxalign.models.lm_head import LMHead

B, T, V = 2, 5, 13
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 0.7]
DTYPES = [jnp.float64, jnp.float32]
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-4}
ATOL = {jnp.float64: 1e-13, jnp.float32: 2e-6}


# --- the reference: plain NumPy float64, probabilities rather than log-space mixtures ---------------------------------

def _softmax64(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl64(p, q):
    """KL(p ‖ q) over the last axis."""
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def ref_jsd(student_logits, teacher_logits, beta, temperature):
    p_s, p_t = _softmax64(student_logits, temperature), _softmax64(teacher_logits, temperature)
    if beta == 0:
        return _kl64(p_t, p_s)
    if beta == 1:
        return _kl64(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)


def ref_jsd_grad_student(student_logits, teacher_logits, beta, temperature):
    """∂JSD_β/∂z_S per position. With g = ∂JSD/∂p_S (up to a constant, which the softmax Jacobian removes):
    g = (1−β)·(log p_S − log m) inside (0, 1), −p_T/p_S at β = 0, log p_S − log p_T at β = 1; and
    ∂/∂z_S = p_S ⊙ (g − ⟨p_S, g⟩) / τ."""
    p_s, p_t = _softmax64(student_logits, temperature), _softmax64(teacher_logits, temperature)
    if beta == 0:
        g = -p_t / p_s
    elif beta == 1:
        g = np.log(p_s) - np.log(p_t)
    else:
        g = (1 - beta) * (np.log(p_s) - np.log(beta * p_t + (1 - beta) * p_s))
    return p_s * (g - np.sum(p_s * g, axis=-1, keepdims=True)) / temperature


def _logits(seed, shape=(B, T, V), scale=2.0):
    return np.random.default_rng(seed).normal(scale=scale, size=shape)


def _ours(dtype, student_logits, teacher_logits, **kwargs):
    with jax.enable_x64(dtype == jnp.float64):
        out = generalized_jsd(jnp.asarray(student_logits, dtype), jnp.asarray(teacher_logits, dtype), **kwargs)
        assert out.dtype == dtype and out.shape == np.shape(student_logits)[:-1]
        return np.asarray(out, np.float64)


def _as(dtype, *arrays):
    """The inputs as the function sees them in `dtype`, as float64 for the reference."""
    return [np.asarray(np.asarray(a, dtype), np.float64) for a in arrays]


# --- values -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_matches_the_numpy_reference(beta, temperature, dtype):
    zs, zt = _as(dtype, _logits(0), _logits(1))
    expected = ref_jsd(zs, zt, beta, temperature)
    assert np.all(expected > 1e-3)  # far from the trivial 0: a wrong formula cannot pass by being ~0
    got = _ours(dtype, zs, zt, beta=beta, temperature=temperature)
    np.testing.assert_allclose(got, expected, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_temperature_and_beta_change_the_value():
    """Guards the parametrised comparison: τ and β are not ignored."""
    zs, zt = _logits(0), _logits(1)
    base = _ours(jnp.float64, zs, zt, beta=0.5, temperature=1.0)
    assert np.all(np.abs(_ours(jnp.float64, zs, zt, beta=0.5, temperature=0.7) - base) > 1e-4)
    assert np.all(np.abs(_ours(jnp.float64, zs, zt, beta=0.1, temperature=1.0) - base) > 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("beta", BETAS)
def test_zero_at_equal_logits_and_positive_otherwise(beta, dtype):
    z = _logits(2)
    same = _ours(dtype, z, z, beta=beta, temperature=0.7)
    np.testing.assert_allclose(same, 0.0, atol={jnp.float64: 1e-15, jnp.float32: 1e-6}[dtype])
    # a shift by a per-position constant leaves the softmax unchanged: still 0
    shifted = _ours(dtype, z, z + 3.0, beta=beta, temperature=0.7)
    np.testing.assert_allclose(shifted, 0.0, atol={jnp.float64: 1e-14, jnp.float32: 2e-6}[dtype])
    # different distributions: positive at every position, well above the rounding level of the zeros above
    other = z.copy()
    other[..., 0] += 1.0  # one logit per position moved
    assert np.all(_ours(dtype, z, other, beta=beta, temperature=0.7) > 1e-5)
    assert np.all(_ours(dtype, z, _logits(3), beta=beta, temperature=0.7) > 1e-3)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_symmetric_at_half_and_not_elsewhere(temperature):
    zs, zt = _logits(3), _logits(4)
    forward = _ours(jnp.float64, zs, zt, beta=0.5, temperature=temperature)
    swapped = _ours(jnp.float64, zt, zs, beta=0.5, temperature=temperature)
    np.testing.assert_allclose(forward, swapped, rtol=1e-12, atol=1e-15)
    for beta in (0.0, 0.1, 0.9, 1.0):  # the symmetry check above is not vacuous
        a = _ours(jnp.float64, zs, zt, beta=beta, temperature=temperature)
        b = _ours(jnp.float64, zt, zs, beta=beta, temperature=temperature)
        assert np.max(np.abs(a - b)) > 1e-3
    # and swapping the roles maps β to 1 − β
    np.testing.assert_allclose(_ours(jnp.float64, zs, zt, beta=0.1, temperature=temperature),
                               _ours(jnp.float64, zt, zs, beta=0.9, temperature=temperature), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_end_points_are_the_forward_and_reverse_kl(temperature):
    """β = 0 is KL(p_T ‖ p_S) and β = 1 is KL(p_S ‖ p_T) (TRL's special cases); the interior formula near the end
    points is much smaller (it tends to 0), so there is deliberately no continuity at β ∈ {0, 1}."""
    zs, zt = _logits(5), _logits(6)
    p_s, p_t = _softmax64(zs, temperature), _softmax64(zt, temperature)
    forward, reverse = _kl64(p_t, p_s), _kl64(p_s, p_t)
    assert np.max(np.abs(forward - reverse)) > 1e-2  # the two end points are distinguishable
    np.testing.assert_allclose(_ours(jnp.float64, zs, zt, beta=0, temperature=temperature), forward, rtol=1e-10)
    np.testing.assert_allclose(_ours(jnp.float64, zs, zt, beta=1, temperature=temperature), reverse, rtol=1e-10)
    near_0 = _ours(jnp.float64, zs, zt, beta=1e-6, temperature=temperature)
    near_1 = _ours(jnp.float64, zs, zt, beta=1 - 1e-6, temperature=temperature)
    assert np.all(near_0 < 1e-3 * forward) and np.all(near_1 < 1e-3 * reverse)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_gradient_matches_the_analytic_gradient(beta, temperature):
    zs, zt = _logits(7), _logits(8)
    weights = np.random.default_rng(9).uniform(0.5, 1.5, size=(B, T))
    with jax.enable_x64(True):
        def loss(s):
            return jnp.sum(weights * generalized_jsd(s, jnp.asarray(zt), beta=beta, temperature=temperature))

        got = np.asarray(jax.grad(loss)(jnp.asarray(zs)))
    expected = weights[..., None] * ref_jsd_grad_student(zs, zt, beta, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-13)


# --- chunked ----------------------------------------------------------------------------------------------------------

CT, DS, DT = 11, 8, 12  # student and teacher of different widths; chunk 4 ∤ 11 (a padded last chunk), 16 > T
SOFTCAP = 5.0


def _chunk_inputs():
    rng = np.random.default_rng(10)
    student_hidden = rng.normal(size=(B, CT, DS)).astype(np.float32)
    teacher_hidden = rng.normal(size=(B, CT, DT)).astype(np.float32)
    student_w = (rng.normal(size=(DS, V)) / np.sqrt(DS) * 2).astype(np.float32)
    teacher_w = (rng.normal(size=(DT, V)) / np.sqrt(DT) * 2).astype(np.float32)
    return student_hidden, student_w, teacher_hidden, teacher_w


def _teacher(teacher_w, capped):
    return LMHead(jnp.asarray(teacher_w), softcap=SOFTCAP) if capped else teacher_w


def _explicit_teacher_logits(teacher_hidden, teacher_w, capped):
    logits = jnp.asarray(teacher_hidden) @ jnp.asarray(teacher_w)
    return SOFTCAP * jnp.tanh(logits / SOFTCAP) if capped else logits


@pytest.mark.parametrize("capped", [False, True], ids=["raw", "softcap-teacher"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_equals_unchunked_from_explicit_logits(beta, chunk, capped):
    hs, ws, ht, wt = _chunk_inputs()
    got = chunked_generalized_jsd(hs, ws, ht, _teacher(wt, capped), beta=beta, temperature=0.7, chunk_size=chunk)
    assert got.shape == (B, CT) and got.dtype == jnp.float32
    zs, zt = jnp.asarray(hs) @ jnp.asarray(ws), _explicit_teacher_logits(ht, wt, capped)
    want = generalized_jsd(zs, zt, beta=beta, temperature=0.7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and against the float64 reference of the same logits (so a shared mistake would not pass)
    teacher64 = np.asarray(ht, np.float64) @ np.asarray(wt, np.float64)
    teacher64 = SOFTCAP * np.tanh(teacher64 / SOFTCAP) if capped else teacher64
    expected = ref_jsd(np.asarray(hs, np.float64) @ np.asarray(ws, np.float64), teacher64, beta, 0.7)
    assert np.all(expected > 1e-3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_gradient_equals_unchunked_gradient(beta, chunk):
    """The rematerialised chunk scan changes memory, not the gradient w.r.t. the student's hidden states and head
    (nor does the padded last chunk leak into it)."""
    hs, ws, ht, wt = _chunk_inputs()
    weights = np.random.default_rng(11).uniform(0.5, 1.5, size=(B, CT)).astype(np.float32)

    def chunked(h, w):
        return jnp.sum(weights * chunked_generalized_jsd(h, w, ht, wt, beta=beta, temperature=0.7, chunk_size=chunk))

    def unchunked(h, w):
        return jnp.sum(weights * generalized_jsd(h @ w, jnp.asarray(ht) @ jnp.asarray(wt), beta=beta,
                                                 temperature=0.7))

    got = jax.grad(chunked, argnums=(0, 1))(hs, ws)
    want = jax.grad(unchunked, argnums=(0, 1))(hs, ws)
    for g, w in zip(got, want):
        assert np.max(np.abs(w)) > 1e-2
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_chunked_teacher_gets_the_gradient_it_is_given():
    """The teacher is not stopped inside the loss (the stage stops it); its gradient is the unchunked one too."""
    hs, ws, ht, wt = _chunk_inputs()

    def chunked(h):
        return jnp.sum(chunked_generalized_jsd(hs, ws, h, wt, beta=0.5, temperature=1.0, chunk_size=4))

    def unchunked(h):
        return jnp.sum(generalized_jsd(jnp.asarray(hs) @ jnp.asarray(ws), h @ wt, beta=0.5, temperature=1.0))

    np.testing.assert_allclose(jax.grad(chunked)(ht), jax.grad(unchunked)(ht), rtol=1e-4, atol=1e-6)


# --- errors -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"beta": -0.1}, "beta must be in \\[0, 1\\], got -0.1"),
    ({"beta": 1.5}, "beta must be in \\[0, 1\\], got 1.5"),
    ({"temperature": 0}, "temperature must be > 0, got 0"),
    ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
])
def test_invalid_hyper_parameters_raise(kwargs, match):
    z = _logits(12).astype(np.float32)
    hs, ws, ht, wt = _chunk_inputs()
    calls = [lambda: generalized_jsd(z, z, **kwargs),
             lambda: chunked_generalized_jsd(hs, ws, ht, wt, chunk_size=4, **kwargs)]
    for call in calls:
        with pytest.raises(DistillLossError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)

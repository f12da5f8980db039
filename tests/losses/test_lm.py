"""The chunked LM-head functions of `flaxalign.losses.lm` against full-vocabulary NumPy float64 log-softmax, for
chunk sizes that divide the sequence, do not divide it (a padded last chunk), exceed it, and are 1; and their
gradients against the gradient of the unchunked formula. The same through a soft-capped, temperature-scaled
`LMHead` (Gemma 2's final soft cap; T divides after the cap), and an uncapped head giving the raw matrix's numbers
bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from flaxalign.models.lm_head import LMHead

B, T, D, V = 2, 11, 8, 13
CHUNKS = [1, 4, 11, 16]  # 4 ∤ 11: the last chunk is padded; 16 > T


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    unembed = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    return hidden, unembed, targets, mask


def _log_softmax64(hidden, unembed):
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _take(logp, targets):
    return np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_logps_cross_entropy_and_sequence_logps_match_numpy(chunk):
    hidden, unembed, targets, mask = _inputs()
    expected = _take(_log_softmax64(hidden, unembed), targets)
    got = losses.chunked_token_logps(hidden, unembed, targets, chunk_size=chunk)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 logits of O(3): measured ≤ 2e-6
    loss_sum, count = losses.token_cross_entropy(hidden, unembed, targets, mask, chunk_size=chunk)
    np.testing.assert_allclose(loss_sum, -(expected * mask).sum(), rtol=1e-5)
    assert float(count) == mask.sum()
    seq_sum, seq_count = losses.sequence_logps(hidden, unembed, targets, mask, chunk_size=chunk)
    np.testing.assert_allclose(seq_sum, (expected * mask).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(seq_count, mask.sum(-1))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_entropy_and_kl_match_numpy(chunk):
    hidden, unembed, _, _ = _inputs()
    ref_hidden, ref_unembed, _, _ = _inputs(seed=1)
    logp, logq = _log_softmax64(hidden, unembed), _log_softmax64(ref_hidden, ref_unembed)
    entropy = -(np.exp(logp) * logp).sum(-1)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    np.testing.assert_allclose(losses.chunked_token_entropy(hidden, unembed, chunk_size=chunk), entropy,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.chunked_token_kl(hidden, unembed, ref_hidden, ref_unembed, chunk_size=chunk),
                               kl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 16])
def test_gradients_equal_the_unchunked_formula(chunk):
    """The rematerialised chunk scan changes memory, not the gradient (w.r.t. the hidden states and the head)."""
    hidden, unembed, targets, mask = _inputs()

    def unchunked(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask)

    def chunked(h, w):
        return losses.token_cross_entropy(h, w, targets, mask, chunk_size=chunk)[0]

    want = jax.grad(unchunked, argnums=(0, 1))(hidden, unembed)
    got = jax.grad(chunked, argnums=(0, 1))(hidden, unembed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    entropy_grad = jax.grad(lambda h: losses.chunked_token_entropy(h, unembed, chunk_size=chunk).sum())(hidden)
    want_entropy_grad = jax.grad(lambda h: -jnp.sum(jax.nn.softmax(h @ unembed) * jax.nn.log_softmax(h @ unembed)))(
        hidden)
    np.testing.assert_allclose(entropy_grad, want_entropy_grad, rtol=1e-5, atol=1e-5)


CAP = 2.0  # small enough to bite: the raw logits of `_inputs` reach ~8


def _capped_log_softmax64(hidden, unembed, cap=CAP, temperature=1.0):
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    logits = cap * np.tanh(logits / cap) / temperature
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [4, 16])
def test_a_soft_capped_head_gives_the_capped_log_probs_cross_entropy_kl_and_entropy(chunk):
    hidden, unembed, targets, mask = _inputs()
    ref_hidden, ref_unembed, _, _ = _inputs(seed=1)
    assert np.abs(hidden @ unembed).max() > 3 * CAP
    head, ref_head = LMHead(jnp.asarray(unembed), softcap=CAP), LMHead(jnp.asarray(ref_unembed), softcap=CAP)
    logp = _capped_log_softmax64(hidden, unembed)
    expected = _take(logp, targets)
    np.testing.assert_allclose(losses.chunked_token_logps(hidden, head, targets, chunk_size=chunk), expected,
                               rtol=1e-5, atol=1e-5)
    loss_sum, count = losses.token_cross_entropy(hidden, head, targets, mask, chunk_size=chunk)
    np.testing.assert_allclose(float(loss_sum), -(expected * mask).sum(), rtol=1e-5)
    seq_sum, _ = losses.sequence_logps(hidden, head, targets, mask, chunk_size=chunk)
    np.testing.assert_allclose(seq_sum, (expected * mask).sum(-1), rtol=1e-5)
    logq = _capped_log_softmax64(ref_hidden, ref_unembed)
    np.testing.assert_allclose(losses.chunked_token_kl(hidden, head, ref_hidden, ref_head, chunk_size=chunk),
                               (np.exp(logp) * (logp - logq)).sum(-1), atol=1e-5)
    np.testing.assert_allclose(losses.chunked_token_entropy(hidden, head, chunk_size=chunk),
                               -(np.exp(logp) * logp).sum(-1), atol=1e-5)
    # the sampler's order: softmax(cap(logits) / T), not softmax(cap(logits / T))
    hot = head.at_temperature(0.7)
    np.testing.assert_allclose(losses.chunked_token_logps(hidden, hot, targets, chunk_size=chunk),
                               _take(_capped_log_softmax64(hidden, unembed, temperature=0.7), targets), atol=1e-5)
    # gradients flow to the matrix through the cap: d/dW of Σ log p equals the unchunked formula's
    def unchunked(w):
        logits = CAP * jnp.tanh(jnp.einsum("btd,dv->btv", hidden, w) / CAP)
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    got = jax.grad(lambda w: losses.chunked_token_logps(hidden, LMHead(w, softcap=CAP), targets,
                                                        chunk_size=chunk).sum())(jnp.asarray(unembed))
    np.testing.assert_allclose(got, jax.grad(unchunked)(jnp.asarray(unembed)), rtol=1e-4, atol=1e-5)


def test_an_uncapped_head_computes_what_the_raw_matrix_did_bit_for_bit():
    """Llama's head (no cap): the losses give the raw matrix's numbers exactly, and at temperature T the matrix
    / T (in its dtype) as the on-policy stages computed before the head object existed."""
    hidden, unembed, targets, _ = _inputs()
    w = jnp.asarray(unembed, jnp.bfloat16)
    h = jnp.asarray(hidden, jnp.bfloat16)
    np.testing.assert_array_equal(losses.chunked_token_logps(h, LMHead(w), targets, chunk_size=4),
                                  losses.chunked_token_logps(h, w, targets, chunk_size=4))
    before = w / jnp.asarray(0.7, w.dtype)
    np.testing.assert_array_equal(losses.chunked_token_logps(h, LMHead(w).at_temperature(0.7), targets, chunk_size=4),
                                  losses.chunked_token_logps(h, before, targets, chunk_size=4))
    np.testing.assert_array_equal(LMHead(w).logits(h), jnp.einsum("btd,dv->btv", h, w,
                                                                  preferred_element_type=jnp.float32))

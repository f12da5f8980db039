"""The chunked LM-head functions of `flaxalign.losses.lm` against full-vocabulary NumPy float64 log-softmax, for
chunk sizes that divide the sequence, do not divide it (a padded last chunk), exceed it, and are 1; and their
gradients against the gradient of the unchunked formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses

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

"""Language-modelling losses, computed in chunks over the sequence so `[B, T, V]` float32 logits never exist.

Logits come from an LM head (`models.lm_head.LMHead`: the `[D, V]` matrix or a tied `[V, D]` embedding, the family's
final soft cap, a sampling temperature; `model.output_head()`), or a raw `[D, V]` matrix taken as an uncapped head.

Every loss returns `(sum, count)` rather than a mean: the caller divides by the global token count once, so that
gradient accumulation and data-parallel sharding give exactly the update of one big batch.
"""

import jax
import jax.numpy as jnp

from flaxalign.models.lm_head import LMHead, as_head


def _over_chunks(per_chunk, chunk_size: int, *arrays_BxTx):
    """`per_chunk(*chunks_BxLx) -> [B, L]` applied to `chunk_size` positions at a time of `[B, T, ...]` arrays, in a
    rematerialised scan: the forward pass holds one chunk's `[B, L, V]` logits and the backward pass recomputes them
    chunk by chunk. The last chunk is zero-padded when `chunk_size` does not divide T; returns `[B, T]`."""
    batch, length = arrays_BxTx[0].shape[:2]
    chunk = min(chunk_size, length)
    pad = -length % chunk
    n_chunks = (length + pad) // chunk

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return x.reshape(batch, n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    per_chunk = jax.checkpoint(per_chunk)
    _, out_CxBxL = jax.lax.scan(lambda _, xs: (None, per_chunk(*xs)), None, tuple(map(split, arrays_BxTx)))
    return out_CxBxL.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :length]


def _logits(hidden_BxLxD, head: LMHead | jax.Array):
    # a 2-D [B·L, D] × head matmul: XLA CPU's gradients of 3-D einsums are markedly slower
    return as_head(head).logits(hidden_BxLxD.reshape(-1, hidden_BxLxD.shape[-1]))


def chunked_token_logps(hidden_BxTxD, head, targets_BxT, *, chunk_size: int = 256):
    """log p(target_t | x_≤t) for every position: logits_t = head.logits(h_t) (h_t · W, soft-capped when the head
    has a cap), log_softmax over V, gathered at the target.
    Computed `chunk_size` positions at a time (`_over_chunks`), so `[B, T, V]` logits never exist. Float32 `[B, T]`.
    """

    def chunk_logps(hidden_BxLxD, targets_BxL):
        logits = _logits(hidden_BxLxD, head)
        targets = targets_BxL.reshape(-1)
        target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return (target_logits - jax.nn.logsumexp(logits, axis=-1)).reshape(targets_BxL.shape)

    return _over_chunks(chunk_logps, chunk_size, hidden_BxTxD, targets_BxT)


def token_cross_entropy(hidden_BxTxD, head, targets_BxT, mask_BxT, *, chunk_size: int = 256):
    """Σ_t m_t · (−log p(y_t | x_≤t)) and Σ_t m_t: the summed next-token loss and the number of loss tokens."""
    logps = chunked_token_logps(hidden_BxTxD, head, targets_BxT, chunk_size=chunk_size)
    mask = mask_BxT.astype(jnp.float32)
    return -jnp.sum(logps * mask), jnp.sum(mask)


def sequence_logps(hidden_BxTxD, head, targets_BxT, mask_BxT, *, chunk_size: int = 256):
    """(Σ_t m_t log p(y_t | x_≤t), Σ_t m_t) per row, each float32 `[B]`: the log-probability of each row's completion
    and its token count (divide for the length-averaged variants). Rows of a `[chosen; rejected]` batch give both
    halves from one forward pass; the logits are chunked as in `chunked_token_logps`."""
    logps = chunked_token_logps(hidden_BxTxD, head, targets_BxT, chunk_size=chunk_size)
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum(logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def chunked_token_kl(hidden_BxTxD, head, ref_hidden_BxTxD, ref_head, *, chunk_size: int = 256):
    """KL(p_t ‖ q_t) = Σ_v p_t(v)·(log p_t(v) − log q_t(v)) at every position, p from (hidden, head) and q from
    the reference's, over the whole vocabulary (not a sampled estimate: ≥ 0, and 0 exactly when p = q). Chunked over
    the sequence like `chunked_token_logps`; float32 `[B, T]`."""

    def chunk_kl(hidden_BxLxD, ref_hidden_BxLxD):
        logp = jax.nn.log_softmax(_logits(hidden_BxLxD, head), axis=-1)
        logq = jax.nn.log_softmax(_logits(ref_hidden_BxLxD, ref_head), axis=-1)
        return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1).reshape(hidden_BxLxD.shape[:2])

    return _over_chunks(chunk_kl, chunk_size, hidden_BxTxD, ref_hidden_BxTxD)


def chunked_token_entropy(hidden_BxTxD, head, *, chunk_size: int = 256):
    """H_t = −Σ_v p_t(v)·log p_t(v) at every position, chunked like `chunked_token_logps`; float32 `[B, T]`
    (differentiable: PPO's entropy bonus)."""

    def chunk_entropy(hidden_BxLxD):
        logp = jax.nn.log_softmax(_logits(hidden_BxLxD, head), axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1).reshape(hidden_BxLxD.shape[:2])

    return _over_chunks(chunk_entropy, chunk_size, hidden_BxTxD)

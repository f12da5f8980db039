"""Language-modelling losses, computed in chunks over the sequence so `[B, T, V]` float32 logits never exist.

Every loss returns `(sum, count)` rather than a mean: the caller divides by the global token count once, so that
gradient accumulation and data-parallel sharding give exactly the update of one big batch.
"""

import jax
import jax.numpy as jnp


def chunked_token_logps(hidden_BxTxD, unembed_DxV, targets_BxT, *, chunk_size: int = 256):
    """log p(target_t | x_≤t) for every position: logits_t = h_t · W, log_softmax over V, gathered at the target.

    The sequence is processed `chunk_size` positions at a time inside a rematerialised scan, so the forward pass
    holds `[B, chunk, V]` logits and the backward pass recomputes them chunk by chunk. Returns float32 `[B, T]`.
    """
    batch, length, dim = hidden_BxTxD.shape
    chunk = min(chunk_size, length)
    pad = -length % chunk
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    n_chunks = (length + pad) // chunk
    hidden_CxBxLxD = hidden_BxTxD.reshape(batch, n_chunks, chunk, dim).swapaxes(0, 1)
    targets_CxBxL = targets_BxT.reshape(batch, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_logps(hidden_BxLxD, targets_BxL):
        # a 2-D [B·L, D] × [D, V] matmul: XLA CPU's gradients of 3-D einsums are markedly slower
        logits = jnp.dot(hidden_BxLxD.reshape(-1, dim), unembed_DxV, preferred_element_type=jnp.float32)
        targets = targets_BxL.reshape(-1)
        target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return (target_logits - jax.nn.logsumexp(logits, axis=-1)).reshape(targets_BxL.shape)

    def body(_, xs):
        return None, chunk_logps(*xs)

    _, logps_CxBxL = jax.lax.scan(body, None, (hidden_CxBxLxD, targets_CxBxL))
    return logps_CxBxL.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :length]


def token_cross_entropy(hidden_BxTxD, unembed_DxV, targets_BxT, mask_BxT, *, chunk_size: int = 256):
    """Σ_t m_t · (−log p(y_t | x_≤t)) and Σ_t m_t: the summed next-token loss and the number of loss tokens."""
    logps = chunked_token_logps(hidden_BxTxD, unembed_DxV, targets_BxT, chunk_size=chunk_size)
    mask = mask_BxT.astype(jnp.float32)
    return -jnp.sum(logps * mask), jnp.sum(mask)


def sequence_logps(hidden_BxTxD, unembed_DxV, targets_BxT, mask_BxT, *, chunk_size: int = 256):
    """(Σ_t m_t log p(y_t | x_≤t), Σ_t m_t) per row, each float32 `[B]`: the log-probability of each row's completion
    and its token count (divide for the length-averaged variants). Rows of a `[chosen; rejected]` batch give both
    halves from one forward pass; the logits are chunked as in `chunked_token_logps`."""
    logps = chunked_token_logps(hidden_BxTxD, unembed_DxV, targets_BxT, chunk_size=chunk_size)
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum(logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def chunked_token_kl(hidden_BxTxD, unembed_DxV, ref_hidden_BxTxD, ref_unembed_DxV, *, chunk_size: int = 256):
    """KL(p_t ‖ q_t) = Σ_v p_t(v)·(log p_t(v) − log q_t(v)) at every position, p from (hidden, unembed) and q from
    the reference's, over the whole vocabulary (not a sampled estimate: ≥ 0, and 0 exactly when p = q). Chunked over
    the sequence like `chunked_token_logps`; float32 `[B, T]`."""
    batch, length, dim = hidden_BxTxD.shape
    ref_dim = ref_hidden_BxTxD.shape[-1]
    chunk = min(chunk_size, length)
    pad = -length % chunk
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        ref_hidden_BxTxD = jnp.pad(ref_hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    n_chunks = (length + pad) // chunk

    def chunks(x, d):
        return x.reshape(batch, n_chunks, chunk, d).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_kl(hidden_BxLxD, ref_hidden_BxLxD):
        logp = jax.nn.log_softmax(jnp.dot(hidden_BxLxD.reshape(-1, dim), unembed_DxV,
                                          preferred_element_type=jnp.float32), axis=-1)
        logq = jax.nn.log_softmax(jnp.dot(ref_hidden_BxLxD.reshape(-1, ref_dim), ref_unembed_DxV,
                                          preferred_element_type=jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1).reshape(batch, chunk)

    _, kl_CxBxL = jax.lax.scan(lambda _, xs: (None, chunk_kl(*xs)), None,
                               (chunks(hidden_BxTxD, dim), chunks(ref_hidden_BxTxD, ref_dim)))
    return kl_CxBxL.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :length]


def chunked_token_entropy(hidden_BxTxD, unembed_DxV, *, chunk_size: int = 256):
    """H_t = −Σ_v p_t(v)·log p_t(v) = logsumexp(z_t) − Σ_v p_t(v)·z_t with z_t = h_t · W, at every position, chunked
    like `chunked_token_logps`; float32 `[B, T]` (differentiable: PPO's entropy bonus)."""
    batch, length, dim = hidden_BxTxD.shape
    chunk = min(chunk_size, length)
    pad = -length % chunk
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    n_chunks = (length + pad) // chunk

    @jax.checkpoint
    def chunk_entropy(hidden_BxLxD):
        logits = jnp.dot(hidden_BxLxD.reshape(-1, dim), unembed_DxV, preferred_element_type=jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1).reshape(batch, chunk)

    hidden_CxBxLxD = hidden_BxTxD.reshape(batch, n_chunks, chunk, dim).swapaxes(0, 1)
    _, entropy_CxBxL = jax.lax.scan(lambda _, x: (None, chunk_entropy(x)), None, hidden_CxBxLxD)
    return entropy_CxBxL.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :length]

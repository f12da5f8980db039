"""Scalar heads on a decoder's final hidden states: the reward model's score and (PPO) the value head.

A head is a plain dict `{"kernel": [D], "bias": []}`; r = h · kernel + bias, computed in float32.
"""

import jax
import jax.numpy as jnp

HEAD_LOGICAL = {"kernel": ("embed",), "bias": ()}


def init_scalar_head(d_model: int, seed: int, *, std: float | None = None) -> dict:
    """kernel ~ N(0, std²) with std = 1/√(d+1) by default (the reward head of Ziegler et al. 2019 / "The N
    implementation details of RLHF"), std = 0 for a value head that starts at zero; bias 0."""
    std = 1.0 / (d_model + 1) ** 0.5 if std is None else std
    kernel = std * jax.random.normal(jax.random.PRNGKey(seed), (d_model,), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def abstract_scalar_head(d_model: int) -> dict:
    return {"kernel": jax.ShapeDtypeStruct((d_model,), jnp.float32), "bias": jax.ShapeDtypeStruct((), jnp.float32)}


def token_scores(hidden_BxTxD, head) -> jax.Array:
    """r_t = h_t · kernel + bias for every position, float32 `[B, T]` (a value head's per-token values)."""
    kernel = head["kernel"].astype(hidden_BxTxD.dtype)
    return jnp.einsum("btd,d->bt", hidden_BxTxD, kernel, preferred_element_type=jnp.float32) + head["bias"]


def last_token_index(mask_BxT) -> jax.Array:
    """Index of each row's last position with mask 1 (0 for an empty row), int32 `[B]`."""
    length = mask_BxT.shape[-1]
    positions = jnp.arange(length, dtype=jnp.int32)
    return jnp.max(jnp.where(mask_BxT > 0, positions, 0), axis=-1)


def sequence_scores(hidden_BxTxD, mask_BxT, head) -> jax.Array:
    """The score of each sequence: the head applied to the hidden state of its last real (non-pad) token, as HF's
    `*ForSequenceClassification` does. float32 `[B]`."""
    last = last_token_index(mask_BxT)
    hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last[:, None, None], axis=1)[:, 0]
    kernel = head["kernel"].astype(hidden_BxD.dtype)
    return jnp.dot(hidden_BxD, kernel, preferred_element_type=jnp.float32) + head["bias"]


def with_unused_lm_head(params: dict, model_config) -> dict:
    """A reward model's backbone params completed with a zero LM head so the module can be rebuilt; nothing reads
    it, so XLA drops it."""
    if model_config.tie_embeddings or "lm_head" in params:
        return params
    return {**params, "lm_head": jnp.zeros((model_config.d_model, model_config.vocab_size), jnp.float32)}

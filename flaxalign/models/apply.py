"""Running a model the way HF runs a causal LM or a `*ForSequenceClassification` reward model: float32 outputs
for a (right- or left-) padded batch given as token ids and an attention mask."""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flaxalign.models import heads
from flaxalign.models.config import ModelConfig
from flaxalign.models.params import abstract_model, merge


def _padded_inputs(input_ids, attention_mask):
    """(tokens, positions, mask): each token's position counts the real tokens before it."""
    tokens = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return tokens, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), mask


@functools.lru_cache(maxsize=16)
def _logits_fn(config: ModelConfig) -> Callable:
    graphdef = abstract_model(config)[0]
    return jax.jit(lambda params, tokens, positions, segment_ids:
                   merge(graphdef, params).logits(tokens, positions, segment_ids))


def apply_lm(config: ModelConfig, params: Mapping[str, Any], input_ids, attention_mask=None) -> jax.Array:
    """float32 logits `[B, T, V]` of `input_ids`, like `AutoModelForCausalLM(input_ids, attention_mask).logits`.

    Padding (attention_mask 0) may be on the right or the left: each token's position counts the real tokens
    before it and padding attends only to padding, so real tokens' logits equal those of the unpadded sequence.
    Logits at padded positions are meaningless."""
    return _logits_fn(config)(params, *_padded_inputs(input_ids, attention_mask))


@functools.lru_cache(maxsize=16)
def _scores_fn(config: ModelConfig) -> Callable:
    graphdef = abstract_model(config)[0]

    def scores(params, head, tokens, positions, mask):
        hidden = merge(graphdef, heads.with_unused_lm_head(params, config))(tokens, positions, mask)
        return heads.sequence_scores(hidden, mask, head)

    return jax.jit(scores)


def apply_reward(config: ModelConfig, params: Mapping[str, Any], head: Mapping[str, Any], input_ids,
                 attention_mask=None) -> jax.Array:
    """float32 scores `[B]` of a reward model (`Pretrained.params` and `.head` of a `*ForSequenceClassification`
    directory, or a reward run's weights): the head on each row's last real token, like
    `AutoModelForSequenceClassification(...).logits[:, 0]` on right-padded rows."""
    return _scores_fn(config)(params, head, *_padded_inputs(input_ids, attention_mask))

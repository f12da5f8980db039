"""Batched sampling from a causal LM for evaluation: responses of a policy to left-padded prompts.

The prompt buffer is extended to `[B, L + N]` and the whole prefix is recomputed for every new token (no KV cache):
fixed shapes, one compile, exact. Evaluation samples a few dozen short responses, where this costs little.
"""

import jax
import jax.numpy as jnp

from flaxalign import models


def sample(graphdef, params, prompts: dict, rng, *, max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, layer_transform=None) -> dict:
    """Samples up to `max_new_tokens` tokens after each prompt, y_t ~ softmax(logits_t / temperature) (greedy when
    temperature == 0), stopping a row at its first EOS (kept as the last response token).

    `prompts`: `input_ids`, `attention_mask`, `positions`, each int32 `[B, L]`, left-padded (`left_pad_prompts`).
    Returns `tokens` `[B, L + N]` (prompt, response, pad after the end), `mask` `[B, L + N]` (1 on real tokens),
    `response_mask` `[B, N]` (1 on response tokens, EOS included) and `ended` `[B]` (the row emitted EOS).
    """
    model = models.merge(graphdef, params)
    batch, prompt_len = prompts["input_ids"].shape
    tokens = jnp.pad(prompts["input_ids"], ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
    mask = jnp.pad(prompts["attention_mask"], ((0, 0), (0, max_new_tokens)))
    unembed = model.unembedding()

    def step(i, carry):
        tokens, mask, done, rng = carry
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        hidden = model(tokens, positions, mask, layer_transform=layer_transform)
        last = prompt_len + i - 1
        logits = jnp.dot(hidden[:, last], unembed, preferred_element_type=jnp.float32)
        rng, key = jax.random.split(rng)
        if temperature > 0:
            next_token = jax.random.categorical(key, logits / temperature, axis=-1)
        else:
            next_token = jnp.argmax(logits, axis=-1)
        next_token = jnp.where(done, pad_id, next_token).astype(tokens.dtype)
        tokens = tokens.at[:, last + 1].set(next_token)
        mask = mask.at[:, last + 1].set((~done).astype(mask.dtype))
        return tokens, mask, done | (next_token == eos_id), rng

    done = jnp.zeros((batch,), bool)
    tokens, mask, done, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, mask, done, rng))
    return {"tokens": tokens, "mask": mask, "response_mask": mask[:, prompt_len:], "ended": done}

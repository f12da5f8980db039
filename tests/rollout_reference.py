"""Independent references for on-policy rollouts: every row rebuilt from the prompt ids it was given and its
response cut after the first EOS, run through a model at positions 0 … T − 1 with nothing masked, then the scalar
head, log-softmax and KL done in NumPy float64. Nothing here goes through the left-padded batch code it checks
(`reward_model_scores`, `response_hidden`, `chunked_token_kl`, the masks and positions of `generate`'s layout).

Rows are right-padded to one width only to run them in one compiled call: attention is causal, so a token never
sees the padding after it, and each row's real positions get the values of that row run alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import models
from flaxalign.models import heads


def response_length(response, eos_id: int) -> int:
    """Tokens that count in a response: up to and including its first EOS, all of them when it has none."""
    hits = np.flatnonzero(np.asarray(response) == eos_id)
    return int(hits[0]) + 1 if hits.size else len(response)


def unpadded_row(prompt_ids, response, eos_id: int) -> np.ndarray:
    """The real tokens of a rollout row: its prompt without padding, then its response up to the EOS."""
    return np.concatenate([np.asarray(prompt_ids, np.int32),
                           np.asarray(response[:response_length(response, eos_id)], np.int32)])


@functools.lru_cache(maxsize=8)
def _forward(config, kind: str):
    """jit((params, tokens [B, W]) -> hidden states or logits), every position real, position i at index i."""
    graphdef = models.abstract_model(config)[0]

    def run(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        everything = jnp.ones_like(tokens)
        if kind == "hidden":
            return models.merge(graphdef, heads.with_unused_lm_head(params, config))(tokens, positions, everything)
        return models.merge(graphdef, params).logits(tokens, positions, everything)

    return jax.jit(run)


def _right_padded(rows):
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int32)


def reward_model_scores(config, reward_params: dict, rows) -> np.ndarray:
    """A reward model's score of each unpadded sequence in `rows`: its backbone's hidden state at the sequence's
    last token, times the head, in float64."""
    hidden = np.asarray(_forward(config, "hidden")(reward_params["model"], _right_padded(rows)), np.float64)
    last = hidden[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    head = reward_params["head"]
    return last @ np.asarray(head["kernel"], np.float64) + float(head["bias"])


def _log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def response_log_probs(config, params, rows, prompt_lens, temperature: float = 1.0) -> list[np.ndarray]:
    """For each unpadded row, log softmax(logits / T) `[n, V]` (float64) at the positions that predict its n
    response tokens: prompt_len − 1 … len(row) − 2."""
    logits = np.asarray(_forward(config, "logits")(params, _right_padded(rows)), np.float64)
    return [_log_softmax(row_logits[p - 1:len(row) - 1] / temperature)
            for row_logits, row, p in zip(logits, rows, prompt_lens)]


def response_token_kl(config, policy_params, reference_params, rows, prompt_lens,
                      temperature: float = 1.0) -> list[np.ndarray]:
    """Full-vocabulary KL(π ‖ π_ref) `[n]` at each response token of each unpadded row, float64."""
    policy = response_log_probs(config, policy_params, rows, prompt_lens, temperature)
    reference = response_log_probs(config, reference_params, rows, prompt_lens, temperature)
    return [(np.exp(logp) * (logp - logq)).sum(-1) for logp, logq in zip(policy, reference)]


def perturbed(params, seed: int, scale: float):
    """`params` plus Gaussian noise of std `scale` on every leaf: a model near `params` but not equal to it."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.normal(size=x.shape), x.dtype), params)

"""Distillation: the generalized Jensen–Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
Language Models", Eq. 1; TRL `GKDTrainer.generalized_jsd_loss`) between a student's and a teacher's next-token
distributions over the whole vocabulary, chunked over the sequence so `[B, T, V]` float32 logits never exist.

With p_S = softmax(z_S / τ), p_T = softmax(z_T / τ) at one position and the mixture m = β·p_T + (1 − β)·p_S:
  JSD_β = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m)        for 0 < β < 1
  β = 0: KL(p_T ‖ p_S)   (forward KL, "supervised" distillation)
  β = 1: KL(p_S ‖ p_T)   (reverse KL, mode seeking)
as TRL defines the end points (the mixture formula itself tends to 0 there).
"""

import numbers

import jax
import jax.numpy as jnp

from flaxalign.errors import ConfigError
from flaxalign.losses.lm import _logits, _over_chunks


class DistillLossError(ConfigError, ValueError):
    """A distillation hyper-parameter is invalid."""


def _check(beta, temperature):
    if isinstance(beta, numbers.Real) and not 0 <= beta <= 1:
        raise DistillLossError(f"beta must be in [0, 1], got {beta}.")
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise DistillLossError(f"temperature must be > 0, got {temperature}.")


def _kl(log_p, log_q):
    """KL(p ‖ q) over the last axis, from log-probabilities (0·log 0 = 0)."""
    return jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0):
    """JSD_β `[...]` at every position of `[..., V]` logits (the module docstring's definition). `beta` is a Python
    number (it picks the end-point form)."""
    _check(beta, temperature)
    log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    if beta == 0:
        return _kl(log_t, log_s)
    if beta == 1:
        return _kl(log_s, log_t)
    log_m = jnp.logaddexp(log_s + jnp.log1p(-beta), log_t + jnp.log(beta))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def chunked_generalized_jsd(student_hidden_BxTxD, student_head, teacher_hidden_BxTxD, teacher_head, *, beta=0.5,
                            temperature=1.0, chunk_size: int = 256):
    """`generalized_jsd` `[B, T]` of the logits of (hidden, head) pairs — the student's and the teacher's, whose
    widths D may differ but whose vocabularies must match — `chunk_size` positions at a time (rematerialised)."""
    _check(beta, temperature)

    def chunk(student_BxLxD, teacher_BxLxD):
        out = generalized_jsd(_logits(student_BxLxD, student_head), _logits(teacher_BxLxD, teacher_head), beta=beta,
                              temperature=temperature)
        return out.reshape(student_BxLxD.shape[:2])

    return _over_chunks(chunk, chunk_size, student_hidden_BxTxD, teacher_hidden_BxTxD)

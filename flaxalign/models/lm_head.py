"""The LM-head object: what turns final hidden states into next-token logits, for every consumer (losses, sampler,
on-policy log-probs, evaluation).

`CausalLM.output_head()` gives an `LMHead`: the `[D, V]` matrix (a tied head: the `[V, D]` embedding, multiplied
transposed) in the compute dtype plus static numerics — the
final logit soft cap (Gemma 2: logits ← c·tanh(logits / c)) and a sampling temperature. `logits(hidden)` applies
them in float32, in the order transformers does: the cap is part of the model, the sampler divides by T afterwards.
Consumers never multiply by the raw matrix themselves, so a family's head numerics live here only; the losses call
`logits` on one chunk of positions at a time, so `[B, T, V]` still never exists where it did not before.
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMHead:
    """logits(h) = cap(h · W) / T in float32, cap(s) = c·tanh(s / c) when c = `softcap` > 0 (else s).

    A pytree: `weight` is its leaf (gradients flow to it): W `[D, V]`, or Wᵀ `[V, D]` when `transposed` (a tied
    head is the embedding itself: multiplying by its transpose would make the backward pass keep a `[D, V]` copy);
    `softcap`, `temperature` and `transposed` are static."""

    weight: jax.Array
    softcap: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    temperature: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def logits(self, hidden_NxD) -> jax.Array:
        """Float32 logits `[..., V]` of hidden states `[..., D]` (pass 2-D `[N, D]` in training losses: XLA CPU's
        gradients of 3-D products are markedly slower)."""
        if hidden_NxD.ndim == 2:
            contract = ((1,), (1 if self.transposed else 0,)), ((), ())
            scores = jax.lax.dot_general(hidden_NxD, self.weight, contract, preferred_element_type=jnp.float32)
        else:
            spec = "...d,vd->...v" if self.transposed else "...d,dv->...v"
            scores = jnp.einsum(spec, hidden_NxD, self.weight, preferred_element_type=jnp.float32)
        if self.softcap:
            scores = self.softcap * jnp.tanh(scores / self.softcap)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return scores

    def at_temperature(self, temperature: float) -> "LMHead":
        """The head of softmax(logits / T). Without a soft cap, 1/T is folded into the matrix (one scale of the
        matrix in the compute dtype instead of one per logits chunk: the numbers flaxalign computed before this object
        existed); with one, logits are divided after the cap, as transformers' sampler does."""
        if self.softcap:
            return dataclasses.replace(self, temperature=self.temperature * temperature)
        weight = self.weight / jnp.asarray(temperature, self.weight.dtype)
        return dataclasses.replace(self, weight=weight)


def as_head(head) -> LMHead:
    """`head` itself, or a raw `[D, V]` matrix as an uncapped `LMHead` (what the loss functions accept)."""
    return head if isinstance(head, LMHead) else LMHead(head)

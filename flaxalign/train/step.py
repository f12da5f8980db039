"""Pieces every stage's train step is made of: accumulated gradients and the optimizer update."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flaxalign.train.state import TrainState

# loss_fn(params, frozen, batch, rng) -> (loss_sum, (count, metric_sums)) where metric_sums is a dict of sums that
# are divided by the total count after accumulation.
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]


def split_micro_batches(batch: dict, num_micro: int) -> dict:
    """[B, ...] → [num_micro, B/num_micro, ...], micro-batch k taking rows k, k+num_micro, … so every device keeps
    its share of each micro-batch (rows are sharded contiguously over data×fsdp)."""

    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch {x.shape[0]} is not divisible into {num_micro} micro-batches")
        return x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulated_gradients(loss_fn: LossFn, params, frozen, batch: dict, rng, num_micro: int = 1):
    """Σ over micro-batches of ∇ loss_sum, then ÷ the global loss-token count: the gradient of the token-mean loss
    of the whole batch, whatever `num_micro` is. Returns (grads, loss, count, metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss_sum, (count, metric_sums)), grad_sum = grad_fn(params, frozen, batch, rng)
    else:
        micro = split_micro_batches(batch, num_micro)
        rngs = jax.random.split(rng, num_micro)

        def body(carry, xs):
            mb, mb_rng = xs
            (loss_sum, (count, metric_sums)), grads = grad_fn(params, frozen, mb, mb_rng)
            return jax.tree.map(jnp.add, carry, (grads, loss_sum, count, metric_sums)), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, frozen, first, rngs[0])
        (loss0, (count0, metrics0)), grads0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        init = (grads0, loss0, count0, metrics0)
        (grad_sum, loss_sum, count, metric_sums), _ = jax.lax.scan(body, init, (micro, rngs))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    metrics = {k: v / denom for k, v in metric_sums.items()}
    return grads, loss_sum / denom, count, metrics


def finite_update(optimizer: optax.GradientTransformation, grads, loss, params, opt_state):
    """The optimizer update, applied only when the loss and the global gradient norm are finite: a NaN or inf from
    one bad batch (or an overflow) leaves params and optimizer state as they were instead of poisoning both.
    Returns (params, opt_state, {"grad_norm", "nonfinite": 1.0 when the update was skipped, else 0.0})."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o), params, opt_state)
    return params, opt_state, {"grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}


def gradient_step(loss_fn: LossFn, state: TrainState, batch: dict, *, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule, grad_accum: int) -> tuple[TrainState, dict]:
    """One optimizer update of `state.params` from one global batch, split into `grad_accum` micro-batches
    (skipped, with `nonfinite` = 1, when the loss or gradient norm is not finite; the step still counts).
    Metrics: token-mean loss, global grad norm, loss-token count, learning rate, and the loss's own means."""
    rng, step_rng = jax.random.split(state.rng)
    grads, loss, count, extra = accumulated_gradients(loss_fn, state.params, state.frozen, batch, step_rng,
                                                      grad_accum)
    params, opt_state, guard = finite_update(optimizer, grads, loss, state.params, state.opt_state)
    metrics = {"loss": loss, **guard, "loss_tokens": count, "lr": schedule(state.step), **extra}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

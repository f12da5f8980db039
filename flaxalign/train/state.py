"""The train state: one pytree that the jitted step takes, returns (donated) and the checkpoint saves."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """`params` are the trained parameters, `frozen` those that take part in the loss but are not updated (a LoRA
    base, a reference model), `rng` a raw uint32 key so the state stays a plain array pytree."""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def create_state(params: Any, optimizer, seed: int, frozen: Any = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={} if frozen is None else frozen,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))

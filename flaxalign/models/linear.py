"""The linear-weight protocol of the model's dense layers: a weight is a plain array `[*in, *out]`, or an object that
computes its own product — `dense(x, dtype)` and `materialize(dtype)` (LoRA in activation space and a quantized
frozen base, `flaxalign.peft.adapted`)."""

import math
from typing import Any

import jax


def dense(x_NxI: jax.Array, w: Any, dtype, n_in: int = 1) -> jax.Array:
    """x · W `[N, prod(out)]` for W `[*in, *out]` with `n_in` input axes, in `dtype`; a weight that is not an array
    computes its own product."""
    if hasattr(w, "dense"):
        return w.dense(x_NxI, dtype)
    return x_NxI @ w.reshape(math.prod(w.shape[:n_in]), -1).astype(dtype)


def materialize(w: Any, dtype) -> jax.Array:
    """The matrix of a weight in `dtype` (a LoRA-adapted weight merged, a quantized one dequantized)."""
    return w.materialize(dtype) if hasattr(w, "materialize") else w.astype(dtype)


class ReadWhole:
    """For a weight object stored as a module's Param value: `param[...]` returns the object itself, which `dense` and
    `materialize` then read (nothing else indexes a weight)."""

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"a {type(self).__name__} is read whole, with [...]")
        return self

"""Linear weights that compute their own product: the training-time form of LoRA (activation space) on a float or
quantized frozen base.

A model's dense layer asks its weight for `dense(x, dtype)` when the weight is not a plain array, and for
`materialize(dtype)` where it needs the matrix itself (an LM head; `models/linear.py`). Two such weights exist:

    QuantizedWeight (`peft.quant`)   x·W with W dequantized per layer, recomputed in the backward pass;
    LoraWeight                       x·W + s·(dropout(x)·A)·B, W an array or a QuantizedWeight;
                                     DoRA: (x·W + s·x·A·B) ⊙ m / sg(‖W + s·A·B‖).

Both are pytrees whose array leaves keep the stacked layer axis, so the layer scan slices them per layer and
`jax.grad` reaches A, B and the DoRA magnitude through them. The frozen W only ever meets the activations: its
backward is the [N, d_in] input gradient, never a [d_in, d_out] weight gradient.

Plain LoRA (no dropout, no DoRA, a frozen W) has its own backward pass (`_lora_dense`): where a device's token
rows are at least 0.75× the output features, the input gradient is one product dy·(W + s·A·B)ᵀ with the adapted
weight formed per layer (a rank-r product, cheap next to the [N, d_in] passes the activation-space form
dy·Wᵀ + s·(dy·Bᵀ)·Aᵀ adds; in bfloat16 the adapter's share of dx is then as precise as one rounding of W, the size of
rounding dx itself), and A, B get xᵀ·(s·dy·Bᵀ) and (x·A)ᵀ·(s·dy). The forward stays x·W + s·(x·A)·B, which keeps
the adapter's increment exact in bfloat16 where W + s·A·B rounded would not.
"""

import functools
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flaxalign import sharding
from flaxalign.models import remat
from flaxalign.models.linear import ReadWhole, dense, materialize
from flaxalign.peft import lora
from flaxalign.peft.quant import QuantizedWeight


@flax.struct.dataclass
class LoraWeight(ReadWhole):
    """A frozen weight W with its adapter; multiplied as `dense` says, merged only by `materialize`."""

    base: Any  # W [*L, *in, *out]: an array or a QuantizedWeight
    a: jax.Array  # [*L, *in, r]
    b: jax.Array  # [*L, r, *out]
    magnitude: jax.Array | None = None  # DoRA: [*L, *out]
    dropout_key: jax.Array | None = None  # raw uint32 keys [*L, 2]: training with lora.dropout > 0
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    n_in: int = flax.struct.field(pytree_node=False, default=1)
    base_trained: bool = flax.struct.field(pytree_node=False, default=False)  # in lora.modules_to_save

    @property
    def n_layers(self) -> int:
        return self.a.ndim - 1 - self.n_in

    def _factors(self, dtype):
        """A `[*L, I, r]` and B `[*L, r, O]` flattened over the input and output axes."""
        lead = self.a.shape[:self.n_layers]
        return (self.a.reshape(lead + (-1, self.a.shape[-1])).astype(dtype),
                self.b.reshape(lead + (self.b.shape[self.n_layers], -1)).astype(dtype))

    def _norm_scale(self) -> jax.Array:
        """DoRA's m / sg(‖W + s·A·B‖) per output feature, flattened `[*L, O]` (float32)."""
        w = materialize(self.base, jnp.float32)
        delta = lora.low_rank_delta(self.a, self.b, self.n_layers)
        # kept whole by `remat=minimal`: recomputing it would keep the [d_in, d_out] A·B instead
        norm = remat.keep("dora_norm", jax.lax.stop_gradient(lora.column_norm(w + self.scale * delta, self.n_layers,
                                                                               self.n_in)))
        ratio = self.magnitude.astype(jnp.float32) / norm
        return ratio.reshape(ratio.shape[:self.n_layers] + (-1,))

    def dense(self, x_NxI: jax.Array, dtype) -> jax.Array:
        """x·W + s·(x̃·A)·B with x̃ = dropout(x) (a fresh mask per token and input feature, training only); DoRA as
        PEFT computes it: g·(x·W + s·x·A·B) with g = m / sg(‖W + s·A·B‖), and with dropout active
        x·W + (g − 1)·x̃·W + g·s·x̃·A·B."""
        a, b = self._factors(dtype)
        dropped = self._dropped(x_NxI)
        if self.magnitude is None and dropped is x_NxI and not self.base_trained:
            return _lora_dense(x_NxI.astype(dtype), self.base, a, b, self.scale, dtype, self.n_in)
        base_y = dense(x_NxI, self.base, dtype, self.n_in)
        low = (dropped.astype(dtype) @ a) @ b * jnp.asarray(self.scale, dtype)
        if self.magnitude is None:
            return base_y + low
        g = self._norm_scale().astype(dtype)
        if dropped is x_NxI:
            return g * remat.keep("dora_y", base_y + low)
        return base_y + (g - 1) * dense(dropped, self.base, dtype, self.n_in) + g * low

    def _dropped(self, x_NxI: jax.Array) -> jax.Array:
        if self.dropout_key is None or not self.dropout:
            return x_NxI
        keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x_NxI.shape)
        return jnp.where(keep, x_NxI / (1.0 - self.dropout), 0.0).astype(x_NxI.dtype)

    def materialize(self, dtype) -> jax.Array:
        """W' = W + s·A·B (DoRA: m ⊙ W'/sg(‖W'‖)) in `dtype`: for a weight used as a matrix (an adapted LM head,
        which the chunked losses take whole — so it trains without LoRA dropout, where PEFT drops its input)."""
        w = materialize(self.base, jnp.float32)
        delta = lora.low_rank_delta(self.a, self.b, self.n_layers)
        if self.magnitude is None:
            return lora.lora_weight(w, delta, self.scale).astype(dtype)
        return lora.dora_weight(w, delta, self.magnitude, self.scale, self.n_layers, self.n_in).astype(dtype)


# The input gradient uses the adapted weight when a device's rows N ≥ this × d_out: forming W + s·A·B writes and reads
# ≈ 3·d_in·d_out values (the whole weight on each device under FSDP), the activation-space form's extra product and
# sum ≈ 4·N·d_in.
MERGED_INPUT_GRADIENT_MIN_ROWS_PER_OUTPUT = 0.75


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lora_dense(x_NxI, base, a_IxR, b_RxO, scale, dtype, n_in):
    """x·W + s·(x·A)·B for x, A, B in the compute dtype; the backward pass is `_lora_dense_bwd`."""
    return _lora_dense_fwd(x_NxI, base, a_IxR, b_RxO, scale, dtype, n_in)[0]


def _lora_dense_fwd(x_NxI, base, a_IxR, b_RxO, scale, dtype, n_in):
    xa_NxR = remat.keep("lora_xa", x_NxI @ a_IxR)
    y_NxO = dense(x_NxI, base, dtype, n_in) + (xa_NxR @ b_RxO) * jnp.asarray(scale, dtype)
    return y_NxO, (x_NxI, base, a_IxR, b_RxO, xa_NxR)


def _lora_dense_bwd(scale, dtype, n_in, residuals, dy_NxO):
    x_NxI, base, a_IxR, b_RxO, xa_NxR = residuals
    dy_NxO = dy_NxO.astype(dtype)
    s = jnp.asarray(scale, dtype)
    g_NxR = (dy_NxO @ b_RxO.T) * s
    if x_NxI.shape[0] / sharding.row_shards() >= MERGED_INPUT_GRADIENT_MIN_ROWS_PER_OUTPUT * b_RxO.shape[1]:
        w_IxO = materialize(base, dtype).reshape(a_IxR.shape[0], -1)
        adapted_IxO = w_IxO + (scale * lora.low_rank_delta(a_IxR, b_RxO, 0)).astype(dtype)
        dx_NxI = dy_NxO @ adapted_IxO.T
    else:
        dx_NxI = jax.vjp(lambda x: dense(x, base, dtype, n_in), x_NxI)[1](dy_NxO)[0] + g_NxR @ a_IxR.T
    # W is frozen here (a weight in lora.modules_to_save, trained, takes autodiff's path): its cotangent is a zero
    # that nothing reads, never computed (integer codes take float0).
    no_grad = jax.tree.map(lambda w: jnp.zeros(w.shape, jax.dtypes.float0) if not jnp.issubdtype(w.dtype, jnp.inexact)
                           else jnp.zeros_like(w), base)
    return dx_NxI, no_grad, x_NxI.T @ g_NxR, xa_NxR.T @ (dy_NxO * s)


_lora_dense.defvjp(_lora_dense_fwd, _lora_dense_bwd)


def attach_lora(params: Any, lora_params: Any, config: lora.LoraConfig, rng: jax.Array | None = None) -> Any:
    """`params` with every adapted weight replaced by its `LoraWeight` (the training-time form of `lora.merge`:
    same outputs and A/B gradients, computed in activation space). With `rng` and `config.dropout` > 0 each adapted
    weight gets its own dropout keys, one per stacked layer."""
    adapters = lora.weights_with_adapters(params, lora_params)
    if not adapters:
        return params
    trained = set(lora.modules_to_save_paths(params, config))
    updated = {}
    for path, (w, adapter) in adapters.items():
        lora.check_dora(path, adapter, config)
        a, b = adapter["a"], adapter["b"]
        n_layers = a.ndim + b.ndim - 2 - len(w.shape)
        n_in = a.ndim - 1 - n_layers
        key = None
        if rng is not None and config.dropout > 0:
            key = jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
            if n_layers:
                key = jax.random.split(key, a.shape[:n_layers])  # one key per stacked layer (raw or typed keys)
        updated[path] = LoraWeight(
            base=w, a=a, b=b, magnitude=adapter.get("magnitude"), dropout_key=key, dropout=config.dropout,
            scale=lora.lora_scale(lora.alpha_for(path, config), a.shape[-1], config.variant), n_in=n_in,
            base_trained=path in trained)
    return lora.replace_at_paths(params, updated)


__all__ = ["LoraWeight", "QuantizedWeight", "attach_lora"]

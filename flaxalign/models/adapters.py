"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al.
2020, "AdapterFusion").

An adapter is a small residual MLP on a sub-layer's output, applied before the layer's own residual add:

    h' = h + W_up · act(W_down · h + b_down) + b_up,    W_down: [D, D/r],  W_up: [D/r, D]

Placement "houlsby" puts one after the attention output and one after the MLP output; "pfeiffer" only after the
MLP. `W_up` and both biases start at zero, so h' = h and the adapted model equals the base model at init.

Several named adapter sets live side by side in one parameter tree, inside the stacked (scanned) layer params:
`layers/adapters/<name>/<site>/{down, down_bias, up, up_bias}`, each with the leading "layers" axis.
`ModelConfig.active_adapter` picks the set that runs ("" = none: the base model, which is the reference model of
DPO/PPO/KL with no extra copy). The base stays frozen by splitting the tree: `split_trainable` gives
(adapter params, base params), `join` puts them back; both are dict operations that never copy an array.

Sharding: the bottleneck dimension has logical axis `None` (replicated). It is small (D/16), and sharding it over
"tensor" would add an all-reduce of the [B·T, D] up-projection output per adapter per layer, for matmuls that cost
~1/(3r) of the layer's (4·D²/r against ~12·D² FLOPs per token). The D dimension follows "embed" (FSDP-sharded,
like every other weight).
"""

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxalign.sharding import constrain

ADAPTERS_KEY = "adapters"  # the parameter-tree key under which all adapter sets live
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf form, as torch.nn.GELU and adapter libraries use
}
# Folded into the params stream's key for adapter weights, so adding adapters leaves the base init (which draws
# from the stream's counter) bit-for-bit as without them.
_ADAPTER_STREAM = 0x0ADA7E25


class BottleneckAdapter(nnx.Module):
    """h' = h + W_up · act(W_down · h + b_down) + b_up, with W_up = 0 and b = 0 at init (h' = h)."""

    def __init__(self, d_model: int, bottleneck: int, key: jax.Array, *, std: float = 0.02,
                 activation: str = "relu", stack=()):
        stack = tuple(stack)
        layers = ("layers",) * len(stack)
        self.activation = activation
        self.down = nnx.Param(std * jax.random.normal(key, stack + (d_model, bottleneck), jnp.float32),
                              logical_axes=layers + ("embed", None))
        self.down_bias = nnx.Param(jnp.zeros(stack + (bottleneck,), jnp.float32), logical_axes=layers + (None,))
        self.up = nnx.Param(jnp.zeros(stack + (bottleneck, d_model), jnp.float32),
                            logical_axes=layers + (None, "embed"))
        self.up_bias = nnx.Param(jnp.zeros(stack + (d_model,), jnp.float32), logical_axes=layers + ("embed",))

    def __call__(self, h_BxTxD):
        b, t, d = h_BxTxD.shape
        dtype = h_BxTxD.dtype
        # 2-D matmuls on [B·T, D] rows, like the rest of the hot path (faster weight gradients on XLA CPU).
        h_NxD = h_BxTxD.reshape(b * t, d)
        z_NxR = h_NxD @ self.down[...].astype(dtype) + self.down_bias[...].astype(dtype)
        z_NxR = constrain(ACTIVATIONS[self.activation](z_NxR), ("act_batch", None))
        delta_NxD = z_NxR @ self.up[...].astype(dtype) + self.up_bias[...].astype(dtype)
        return h_BxTxD + delta_NxD.reshape(b, t, d)


class AdapterSet(nnx.Module):
    """One named set: an adapter per placement site ("attn" and/or "mlp")."""

    def __init__(self, config, key: jax.Array, *, stack=()):
        self.sites = config.adapter_sites
        for i, site in enumerate(self.sites):
            setattr(self, site, BottleneckAdapter(
                config.d_model, config.adapter_dim, jax.random.fold_in(key, i), std=config.init_std,
                activation=config.adapter_activation, stack=stack))

    def __call__(self, site: str, h_BxTxD):
        """The sub-layer output `h` through this set's adapter at `site`; unchanged where the set has none."""
        return getattr(self, site)(h_BxTxD) if site in self.sites else h_BxTxD


def adapter_sets(config, rngs: nnx.Rngs, *, stack=()) -> nnx.Dict:
    """All of `config.adapter_names` as an `nnx.Dict` name → `AdapterSet`. Keys are derived from the params
    stream's key without drawing from it, and per set from its name, so each set's init depends on neither the
    base nor the other sets."""
    base_key = jax.random.fold_in(rngs.params.key[...], _ADAPTER_STREAM)
    return nnx.Dict({name: AdapterSet(config, jax.random.fold_in(base_key, zlib.crc32(name.encode())), stack=stack)
                     for name in config.adapter_names})


def adapter_param_filter(path) -> bool:
    """True for adapter params. `path` is a JAX key path (`tree_map_with_path`), a tuple of names (nnx state paths)
    or a "/"-joined string."""
    if isinstance(path, str):
        parts = path.split("/")
    else:
        parts = [getattr(p, "key", getattr(p, "name", p)) for p in path]
    return ADAPTERS_KEY in parts


def split_trainable(params: Mapping) -> tuple[dict, dict]:
    """(adapter params, base params): the same nested dicts partitioned at the "adapters" keys. Works on any tree of
    that structure (params, logical axes, shardings, gradients). No array is copied."""
    adapters, base = {}, {}
    for key, value in params.items():
        if key == ADAPTERS_KEY:
            adapters[key] = value
        elif isinstance(value, Mapping):
            sub_adapters, sub_base = split_trainable(value)
            if sub_adapters:
                adapters[key] = sub_adapters
            if sub_base or not sub_adapters:
                base[key] = sub_base
        else:
            base[key] = value
    return adapters, base


def join(adapter_params: Mapping, base_params: Mapping) -> dict:
    """The full parameter tree from `split_trainable`'s two halves (inverse of it). No array is copied."""
    out = dict(base_params)
    for key, value in adapter_params.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
            out[key] = join(value, out[key])
        else:
            raise ValueError(f"join: {key!r} is in both the adapter and the base params")
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

"""A frozen base stored quantized (QLoRA, Dettmers et al. 2023): int8 per output channel or 4-bit NormalFloat
blocks, dequantized one layer at a time inside the layer scan, in the compute dtype.

Which weights: every linear weight of the scanned decoder layers (q, k, v, o, gate, up, down — the same set
bitsandbytes' `Linear4bit` replaces); the token embedding, the LM head, norms and biases stay float32, as
bitsandbytes keeps `lm_head` and the embedding unquantized. For a weight W `[*L, *in, *out]` (L the scanned layer
axis) with I = prod(in):

    int8   codes int8 [*L, I, *out],   scales f32 [*L, *out]:          W ≈ codes · scale,
           scale = max_i |W[i, o]| / 127 per output channel (absmax).
    nf4    codes uint8 [*L, I/2, *out] (two 4-bit indices per byte, consecutive inputs 2i (low) and 2i + 1 (high)),
           scales f32 [*L, I/B, *out] (B = block_size, 64):             W ≈ NF4[index] · absmax,
           absmax over each block of B consecutive inputs of one output channel — bitsandbytes' blocks of 64
           consecutive elements of the HF [out, in] weight, whose rows are the output channels.
    double quantisation (nf4): the f32 absmax values themselves are stored as int8 — their mean c is subtracted
           and the rest quantized symmetrically per block of 256 (one f32 scale each): absmax ≈ q·s₂ + c, 8.1
           instead of 32 bits per 64 weights, 4.13 bits per weight in all (QLoRA §3 quantizes this second level to
           FP8 with a mean offset; linear int8 is used here, with its error bound tested).

`QuantizedWeight` is a pytree whose leaves keep the leading layer axis, so `lax.scan` slices it per layer like any
other weight. Its `dense(x, dtype)` dequantizes and multiplies under `jax.checkpoint`: the backward pass recomputes
the dequantized layer from the codes instead of the scan keeping it as a residual, which would hold the whole
dequantized base at once.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import errors
from flaxalign.models.linear import ReadWhole
from flaxalign.peft import lora

KINDS = ("none", "int8", "nf4")
# NF4: the 16 levels of bitsandbytes' `get_4bit_type("nf4")` (QLoRA, Appendix E): quantiles of N(0, 1) that give
# equal-mass bins, scaled to [−1, 1], with an exact 0.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
DOUBLE_QUANT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The `quantization` config block: how the frozen base is stored.

    base          "none" (float32), "int8" (per output channel absmax) or "nf4" (4-bit NormalFloat blocks).
    block_size    nf4: inputs per absmax block (64 as in QLoRA); every quantized weight's input size must divide.
    double_quant  nf4: store the block absmax values as int8 too (QLoRA's double quantisation).
    """

    base: str = "none"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.base not in KINDS:
            raise errors.ConfigError(f"quantization.base must be one of {list(KINDS)}, not {self.base!r}.")
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
            raise errors.ConfigError(f"quantization.block_size must be an even integer >= 2, not {self.block_size!r}.")
        if self.double_quant and self.base != "nf4":
            raise errors.ConfigError("quantization.double_quant quantizes nf4 block scales; set "
                                     "quantization.base='nf4' or turn double_quant off.")

    @property
    def enabled(self) -> bool:
        return self.base != "none"

    @classmethod
    def from_dict(cls, values: Any) -> "QuantConfig":
        return cls(**errors.dataclass_fields(cls, values, "quantization"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class QuantizedWeight(ReadWhole):
    """A quantized linear weight (module docstring for the layouts). Static fields describe one layer's weight."""

    codes: jax.Array
    scales: jax.Array  # f32, or int8 when double-quantized
    scales_scale: jax.Array | None = None  # double quantisation: f32 [*L, n_blocks]
    scales_offset: jax.Array | None = None  # double quantisation: f32 [*L] (the mean absmax)
    kind: str = flax.struct.field(pytree_node=False, default="int8")
    in_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    block_size: int = flax.struct.field(pytree_node=False, default=64)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The leading (stacked layer) dims: () inside the layer scan."""
        return self.codes.shape[:self.codes.ndim - 1 - len(self.out_shape)]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lead_shape + self.in_shape + self.out_shape

    def materialize(self, dtype=jnp.float32) -> jax.Array:
        """W `[*L, *in, *out]` in `dtype`."""
        lead, n_in = self.lead_shape, math.prod(self.in_shape)
        if self.kind == "int8":
            scale = jnp.expand_dims(self.scales, len(lead))
            w = self.codes.astype(jnp.float32) * scale
        else:
            absmax = self._absmax()
            low, high = self.codes & 0x0F, self.codes >> 4
            index = jnp.stack([low, high], axis=len(lead) + 1).reshape(lead + (n_in,) + self.out_shape)
            values = jnp.take(jnp.asarray(NF4_CODE, jnp.float32), index.astype(jnp.int32))
            blocks = values.reshape(lead + (n_in // self.block_size, self.block_size) + self.out_shape)
            w = (blocks * jnp.expand_dims(absmax, len(lead) + 1)).reshape(lead + (n_in,) + self.out_shape)
        return w.reshape(self.shape).astype(dtype)

    def _absmax(self) -> jax.Array:
        if self.scales_scale is None:
            return self.scales
        lead = self.lead_shape
        flat = self.scales.reshape(lead + (-1,))
        n = flat.shape[-1]
        padded = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, -n % DOUBLE_QUANT_BLOCK)])
        blocks = padded.reshape(lead + (-1, DOUBLE_QUANT_BLOCK)).astype(jnp.float32)
        values = (blocks * self.scales_scale[..., None]).reshape(lead + (-1,))[..., :n]
        return (values + self.scales_offset[..., None]).reshape(self.scales.shape)

    def dense(self, x_NxI: jax.Array, dtype) -> jax.Array:
        """x · W `[N, prod(out)]`, dequantized in `dtype` and recomputed (not stored) for the backward pass."""
        return _quantized_dense(x_NxI, self, dtype)


def _quantized_dense(x_NxI, weight: QuantizedWeight, dtype):
    def product(x, weight):
        w = weight.materialize(dtype)
        return x.astype(dtype) @ w.reshape(math.prod(weight.in_shape), -1)

    return jax.checkpoint(product)(x_NxI, weight)


def check_quantizable(path: str, shape: tuple[int, ...], n_layers: int, n_in: int, config: QuantConfig) -> None:
    """Raises a ConfigError naming the weight when nf4's blocks do not divide its input size."""
    fan_in = math.prod(shape[n_layers:n_layers + n_in])
    if config.base == "nf4" and fan_in % config.block_size:
        raise errors.ConfigError(
            f"quantization.base='nf4' needs every quantized weight's input size to be a multiple of "
            f"quantization.block_size={config.block_size}, but {path} has {fan_in} inputs; use a block_size that "
            f"divides it or quantization.base='int8'.")


def quantize(w: jax.Array, n_layers: int, n_in: int, config: QuantConfig) -> QuantizedWeight:
    """W `[*L, *in, *out]` (n_layers leading layer axes, then n_in input axes) → its `QuantizedWeight`."""
    shape = tuple(w.shape)
    lead, in_shape, out_shape = shape[:n_layers], shape[n_layers:n_layers + n_in], shape[n_layers + n_in:]
    fan_in = math.prod(in_shape)
    flat = w.astype(jnp.float32).reshape(lead + (fan_in,) + out_shape)
    common = dict(kind=config.base, in_shape=in_shape, out_shape=out_shape, block_size=config.block_size)
    if config.base == "int8":
        scale = jnp.max(jnp.abs(flat), axis=n_layers) / 127.0
        codes = jnp.round(flat / jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), n_layers))
        return QuantizedWeight(codes=jnp.clip(codes, -127, 127).astype(jnp.int8), scales=scale, **common)
    block = config.block_size
    blocks = flat.reshape(lead + (fan_in // block, block) + out_shape)
    absmax = jnp.max(jnp.abs(blocks), axis=n_layers + 1)
    normalised = blocks / jnp.expand_dims(jnp.where(absmax > 0, absmax, 1.0), n_layers + 1)
    index = nf4_index(normalised).reshape(lead + (fan_in // 2, 2) + out_shape)
    codes = (index[(slice(None),) * (n_layers + 1) + (0,)]
             | (index[(slice(None),) * (n_layers + 1) + (1,)] << 4)).astype(jnp.uint8)
    if not config.double_quant:
        return QuantizedWeight(codes=codes, scales=absmax, **common)
    scales, scales_scale, offset = _double_quantize(absmax, n_layers)
    return QuantizedWeight(codes=codes, scales=scales, scales_scale=scales_scale, scales_offset=offset, **common)


def nf4_index(normalised: jax.Array) -> jax.Array:
    """The index of the nearest NF4 level to each value in [−1, 1] (uint8): the levels' midpoints as bin edges."""
    code = np.asarray(NF4_CODE, np.float32)
    edges = jnp.asarray((code[1:] + code[:-1]) / 2)
    return jnp.searchsorted(edges, normalised.astype(jnp.float32), side="left").astype(jnp.uint8)


def _double_quantize(absmax: jax.Array, n_layers: int):
    """(int8 codes shaped like `absmax`, f32 second-level scales [*L, n_blocks], f32 offsets [*L]) per layer."""
    lead = absmax.shape[:n_layers]
    flat = absmax.reshape(lead + (-1,))
    n = flat.shape[-1]
    offset = jnp.mean(flat, axis=-1)
    centred = flat - offset[..., None]
    padded = jnp.pad(centred, [(0, 0)] * n_layers + [(0, -n % DOUBLE_QUANT_BLOCK)])
    blocks = padded.reshape(lead + (-1, DOUBLE_QUANT_BLOCK))
    scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
    codes = jnp.round(blocks / jnp.where(scale > 0, scale, 1.0)[..., None])
    codes = jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(lead + (-1,))[..., :n]
    return codes.reshape(absmax.shape), scale, offset


def quantized_logical_axes(logical_axes: tuple, abstract: QuantizedWeight) -> QuantizedWeight:
    """The logical axes of a quantized weight's arrays, as a `QuantizedWeight` of tuples with `abstract`'s static
    fields: the flattened input axis takes W's first input axis name (codes shard like W); the nf4 block axis and
    the double-quantisation arrays are not sharded."""
    n_out, n_in = len(abstract.out_shape), len(abstract.in_shape)
    n_layers = len(logical_axes) - n_in - n_out
    layers, inputs, outputs = (tuple(logical_axes[:n_layers]), tuple(logical_axes[n_layers:n_layers + n_in]),
                               tuple(logical_axes[n_layers + n_in:]))
    codes = layers + inputs[:1] + outputs
    if abstract.kind == "int8":
        return abstract.replace(codes=codes, scales=layers + outputs)
    scales = layers + (None,) + outputs
    if abstract.scales_scale is None:
        return abstract.replace(codes=codes, scales=scales)
    return abstract.replace(codes=codes, scales=scales, scales_scale=layers + (None,), scales_offset=layers)


# --- whole parameter trees -------------------------------------------------------------------------------------


def _quantized_paths(logical: Any) -> dict[str, tuple[int, int]]:
    """{path: (n_layers, n_in)} of the weights a quantized base stores quantized: the linear weights (LoRA's rule,
    `lora.linear_layout`) of the scanned layers."""
    out = {}
    for path, axes in lora.flatten_paths(logical).items():
        layout = lora.linear_layout(axes)
        if layout is not None and layout.layer_axes:
            out[path] = (len(layout.layer_axes), len(layout.input_axes))
    return out


def quantize_tree(params: Any, logical: Any, config: QuantConfig) -> Any:
    """`params` with the scanned layers' linear weights quantized (the rest as they are)."""
    flat = lora.flatten_paths(params)
    updated = {path: quantize(flat[path], n_layers, n_in, config)
               for path, (n_layers, n_in) in _quantized_paths(logical).items()}
    return lora.replace_at_paths(params, updated)


def abstract_quantized_tree(abstract: Any, logical: Any, config: QuantConfig) -> tuple[Any, Any]:
    """(abstract params, logical axes) of `quantize_tree`'s output, checking every weight can be quantized."""
    flat_abstract, flat_logical = lora.flatten_paths(abstract), lora.flatten_paths(logical)
    new_abstract, new_logical = {}, {}
    for path, (n_layers, n_in) in _quantized_paths(logical).items():
        check_quantizable(path, tuple(flat_abstract[path].shape), n_layers, n_in, config)
        quantized = jax.eval_shape(lambda w, n_layers=n_layers, n_in=n_in: quantize(w, n_layers, n_in, config),
                                   flat_abstract[path])
        new_abstract[path] = quantized
        new_logical[path] = quantized_logical_axes(flat_logical[path], quantized)
    return lora.replace_at_paths(abstract, new_abstract), lora.replace_at_paths(logical, new_logical)


def dequantize_tree(params: Any, dtype=jnp.float32) -> Any:
    """Every `QuantizedWeight` of a tree replaced by its float matrix."""
    return jax.tree.map(lambda w: w.materialize(dtype) if isinstance(w, QuantizedWeight) else w, params,
                        is_leaf=lambda w: isinstance(w, QuantizedWeight))


class LayerwiseQuantizer:
    """Quantizes a base as it is read, one layer of one weight at a time, so that the float32 base never exists on
    the devices: `hf.load_pretrained(..., quantizer=…)` hands each stacked layer weight over as `layer(i)` (a numpy
    array `[*in, *out]`); that layer is quantized on the default device, brought back to the host, and the stacked
    codes and scales are placed into their shardings. Weights a quantized base keeps in float32 (embedding, norms)
    are left to the caller (None)."""

    def __init__(self, config: QuantConfig, float_logical: Any, shardings: Any):
        self.config, self.shardings = config, lora.flatten_paths(shardings)
        self.paths = _quantized_paths(float_logical)
        self._quantize = {}  # (n_in, shape) -> jitted quantize of one layer

    def __call__(self, path: str, layer: Callable[[int], np.ndarray], n_layers: int) -> QuantizedWeight | None:
        if path not in self.paths:
            return None
        _, n_in = self.paths[path]
        pieces = [jax.device_get(self._jitted(n_in, layer(i))) for i in range(n_layers)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *pieces)
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), stacked,
                            self.shardings[path])

    def stacked(self, path: str, w: jax.Array) -> QuantizedWeight | None:
        """A whole stacked weight `[L, *in, *out]` (already on the devices) quantized into its shardings, or None
        for a weight kept in float32: for sources read one weight at a time rather than one layer at a time."""
        if path not in self.paths:
            return None
        n_layers, n_in = self.paths[path]
        return jax.jit(lambda w: quantize(w, n_layers, n_in, self.config), out_shardings=self.shardings[path])(w)

    def _jitted(self, n_in: int, w: np.ndarray):
        key = (n_in, w.shape)
        if key not in self._quantize:
            self._quantize[key] = jax.jit(lambda w: quantize(w, 0, n_in, self.config))
        return self._quantize[key](w)


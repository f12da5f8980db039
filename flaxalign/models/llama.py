"""A Llama-family decoder in Flax NNX (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM), and the pieces other families
build on (`models.families`; Gemma subclasses the norm, MLP, layer and `CausalLM` in `models/gemma.py`).

Layers are stacked along a leading "layers" axis and run with `jax.lax.scan`, so compile time does not grow with
depth (except `decode` from per-layer weights, `CausalLM.decoding_layers`, which unrolls the layers). Every
parameter carries `logical_axes` metadata that `flaxalign.sharding` maps onto the mesh. Parameters are float32;
computation runs in `config.dtype` (norms, softmax and RoPE in float32).

The module returns final hidden states; the LM head is applied by the loss in chunks (`flaxalign.losses.lm`) so
that `[B, T, V]` float32 logits never exist at once during training.

A linear weight may be a plain array or an object that computes its own product — `dense(x, dtype)` and
`materialize(dtype)`, e.g. LoRA in activation space or a quantized frozen base (`flaxalign.peft.adapted`); `dense`
and `unembedding` ask it (`models/linear.py`). The layer scan slices either kind per layer, so PEFT needs nothing
else from the model.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flaxalign.models import adapters, remat
from flaxalign.models.attention import Masking, attend, single_query
from flaxalign.models.config import ModelConfig
from flaxalign.models.linear import dense, materialize
from flaxalign.models.lm_head import LMHead
from flaxalign.models.tensors import HFTensor, heads, identity, swapped, transpose, vector
from flaxalign.sharding import constrain

BATCH_LENGTH_EMBED = ("act_batch", "act_length", "act_embed")


def _param(rngs: nnx.Rngs, shape, std, logical_axes, stack=()):
    """A normally initialised parameter; `stack` prepends the scanned layer dimension."""
    value = std * jax.random.normal(rngs.params(), tuple(stack) + tuple(shape), jnp.float32)
    return nnx.Param(value, logical_axes=("layers",) * len(stack) + tuple(logical_axes))


def _const_param(value, shape, logical_axes, stack=()):
    return nnx.Param(jnp.full(tuple(stack) + tuple(shape), value, jnp.float32),
                     logical_axes=("layers",) * len(stack) + tuple(logical_axes))


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in float32; the weight is `scale` (initialised to 1)."""

    initial_scale = 1.0

    def __init__(self, dim: int, eps: float, *, stack=()):
        self.eps = eps
        self.scale = _const_param(self.initial_scale, (dim,), ("norm",), stack)

    def weight(self):
        return self.scale[...]

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight()).astype(x.dtype)


def rope_frequencies(config: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies θ^(-2i/d), with Llama-3.1 wavelength-dependent scaling when configured. `local`: those of
    windowed layers when `rope_local_theta` gives them a base of their own (then plain, unscaled)."""
    dim = config.head_dim
    if local and config.rope_local_theta:
        return 1.0 / (config.rope_local_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if config.rope_scaling_factor:
        factor = config.rope_scaling_factor
        low_wavelen = config.rope_original_max_len / config.rope_low_freq_factor
        high_wavelen = config.rope_original_max_len / config.rope_high_freq_factor
        wavelen = 2 * jnp.pi / inv_freq
        smooth = ((config.rope_original_max_len / wavelen - config.rope_low_freq_factor)
                  / (config.rope_high_freq_factor - config.rope_low_freq_factor))
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = jnp.where(wavelen > low_wavelen, inv_freq / factor,
                             jnp.where(wavelen < high_wavelen, inv_freq, smoothed))
    return inv_freq


def rope_cos_sin(positions_BxT, config: ModelConfig, local: bool = False):
    angles = positions_BxT.astype(jnp.float32)[..., None] * rope_frequencies(config, local)
    angles = jnp.concatenate([angles, angles], axis=-1)  # HF "rotate_half" layout
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _rope_tables(positions_BxT, config: ModelConfig):
    """(cos, sin) of full-attention layers and of windowed ones (the same tables unless `rope_local_theta`)."""
    full = rope_cos_sin(positions_BxT, config)
    return full, rope_cos_sin(positions_BxT, config, local=True) if config.rope_local_theta else full


def _layer_rope(tables, window, layer_window):
    """The (cos, sin) of one layer: chosen statically when every layer has the same `window`, else from its traced
    `layer_window` (0 = full attention)."""
    full, local = tables
    if local is full:
        return full
    if layer_window is None:
        return local if window else full
    return jax.tree.map(lambda f, w: jnp.where(layer_window > 0, w, f), full, local)


def apply_rope(x_BxTxNxH, cos, sin):
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    """GQA self-attention with RoPE; q/k/v biases and per-head q/k norms (`norm`) when configured."""

    norm = RMSNorm

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, stack=()):
        c = config
        self.config = c
        self.q = _param(rngs, (c.d_model, c.n_heads, c.head_dim), c.init_std, ("embed", "heads", "head_dim"), stack)
        self.k = _param(rngs, (c.d_model, c.n_kv_heads, c.head_dim), c.init_std,
                        ("embed", "kv_heads", "head_dim"), stack)
        self.v = _param(rngs, (c.d_model, c.n_kv_heads, c.head_dim), c.init_std,
                        ("embed", "kv_heads", "head_dim"), stack)
        self.o = _param(rngs, (c.n_heads, c.head_dim, c.d_model), c.init_std, ("heads", "head_dim", "embed"), stack)
        if c.qkv_bias:
            self.q_bias = _const_param(0.0, (c.n_heads, c.head_dim), ("heads", "head_dim"), stack)
            self.k_bias = _const_param(0.0, (c.n_kv_heads, c.head_dim), ("kv_heads", "head_dim"), stack)
            self.v_bias = _const_param(0.0, (c.n_kv_heads, c.head_dim), ("kv_heads", "head_dim"), stack)
        if c.qk_norm:
            self.q_norm = self.norm(c.head_dim, c.rms_eps, stack=stack)
            self.k_norm = self.norm(c.head_dim, c.rms_eps, stack=stack)

    def __call__(self, x_BxTxD, cos, sin, masking: Masking, kv_cache=None):
        """Self-attention over the T positions of `x`, keys visible per `masking`; with `kv_cache = (k, v, index,
        layer, span)` (the whole stacked cache, `[L, B, K, S, H]` each, S the cache length) the new keys/values are
        written at slots index…index+T−1 of `layer` and the queries attend to that layer's first `span` slots (the
        filled prefix; `masking.k_valid` is `[B, span]`); then returns (out, (k, v)), the stacked cache updated.
        The stack (not a layer's slice) goes in and out so that the write is one in-place update of the loop-carried
        buffer, not a copy of the cache per token (`CausalLM.decode`); a decoding step (T = 1) reads the heads-first
        cache as it lies (`attention.single_query`)."""
        c = self.config
        b, t, d = x_BxTxD.shape
        dtype = x_BxTxD.dtype
        # Matmuls on [B·T, D] rows: XLA CPU runs the weight gradients of 2-D dots ~1.5x faster than of 3-D einsums.
        x_NxD = x_BxTxD.reshape(b * t, d)
        q = dense(x_NxD, self.q[...], dtype).reshape(b, t, c.n_heads, c.head_dim)
        k = dense(x_NxD, self.k[...], dtype).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = dense(x_NxD, self.v[...], dtype).reshape(b, t, c.n_kv_heads, c.head_dim)
        if c.qkv_bias:
            q, k, v = (q + self.q_bias[...].astype(dtype), k + self.k_bias[...].astype(dtype),
                       v + self.v_bias[...].astype(dtype))
        if c.qk_norm:
            q, k = remat.keep("attn_qk_proj", q, k)
            q, k = self.q_norm(q), self.k_norm(k)
        # scores q·k / √query_pre_attn_scalar (Gemma) where `attend` divides by √head_dim: q is rotated by tables
        # scaled by √(head_dim / scalar), in float32 (RoPE is linear in cos and sin)
        q_scale = (c.head_dim / c.query_pre_attn_scalar) ** 0.5 if c.query_pre_attn_scalar else 1.0
        q_cos, q_sin = (cos, sin) if q_scale == 1.0 else (cos * q_scale, sin * q_scale)
        q = constrain(apply_rope(q, q_cos, q_sin), ("act_batch", "act_length", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("act_batch", "act_length", "act_kv_heads", None))
        out = None
        if kv_cache is not None:
            cache_k, cache_v, index, layer, span = kv_cache
            start = (layer, 0, 0, index, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, jnp.swapaxes(k, 1, 2).astype(cache_k.dtype)[None], start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, jnp.swapaxes(v, 1, 2).astype(cache_v.dtype)[None], start)
            prefix = (1,) + cache_k.shape[1:3] + (span, cache_k.shape[4])
            k, v = (jax.lax.dynamic_slice(cache, (layer, 0, 0, 0, 0), prefix)[0].astype(dtype)  # [B, K, span, H]
                    for cache in (cache_k, cache_v))
            if t == 1:
                out = single_query(q[:, 0], k, v, masking, softcap=c.attn_softcap)[:, None]
            else:  # the prefill attends like training, over [B, S, K, H]
                k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        if out is None:
            out = attend(q, k.astype(dtype), v.astype(dtype), masking, impl=c.attention, softcap=c.attn_softcap,
                         windows=tuple(sorted(set(c.layer_windows()))))
        out = dense(out.reshape(b * t, c.n_heads * c.head_dim), self.o[...], dtype, n_in=2).reshape(b, t, d)
        return out if kv_cache is None else (out, (cache_k, cache_v))


class MLP(nnx.Module):
    """Gated MLP: down(act(gate·x) ⊙ up·x), SwiGLU with `act` = silu."""

    act = staticmethod(jax.nn.silu)

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, stack=()):
        c = config
        self.gate = _param(rngs, (c.d_model, c.d_ff), c.init_std, ("embed", "mlp"), stack)
        self.up = _param(rngs, (c.d_model, c.d_ff), c.init_std, ("embed", "mlp"), stack)
        self.down = _param(rngs, (c.d_ff, c.d_model), c.init_std, ("mlp", "embed"), stack)

    def __call__(self, x_BxTxD):
        b, t, d = x_BxTxD.shape
        dtype = x_BxTxD.dtype
        x_NxD = x_BxTxD.reshape(b * t, d)
        gate = remat.keep("mlp_gate", dense(x_NxD, self.gate[...], dtype))
        up = remat.keep("mlp_up", dense(x_NxD, self.up[...], dtype))
        hidden = constrain(gated(self.act, gate, up), ("act_batch", "act_mlp"))
        return dense(hidden, self.down[...], dtype).reshape(b, t, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(act, gate, up):
    """act(gate) ⊙ up, whose backward pass keeps only gate and up: autodiff would also keep act(gate) and the
    activation's inner terms (sigmoid, products), each [N, d_ff] per layer, which the backward recomputes for free."""
    return act(gate) * up


def _gated_fwd(act, gate, up):
    return act(gate) * up, (gate, up)


def _gated_bwd(act, residuals, d_hidden):
    gate, up = residuals
    activated, act_vjp = jax.vjp(act, gate)
    return act_vjp(d_hidden * up)[0], d_hidden * activated


gated.defvjp(_gated_fwd, _gated_bwd)


def _no_adapter(site, h):
    return h


class DecoderLayer(nnx.Module):
    """x ← x + A_attn(post_attn(attn(norm(x)))); x ← x + A_mlp(post_mlp(mlp(norm(x)))), where A is the active
    bottleneck adapter at that site (`models.adapters`) or the identity, and the post-sub-layer maps are the identity
    here (Gemma's norms them). A family swaps its pieces through `norm`, `attention` and `mlp_class`."""

    norm = RMSNorm
    attention = Attention
    mlp_class = MLP

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, stack=()):
        self.attn_norm = self.norm(config.d_model, config.rms_eps, stack=stack)
        self.attn = self.attention(config, rngs, stack=stack)
        self.mlp_norm = self.norm(config.d_model, config.rms_eps, stack=stack)
        self.mlp = self.mlp_class(config, rngs, stack=stack)
        self.active_adapter = config.active_adapter  # static: switching sets retraces, the params stay the same
        if config.adapter_placement != "none":
            self.adapters = adapters.adapter_sets(config, rngs, stack=stack)

    def __call__(self, x_BxTxD, cos, sin, masking: Masking, kv_cache=None):
        # No active set (the base model) traces exactly the plain layer's ops: adapters cost nothing when off.
        adapter = self.adapters[self.active_adapter] if self.active_adapter else _no_adapter
        attn = self.attn(self.attn_norm(x_BxTxD), cos, sin, masking, kv_cache)
        attn, new_cache = attn if kv_cache is not None else (attn, None)
        x = remat.keep("layer_mid", x_BxTxD + adapter("attn", self.post_attn(attn)))
        x = x + adapter("mlp", self.post_mlp(self.mlp(self.mlp_norm(x))))
        x = constrain(x, BATCH_LENGTH_EMBED)
        return x if kv_cache is None else (x, new_cache)

    def post_attn(self, x):
        return x

    def post_mlp(self, x):
        return x


def _layer_windows(config: ModelConfig):
    """(the window every layer shares, None) — a static value the attention kernels can specialise on — or
    (None, the per-layer windows `[L]` for the layer scan) when layers differ."""
    windows = config.layer_windows()
    if len(set(windows)) == 1:
        return windows[0], None
    return None, jnp.asarray(windows, jnp.int32)


class CausalLM(nnx.Module):
    """Token embedding → L scanned decoder layers → final RMSNorm. `output_head()` gives the LM head (`LMHead`).

    Every family's model is this class or a subclass with its own `layer` class, `norm` class and `embed_tokens`
    (`models.families`): the interface below — `__call__`, `init_cache`, `decode`, `unembedding`, `output_head`,
    `logits` — and the param tree's linear weights (`layers/attn/{q,k,v,o}`, `layers/mlp/{gate,up,down}`, `embed`,
    `lm_head`) are the same for all, so stages, LoRA / QLoRA, the sampler and `plan` need nothing per family."""

    layer = DecoderLayer
    norm = RMSNorm

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.d_model), c.init_std, ("vocab", "embed"))
        self.layers = self.layer(c, rngs, stack=(c.n_layers,))
        self.final_norm = self.norm(c.d_model, c.rms_eps)
        if not c.tie_embeddings:
            self.lm_head = _param(rngs, (c.d_model, c.vocab_size), c.init_std, ("embed", "vocab"))

    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        """Final hidden states `[B, T, D]`."""
        c = self.config
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x = constrain(self.embed_tokens(tokens_BxT), BATCH_LENGTH_EMBED)
        tables = _rope_tables(positions_BxT, c)
        masking = Masking(q_segments=segment_ids_BxT, k_segments=segment_ids_BxT)
        graphdef, stacked = nnx.split(self.layers)
        window, windows = _layer_windows(c)

        def layer_step(x, xs):
            layer_params, layer_window = xs
            layer_masking = masking._replace(window=window if windows is None else layer_window)
            cos, sin = _layer_rope(tables, window, layer_window)
            return nnx.merge(graphdef, layer_params)(x, cos, sin, layer_masking), None

        layer_step = remat.wrap(layer_step, c.remat)

        if c.scan_layers:
            x, _ = jax.lax.scan(layer_step, x, (stacked, windows))
        else:  # unrolled: compile time grows with depth, but XLA CPU schedules the backward pass better
            for i in range(c.n_layers):
                x, _ = layer_step(x, jax.tree.map(lambda w: w[i], (stacked, windows)))
        return self.final_norm(x)

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache for `decode`: `k`, `v` of shape `[L, B, K, S, H]` (heads first: a decoding step reads
        it in place) in `dtype` (None: the compute dtype; keys and values are rounded to it as they are written and
        read back in the compute dtype)."""
        c = self.config
        shape = (c.n_layers, batch, c.n_kv_heads, length, c.head_dim)
        dtype = c.dtype if dtype is None else dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def decoding_layers(self, unstacked: bool = False):
        """(graphdef, the layer weights `decode` reads): the stacked state, which the layer scan slices one layer at
        a time, or with `unstacked` a list of per-layer states sliced here, once. XLA CPU copies a scanned layer's
        weights out of the stack at every decoding step (a third of the op time of a `small` step); slicing them
        once, outside the decoding loop, costs a second copy of the layer weights while sampling (`sampler`)."""
        graphdef, stacked = nnx.split(self.layers)
        if not unstacked:
            return graphdef, stacked
        return graphdef, [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(self.config.n_layers)]

    def decode(self, tokens_BxT, positions_BxT, cache: dict, index, key_mask_BxS, span: int | None = None,
               layers=None):
        """Runs T new tokens at cache slots index…index+T−1 (T = the prompt for prefill, 1 per decode step) and
        returns (final hidden states `[B, T, D]`, the updated cache). Query t attends to slot s when
        `key_mask[b, s]` (a real token, already written or written now), s ≤ index + t and, with a window W,
        index + t − s < W (the real tokens of a row sit in consecutive slots). RoPE uses `positions`, so left padding
        (masked slots) does not shift the real tokens' positions. Attention reads only the first `span` slots
        (static; None = all S): the caller promises index + T ≤ span, so the slots left out are empty. `layers`:
        `decoding_layers()`, computed once by a caller that decodes in a loop (None: the stacked layers)."""
        c = self.config
        x = constrain(self.embed_tokens(tokens_BxT), BATCH_LENGTH_EMBED)
        tables = _rope_tables(positions_BxT, c)
        span = key_mask_BxS.shape[1] if span is None else span
        masking = Masking(q_start=index, k_valid=key_mask_BxS[:, :span])
        graphdef, layer_params = self.decoding_layers() if layers is None else layers

        # The cache rides in the scan's carry and each layer writes its new slots in place: as scanned inputs and
        # outputs, the whole [L, B, S, K, H] cache would be read and written again at every token.
        def layer_step(carry, params, window, layer_window, layer):
            x, cache_k, cache_v = carry
            layer_masking = masking._replace(window=window if layer_window is None else layer_window)
            cos, sin = _layer_rope(tables, window, layer_window)
            x, (cache_k, cache_v) = nnx.merge(graphdef, params)(x, cos, sin, layer_masking,
                                                                (cache_k, cache_v, index, layer, span))
            return x, cache_k, cache_v

        carry = (x, cache["k"], cache["v"])
        if isinstance(layer_params, list):  # static windows and layer indices
            for layer, (params, window) in enumerate(zip(layer_params, c.layer_windows())):
                carry = layer_step(carry, params, window, None, layer)
        else:
            window, windows = _layer_windows(c)
            layers_L = jnp.arange(c.n_layers, dtype=jnp.int32)
            carry, _ = jax.lax.scan(lambda carry, xs: (layer_step(carry, xs[0], window, *xs[1:]), None), carry,
                                    (layer_params, windows, layers_L))
        x, new_k, new_v = carry
        return self.final_norm(x), {"k": new_k, "v": new_v}

    def embed_tokens(self, tokens_BxT):
        """The token embeddings `[B, T, D]` in the compute dtype."""
        return jnp.take(self.embed[...].astype(self.config.dtype), tokens_BxT, axis=0)

    def unembedding(self):
        """The raw LM-head matrix `[D, V]` in the compute dtype (the transposed embedding when tied). Logits are
        computed through `output_head()`, which adds the family's numerics (a final soft cap)."""
        if self.config.tie_embeddings:
            return self.embed[...].T.astype(self.config.dtype)
        return materialize(self.lm_head[...], self.config.dtype)

    def output_head(self) -> LMHead:
        """The LM-head object (`models.lm_head`): `output_head().logits(hidden)` = the float32 next-token logits,
        soft-capped by `final_softcap` (Gemma 2). Every consumer — losses, sampler, on-policy log-probs, evaluation
        — computes logits through it."""
        if self.config.tie_embeddings:
            embed = self.embed[...].astype(self.config.dtype)
            return LMHead(embed, softcap=self.config.final_softcap, transposed=True)
        return LMHead(self.unembedding(), softcap=self.config.final_softcap)

    def logits(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        """Full float32 logits `[B, T, V]`: for evaluation and tests, not for training steps."""
        return self.output_head().logits(self(tokens_BxT, positions_BxT, segment_ids_BxT))


# --- the HF tensor table (`models.tensors`) ---------------------------------------------------------------------


def global_tensors(config: ModelConfig, score: bool = False) -> list[HFTensor]:
    """Embedding, final norm and the output layer: the LM head, or with `score` a reward model's score row (at
    params path ("score",), shape [D])."""
    d, v = config.d_model, config.vocab_size
    specs = [HFTensor("model.embed_tokens.weight", ("embed",), (v, d), identity, identity, identity),
             vector("model.norm.weight", ("final_norm", "scale"), d)]
    if score:
        specs.append(HFTensor("score.weight", ("score",), (1, d), lambda w: w[0], lambda k: k[None],
                              lambda ix: (slice(None), ix[0])))
    elif not config.tie_embeddings:
        specs.append(HFTensor("lm_head.weight", ("lm_head",), (v, d), transpose, transpose, swapped))
    return specs


def layer_tensors(config: ModelConfig, norms: tuple[tuple[str, str], ...] = (
        ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))) -> list[HFTensor]:
    """The tensors of layer `{i}`, in HF order (q, k, v, o, gate, up, down, the layer norms — `norms`: (HF name,
    flax name) pairs —, then q/k/v biases and q/k norms)."""
    d, f, hd = config.d_model, config.d_ff, config.head_dim
    h, k = config.n_heads, config.n_kv_heads

    def in_proj(name: str, n: int) -> HFTensor:  # flax [D, n, hd] from HF [n·hd, D]
        return HFTensor(f"model.layers.{{i}}.self_attn.{name}_proj.weight", ("attn", name), (n * hd, d),
                        lambda w: w.T.reshape(w.shape[1], -1, hd), lambda p: p.reshape(d, n * hd).T,
                        lambda ix: (heads(ix[1], hd), ix[0]))

    def bias(name: str, n: int) -> HFTensor:  # flax [n, hd] from HF [n·hd]
        return HFTensor(f"model.layers.{{i}}.self_attn.{name}_proj.bias", ("attn", f"{name}_bias"), (n * hd,),
                        lambda b: b.reshape(-1, hd), lambda p: p.reshape(n * hd), lambda ix: (heads(ix[0], hd),))

    def mlp(name: str, hf_shape: tuple[int, int]) -> HFTensor:
        return HFTensor(f"model.layers.{{i}}.mlp.{name}_proj.weight", ("mlp", name), hf_shape, transpose,
                        transpose, swapped)

    specs = [
        in_proj("q", h), in_proj("k", k), in_proj("v", k),
        HFTensor("model.layers.{i}.self_attn.o_proj.weight", ("attn", "o"), (d, h * hd),  # flax [H, hd, D]
                 lambda w: w.T.reshape(-1, hd, w.shape[0]), lambda p: p.reshape(h * hd, d).T,
                 lambda ix: (ix[2], heads(ix[0], hd))),
        mlp("gate", (f, d)), mlp("up", (f, d)), mlp("down", (d, f)),
    ]
    specs += [vector(f"model.layers.{{i}}.{hf_norm}.weight", (flax_norm, "scale"), d) for hf_norm, flax_norm in norms]
    if config.qkv_bias:
        specs += [bias("q", h), bias("k", k), bias("v", k)]
    if config.qk_norm:  # Qwen3, Gemma 3: one [head_dim] scale per layer, shared by the heads
        specs += [vector(f"model.layers.{{i}}.self_attn.{name}_norm.weight", ("attn", f"{name}_norm", "scale"), hd)
                  for name in ("q", "k")]
    return specs

"""Attention through the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`):
causal or local (sliding-window) masks, segment ids for packed rows, grouped-query heads and logit soft-capping,
never a [T, S] score matrix in HBM.

The kernel runs per device under `shard_map` (batch over the mesh's batch axes, heads over "tensor", as the
activation rules shard them) and per example under `vmap`. Its masks are static, so a window that differs from layer
to layer (a traced value inside the layer scan) selects among kernels built for each window the model uses
(`lax.switch`). What the kernel cannot take — decoding from a KV cache (a query offset and a key mask) or sequence
lengths that its 128-token blocks do not divide — runs blockwise instead. Any head size compiles (64 and 128 are
checked by AOT compiles for v5e).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from flaxalign import sharding

MIN_BLOCK = 128


def supported(q_BxTxNxH, k_BxSxKxH, masking) -> bool:
    """Whether the kernel can run these shapes and this masking (else the caller runs blockwise)."""
    t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    return (t % MIN_BLOCK == 0 and s % MIN_BLOCK == 0 and masking.k_valid is None
            and isinstance(masking.q_start, int) and masking.q_start == 0)


def _block(t: int, s: int) -> int:
    """The largest of 512 / 256 / 128 that divides both lengths (the kernel's blocks must tile them exactly)."""
    return next(b for b in (512, 256, MIN_BLOCK) if t % b == 0 and s % b == 0)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, t: int, s: int, window: int, softcap: float, interpret: bool):
    shape = (t, s)
    head_mask = (mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window
                 else mask_lib.CausalMask(shape))
    block = _block(t, s)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap or None,
                                      interpret=interpret)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking, *, softcap: float = 0.0, windows: tuple[int, ...] = (),
           interpret: bool = False):
    """Splash attention of [B, T, N, H] queries over [B, S, K, H] keys/values (module docstring). `windows`: the
    static window sizes `masking.window` can take when it is traced (per-layer windows)."""
    from flaxalign.models import attention

    if not supported(q_BxTxNxH, k_BxSxKxH, masking):
        return attention.blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking, softcap=softcap)
    b, t, n, h = q_BxTxNxH.shape
    s = k_BxSxKxH.shape[1]
    k_BxSxKxH, v_BxSxKxH = attention.align_kv_heads(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    q = jnp.swapaxes(q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype), 1, 2)  # [B, N, T, H]
    k, v = jnp.swapaxes(k_BxSxKxH, 1, 2), jnp.swapaxes(v_BxSxKxH, 1, 2)
    segments = masking.q_segments
    if segments is None:
        segments = jnp.ones((b, t), jnp.int32)
    static = isinstance(masking.window, int)
    if not static and not windows:
        raise ValueError("splash.attend: a traced masking.window needs the static `windows` it can take")
    choices = (masking.window,) if static else tuple(windows)

    def per_device(q, k, v, q_seg, k_seg, window):
        runs = [functools.partial(_run, _kernel(q.shape[1], t, s, w, float(softcap), interpret)) for w in choices]
        if len(runs) == 1:
            return runs[0](q, k, v, q_seg, k_seg)
        index = jnp.argmax(jnp.asarray(choices) == window)
        return jax.lax.switch(index, runs, q, k, v, q_seg, k_seg)

    window = jnp.asarray(masking.window if not static else 0, jnp.int32)
    k_segments = masking.k_segments if masking.k_segments is not None else segments
    out = _sharded(per_device, q, k, v, segments, k_segments, window)
    return jnp.swapaxes(out, 1, 2).astype(q_BxTxNxH.dtype)


def _run(kernel, q, k, v, q_seg, k_seg):
    return jax.vmap(kernel)(q, k, v, kernel_lib.SegmentIds(q=q_seg, kv=k_seg))


def _sharded(fn, q, k, v, q_seg, k_seg, window):
    """`fn` per device under shard_map on the current mesh (batch over the batch axes, heads over "tensor", the kv
    heads already split like the query heads: `attention.align_kv_heads`), or directly without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, q_seg, k_seg, window)
    shape = sharding.mesh_shape_of(mesh)
    heads_q = sharding.logical_to_spec(("act_batch", "act_heads", None, None), q.shape, shape)
    heads_kv = sharding.logical_to_spec(("act_batch", "act_kv_heads", None, None), k.shape, shape)
    rows = sharding.logical_to_spec(("act_batch", None), q_seg.shape, shape)
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(fn, in_specs=(heads_q, heads_kv, heads_kv, rows, rows, spec()), out_specs=heads_q,
                         check_vma=False)(q, k, v, q_seg, k_seg, window)

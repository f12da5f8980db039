"""Attention: one entry point over several implementations, with masks described by ids and never built whole.

    attend(q, k, v, masking, impl=..., softcap=...) -> out      q [B, T, N, H], k/v [B, S, K, H] (GQA: K divides N)

Which keys a query sees (`Masking`): key column s ≤ query column (q_start + t) — causal over columns, the slots
of a row (token slots in training, where packed documents are told apart by segment ids and not by columns; cache
slots in decoding) —, the same segment id (packed rows), a valid key
(`k_valid`: real tokens of a left-padded KV cache) and, with a window W > 0, q_start + t − s < W (sliding-window
attention: each query sees itself and the W − 1 keys before it). Scores are soft-capped, s ← c·tanh(s / c), when
`softcap` > 0 (Gemma 2). Scores and softmax are float32.

Implementations (`model.attention`):
  xla        the dense reference: [B, N, T, S] scores and the mask from the ids in one piece (O(T·S) memory).
  blockwise  plain JAX flash attention: an online softmax over key blocks for each query block, key blocks
             entirely outside the causal / window band never visited (not even computed and thrown away), and a
             custom VJP whose backward recomputes each block from the saved log-sum-exp, so the memory is
             O(T · block) forward and backward. Works everywhere; the CPU default.
  splash     the Pallas TPU splash-attention kernel (causal, local windows, segment ids, GQA, soft-capping).
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` on a GPU, where its constraints hold (half
             precision, no soft cap, no KV-cache offset; unpacked right-padded rows as key lengths); blockwise
             otherwise.
  auto       splash on TPU, cudnn on GPU, blockwise on CPU.

A decoding step (one new query per row) does not go through `attend`: `single_query` reads the KV cache in its
heads-first `[B, K, S, H]` layout with the query heads grouped under their kv head — O(S) scores, and no copy of the
cache transposed, repeated per query head or padded — on every backend.
"""

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flaxalign import sharding
from flaxalign.models import remat
from flaxalign.models.config import LEGACY_ATTENTION as LEGACY

MASKED = -1e30  # a finite "minus infinity": a row with no visible key stays finite (its output is unused)


def default_block(length: int) -> int:
    """The blockwise block size for sequences of `length`: 256, 512 from 4096 tokens. Measured on this CPU
    (forward + backward of 2 × 8 heads of 64): larger blocks run their products faster and loop less, smaller
    ones skip more of the causal triangle — at 1024 tokens 256 beats 128 and 512, at 4096 512 beats 256 by 1.3×."""
    return 512 if length >= 4096 else 256


class Masking(NamedTuple):
    """Which keys each query sees (module docstring), as ids. `q_start` and `window` may be traced scalars."""

    q_start: Any = 0  # the column of the first query (0 in training, the cache index when decoding)
    q_segments: jax.Array | None = None  # [B, T]
    k_segments: jax.Array | None = None  # [B, S]
    k_valid: jax.Array | None = None  # [B, S] bool / 0-1
    window: Any = 0  # 0 = no window

    def allowed(self, q_cols, k_cols, q_rows: slice | None = None, k_rows: slice | None = None) -> jax.Array:
        """The [B or 1, Tq, Sk] visibility of queries at columns `q_cols` [Tq] to keys at `k_cols` [Sk]; `q_rows` /
        `k_rows` pick the matching rows of the per-row ids (dynamic slices of them, for a block)."""
        visible = (k_cols[None, :] <= q_cols[:, None])[None]
        visible &= (self.window <= 0) | ((q_cols[:, None] - k_cols[None, :]) < self.window)[None]
        if self.q_segments is not None:
            q_seg = self.q_segments if q_rows is None else q_rows(self.q_segments)
            k_seg = self.k_segments if k_rows is None else k_rows(self.k_segments)
            visible &= q_seg[:, :, None] == k_seg[:, None, :]
        if self.k_valid is not None:
            valid = self.k_valid if k_rows is None else k_rows(self.k_valid)
            visible &= (valid > 0)[:, None, :]
        return visible


def resolve(impl: str) -> str:
    """The implementation `impl` names on this backend ("auto" → splash / cudnn / blockwise)."""
    impl = LEGACY.get(impl, impl)
    if impl != "auto":
        return impl
    return {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend(), "blockwise")


_RECORDERS: list[set[str]] = []


@contextlib.contextmanager
def recording():
    """Collects the implementations that `attend` traces inside the block (after the static fallbacks: "splash"
    where the kernel takes the shapes, else "blockwise"; "cudnn" also covers its per-batch blockwise branch for
    packed rows), for `flaxalign plan` to report what it compiled. Blocks may nest."""
    chosen: set[str] = set()
    _RECORDERS.append(chosen)
    try:
        yield chosen
    finally:
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is chosen)]


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking: Masking, *, impl: str = "auto", softcap: float = 0.0,
           windows: tuple[int, ...] = (), block: int | None = None):
    """softmax(mask(cap(q·kᵀ/√H)))·v `[B, T, N, H]` in q's dtype (module docstring). `windows`: the static values
    a traced `masking.window` can take (per-layer windows), for kernels that specialise on it."""
    impl = resolve(impl)
    if impl == "splash":
        from flaxalign.models import splash  # Pallas TPU: imported only where it runs
        impl = "splash" if splash.supported(q_BxTxNxH, k_BxSxKxH, masking) else "blockwise"
    elif impl == "cudnn" and not _cudnn_applies(q_BxTxNxH, masking, softcap):
        impl = "blockwise"
    for recorder in _RECORDERS:
        recorder.add(impl)
    # `remat=minimal` keeps q, k, v as they come (k and v with their K heads, before any repeat or padding) and the
    # output: the dense one here, flash's inside `_flash_fwd`, a kernel's through `remat.KERNEL_FORWARDS`
    q_BxTxNxH = remat.keep("attn_q", q_BxTxNxH)
    k_BxSxKxH, v_BxSxKxH = remat.keep("attn_k", k_BxSxKxH), remat.keep("attn_v", v_BxSxKxH)
    if impl == "splash":
        return splash.attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking, softcap=softcap, windows=windows)
    if impl == "cudnn":
        return _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking)
    if impl == "xla":
        return remat.keep("attn_out", dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking, softcap=softcap))
    return blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking, softcap=softcap, block=block)


# --- dense: the reference ----------------------------------------------------------------------------------------


def _cap(scores, softcap: float):
    return softcap * jnp.tanh(scores / softcap) if softcap else scores


def _heads_first(x_BxTxKxH, groups: int):
    """[B, T, K, H] → [B, N, T, H] with each of the K heads repeated for its `groups` query heads (query head n
    reads kv head n // groups). XLA CPU runs these 4-D `bnqk` products ~2× faster than 5-D grouped ones."""
    x = jnp.swapaxes(x_BxTxKxH, 1, 2)
    return jnp.repeat(x, groups, axis=1) if groups > 1 else x


def dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking: Masking, *, softcap: float = 0.0):
    """The reference: all [B, N, T, S] scores at once, the mask built from the ids."""
    b, t, n, h = q_BxTxNxH.shape
    s = k_BxSxKxH.shape[1]
    groups = n // k_BxSxKxH.shape[2]
    q = jnp.swapaxes(q_BxTxNxH, 1, 2) * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)
    k, v = _heads_first(k_BxSxKxH, groups), _heads_first(v_BxSxKxH, groups)
    scores = _cap(jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32), softcap)
    visible = masking.allowed(masking.q_start + jnp.arange(t), jnp.arange(s))
    scores = jnp.where(visible[:, None], scores, MASKED)
    probs = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bnqk,bnkh->bnqh", probs, v), 1, 2).astype(q_BxTxNxH.dtype)


def single_query(q_BxNxH, k_BxKxSxH, v_BxKxSxH, masking: Masking, *, softcap: float = 0.0):
    """One new query per row against a KV cache laid out heads first, `[B, K, S, H]` (the decoder's, every backend):
    all [B, N, S] scores at once — O(S) memory, as a decoding step needs — with the query heads grouped under their
    kv head, so the cache is read in place: not transposed, repeated per query head or padded to blocks. `masking`
    as for `attend` (the query at column `q_start`). Returns `[B, N, H]` in q's dtype."""
    b, n, h = q_BxNxH.shape
    kv_heads, s = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    q = (q_BxNxH * jnp.asarray(h ** -0.5, q_BxNxH.dtype)).reshape(b, kv_heads, n // kv_heads, h)
    scores = _cap(jnp.einsum("bkgh,bksh->bkgs", q, k_BxKxSxH, preferred_element_type=jnp.float32), softcap)
    visible = masking.allowed(masking.q_start + jnp.arange(1), jnp.arange(s))  # [B or 1, 1, S]
    scores = jnp.where(visible[:, None], scores, MASKED)
    probs = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(v_BxKxSxH.dtype)
    out = jnp.einsum("bkgs,bksh->bkgh", probs, v_BxKxSxH)
    return out.reshape(b, n, h).astype(q_BxNxH.dtype)


# --- blockwise (flash attention in plain JAX) --------------------------------------------------------------------


class _Blocks(NamedTuple):
    """Static block structure: sizes, counts and the padded lengths."""
    bq: int
    bk: int
    nq: int
    nk: int


def _blocks(t: int, s: int, block: int) -> _Blocks:
    bq, bk = min(block, t), min(block, s)
    return _Blocks(bq, bk, -(-t // bq), -(-s // bk))


def _pad(x, axis: int, length: int):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _key_range(i, masking: Masking, blocks: _Blocks):
    """[first, last) key blocks that query block i can see: the causal band (nothing after its last query's
    column) and, with a window, nothing before its first query's window."""
    first_col = masking.q_start + i * blocks.bq
    last_col = first_col + blocks.bq - 1
    hi = jnp.minimum(blocks.nk, last_col // blocks.bk + 1)
    lo = jnp.where(masking.window > 0, jnp.maximum(0, (first_col - masking.window + 1) // blocks.bk), 0)
    return lo, jnp.maximum(hi, lo)


def _block_scores(q_blk, k, i, j, masking: Masking, blocks: _Blocks, softcap: float):
    """Scores of query block i against key block j, masked: [B, N, bq, bk] float32, and the raw (uncapped) scores
    for the backward of the soft cap."""
    k_blk = jax.lax.dynamic_slice_in_dim(k, j * blocks.bk, blocks.bk, axis=2)
    raw = jnp.einsum("bnqh,bnkh->bnqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    q_cols = masking.q_start + i * blocks.bq + jnp.arange(blocks.bq)
    k_cols = j * blocks.bk + jnp.arange(blocks.bk)
    visible = masking.allowed(q_cols, k_cols,
                              lambda x: jax.lax.dynamic_slice_in_dim(x, i * blocks.bq, blocks.bq, axis=1),
                              lambda x: jax.lax.dynamic_slice_in_dim(x, j * blocks.bk, blocks.bk, axis=1))
    return jnp.where(visible[:, None], _cap(raw, softcap), MASKED), raw, visible


def blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, masking: Masking, *, softcap: float = 0.0,
              block: int | None = None):
    """Flash attention (module docstring): O(T · block) memory, forward and backward; `block` None = the
    `default_block` of the longer of T and S."""
    b, t, n, h = q_BxTxNxH.shape
    s = k_BxSxKxH.shape[1]
    blocks = _blocks(t, s, block or default_block(max(t, s)))
    groups = n // k_BxSxKxH.shape[2]
    q = _pad(jnp.swapaxes(q_BxTxNxH, 1, 2) * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype), 2, blocks.nq * blocks.bq)
    k = _pad(_heads_first(k_BxSxKxH, groups), 2, blocks.nk * blocks.bk)
    v = _pad(_heads_first(v_BxSxKxH, groups), 2, blocks.nk * blocks.bk)
    masking = _padded_masking(masking, blocks, t, s)
    out = _flash(q, k, v, masking, blocks, softcap)[:, :, :t]
    out = jnp.swapaxes(out, 1, 2)
    return out.astype(q_BxTxNxH.dtype)


def _padded_masking(masking: Masking, blocks: _Blocks, t: int, s: int) -> Masking:
    """The ids padded to whole blocks; padded keys are invalid."""
    tp, sp = blocks.nq * blocks.bq, blocks.nk * blocks.bk
    valid = masking.k_valid
    if sp != s:
        valid = jnp.ones((1, s), jnp.int32) if valid is None else valid
        valid = _pad(valid.astype(jnp.int32), 1, sp)
    segs = masking.q_segments, masking.k_segments
    if segs[0] is not None:
        segs = _pad(segs[0], 1, tp), _pad(segs[1], 1, sp)
    return masking._replace(q_segments=segs[0], k_segments=segs[1], k_valid=valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, masking, blocks, softcap):
    return _flash_forward(q, k, v, masking, blocks, softcap)[0]


def _flash_forward(q, k, v, masking, blocks: _Blocks, softcap: float):
    """(out [B, N, Tp, H] in v's dtype, lse [B, N, Tp] float32) over query blocks, each with an online softmax
    over its visible key blocks."""

    def query_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * blocks.bq, blocks.bq, axis=2)
        shape = q_blk.shape[:3]

        def key_block(j, carry):
            m, l, acc = carry
            scores, _, _ = _block_scores(q_blk, k, i, j, masking, blocks, softcap)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * blocks.bk, blocks.bk, axis=2)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.exp(scores - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bnqk,bnkh->bnqh", p.astype(v.dtype), v_blk,
                                                            preferred_element_type=jnp.float32)
            return m_new, l, acc

        lo, hi = _key_range(i, masking, blocks)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (v.shape[-1],), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        l = jnp.maximum(l, 1e-30)  # a query block with no visible key block (possible only in padding)
        return (acc / l[..., None]).astype(v.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(query_block, jnp.arange(blocks.nq))  # [nq, B, N, bq, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(q.shape[:2] + (-1, v.shape[-1]))
    lse = jnp.moveaxis(lse, 0, 2).reshape(q.shape[:2] + (-1,))
    return out, lse


def _flash_fwd(q, k, v, masking, blocks, softcap):
    out, lse = _flash_forward(q, k, v, masking, blocks, softcap)
    out, lse = remat.keep("attn_out", out), remat.keep("attn_lse", lse)
    return out, (q, k, v, masking, out, lse)


def _flash_bwd(blocks, softcap, residuals, d_out):
    """FlashAttention-2's backward, block by block: p = exp(s − lse) recomputed, dv += pᵀ·do, dp = do·vᵀ,
    ds = p ⊙ (dp − Σ do ⊙ o) (times 1 − tanh² through a soft cap), dq += ds·k, dk += dsᵀ·q."""
    q, k, v, masking, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, N, Tp]

    def query_block(i, carry):
        dq, dk, dv = carry
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * blocks.bq, blocks.bq, axis=2)
        do_blk = jax.lax.dynamic_slice_in_dim(d_out, i * blocks.bq, blocks.bq, axis=2)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * blocks.bq, blocks.bq, axis=2)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * blocks.bq, blocks.bq, axis=2)

        def key_block(j, inner):
            dq_blk, dk, dv = inner
            scores, raw, visible = _block_scores(q_blk, k, i, j, masking, blocks, softcap)
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * blocks.bk, blocks.bk, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * blocks.bk, blocks.bk, axis=2)
            p = jnp.exp(scores - lse_blk[..., None])
            dv_blk = jnp.einsum("bnqk,bnqh->bnkh", p.astype(do_blk.dtype), do_blk,
                                preferred_element_type=jnp.float32)
            dp = jnp.einsum("bnqh,bnkh->bnqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None])
            if softcap:
                ds = ds * (1.0 - jnp.square(jnp.tanh(raw / softcap)))
            ds = jnp.where(visible[:, None], ds, 0.0)
            dq_blk = dq_blk + jnp.einsum("bnqk,bnkh->bnqh", ds.astype(k.dtype), k_blk,
                                         preferred_element_type=jnp.float32)
            dk_blk = jnp.einsum("bnqk,bnqh->bnkh", ds.astype(q.dtype), q_blk, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * blocks.bk, blocks.bk, axis=2) + dk_blk, j * blocks.bk, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * blocks.bk, blocks.bk, axis=2) + dv_blk, j * blocks.bk, 2)
            return dq_blk, dk, dv

        lo, hi = _key_range(i, masking, blocks)
        dq_blk, dk, dv = jax.lax.fori_loop(lo, hi, key_block,
                                           (jnp.zeros(q_blk.shape, jnp.float32), dk, dv))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i * blocks.bq, axis=2)
        return dq, dk, dv

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.lax.fori_loop(0, blocks.nq, query_block, zeros)
    no_grads = jax.tree.map(lambda x: None if x is None else _zero_cotangent(x), masking)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grads


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- cuDNN ----------------------------------------------------------------------------------------------------


def _cudnn_applies(q, masking: Masking, softcap: float) -> bool:
    """cuDNN's fused attention takes causal masks, sequence lengths and one local window, in half precision, with
    heads of ≤ 128; not key masks, query offsets (decoding), per-layer windows (a traced window) or a soft cap.
    Segment ids are mapped to lengths where the rows allow it (`_cudnn`)."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and not softcap
            and isinstance(masking.window, int) and isinstance(masking.q_start, int) and masking.q_start == 0
            and masking.k_valid is None and q.shape[-1] <= 128)


def _cudnn(q, k, v, masking: Masking, *, implementation: str = "cudnn"):
    """cuDNN attention. Training rows carry segment ids; where every row holds one document followed by right
    padding (ids 1…1 0…0: SFT and preference rows that are not packed) they become query and key lengths, which
    cuDNN takes, and packed rows run blockwise (`lax.cond`: a GPU runs one branch). Outputs at padding queries are
    zero (never read: losses mask them, and causal attention keeps real queries from seeing them). Where the mesh
    splits query heads over "tensor" but not the kv heads, the kv heads are repeated first (`align_kv_heads`).
    `implementation` = "xla" runs the same call on any backend (the CPU test of this mapping)."""
    window = (masking.window - 1, 0) if masking.window else None
    k, v = align_kv_heads(q, k, v)
    call = functools.partial(jax.nn.dot_product_attention, is_causal=True, local_window_size=window,
                             implementation=implementation)
    if masking.q_segments is None:
        return call(q, k, v)
    segments = masking.q_segments
    if segments.shape != masking.k_segments.shape:
        return blockwise(q, k, v, masking)
    lengths = jnp.sum(segments > 0, axis=1, dtype=jnp.int32)
    one_document = (jnp.all(segments == (jnp.arange(segments.shape[1]) < lengths[:, None]))
                    & jnp.all(segments == masking.k_segments))

    def by_lengths(q, k, v):
        clamped = jnp.maximum(lengths, 1)  # an all-padding row: one key, so no query row is empty
        out = call(q, k, v, query_seq_lengths=clamped, key_value_seq_lengths=clamped)
        return jnp.where((segments > 0)[:, :, None, None], out, jnp.zeros((), out.dtype))

    return jax.lax.cond(one_document, by_lengths, lambda q, k, v: blockwise(q, k, v, masking), q, k, v)


def align_kv_heads(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH):
    """k and v with each kv head repeated for its query heads where the current mesh splits the query heads over
    "tensor" but cannot split the K kv heads alike (fewer kv heads than shards): fused kernels pair the local
    query and kv heads of each device, which is only right when both are split the same way."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return k_BxSxKxH, v_BxSxKxH
    shape = sharding.mesh_shape_of(mesh)
    heads_q = sharding.logical_to_spec(("act_heads",), q_BxTxNxH.shape[2:3], shape)
    heads_kv = sharding.logical_to_spec(("act_kv_heads",), k_BxSxKxH.shape[2:3], shape)
    if heads_q == heads_kv:
        return k_BxSxKxH, v_BxSxKxH
    groups = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
    return jnp.repeat(k_BxSxKxH, groups, axis=2), jnp.repeat(v_BxSxKxH, groups, axis=2)


__all__ = ["Masking", "align_kv_heads", "attend", "blockwise", "dense", "recording", "resolve"]

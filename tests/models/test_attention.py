"""Attention implementations against an independent float64 NumPy reference, forward and backward: packed segments,
left and right padding, grouped-query heads, sliding windows of 1 / 4 / ≥ T, soft-capping, a decoding query offset
with a key mask; the model's layer windows and its KV-cache decoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import errors, models
from flaxalign.models import attention
from tests import helpers

B, T, N, K, H = 2, 37, 4, 2, 8  # T is not a multiple of the block: the padded last block is exercised


def _numpy_attention(q, k, v, visible, softcap):
    """softmax over the visible keys of (capped) q·kᵀ/√H, in float64; rows with no visible key give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(visible[:, None], scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnqk,bknh->bqnh", weights, v)


def _visible(q_start, q_seg, k_seg, k_valid, window, t, s):
    """[B, T, S] visibility written from the definition, loops over every (query, key)."""
    out = np.zeros((B, t, s), bool)
    for b in range(B):
        for i in range(t):
            for j in range(s):
                ok = j <= q_start + i and (not window or q_start + i - j < window)
                ok &= q_seg is None or q_seg[b, i] == k_seg[b, j]
                ok &= k_valid is None or bool(k_valid[b, j])
                out[b, i, j] = ok
    return out


def _inputs(seed=0, t=T, s=T):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, s, K, H)).astype(np.float32) for _ in range(2))
    return q, k, v, rng.normal(size=(B, t, N, H)).astype(np.float32)


def _segments():
    """Row 0: two packed documents; row 1: left padding (segment 0) before one document, right padding after."""
    seg = np.ones((B, T), np.int32)
    seg[0, 20:] = 2
    seg[1, :5], seg[1, 30:] = 0, 3
    return seg


IMPLS = ["xla", "blockwise"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [0, 1, 4, 64])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_training_attention_matches_the_reference_forward_and_backward(impl, window, softcap):
    q, k, v, cotangent = _inputs()
    seg = _segments()
    masking = attention.Masking(q_segments=jnp.asarray(seg), k_segments=jnp.asarray(seg), window=window)
    visible = _visible(0, seg, seg, None, window, T, T)

    def run(q, k, v):
        return attention.attend(q, k, v, masking, impl=impl, softcap=softcap, block=8)

    out, vjp = jax.vjp(jax.jit(run), q, k, v)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, visible, softcap), atol=1e-5, rtol=1e-5)
    grads = vjp(jnp.asarray(cotangent))
    # the reference gradient: float64 finite differences would be slow; use JAX on the float64 reference instead
    jax.config.update("jax_enable_x64", True)
    try:
        def reference(q, k, v):
            return jnp.asarray(_jax_reference(q, k, v, visible, softcap))
        expected = jax.vjp(reference, *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))[1](
            jnp.asarray(cotangent, jnp.float64))
    finally:
        jax.config.update("jax_enable_x64", False)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _jax_reference(q, k, v, visible, softcap):
    """The NumPy reference's formula in jax.numpy (float64), for its gradient."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(visible[:, None], scores, -1e300)
    weights = jax.nn.softmax(scores, axis=-1) * visible[:, None]
    return jnp.einsum("bnqk,bknh->bqnh", weights, v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [0, 3])
def test_decoding_from_a_cache_matches_the_reference(impl, window):
    """Queries at cache slots 20…22 over a 32-slot cache whose first slots are left padding (`k_valid` 0) and whose
    slots after 22 are empty; with a window the first key blocks are skipped (the band starts past block 0)."""
    t, s, start = 3, 32, 20
    q, k, v, _ = _inputs(seed=1, t=t, s=s)
    valid = np.ones((B, s), np.int32)
    valid[0, :4], valid[:, start + t:] = 0, 0
    masking = attention.Masking(q_start=jnp.int32(start), k_valid=jnp.asarray(valid), window=window)
    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, masking, impl=impl, block=8))(q, k, v)
    visible = _visible(start, None, None, valid, window, t, s)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, visible, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (3, 0.0), (0, 3.0)])
def test_a_decoding_step_reads_the_heads_first_cache_as_the_reference_does(window, softcap):
    """`single_query`: one query per row at slot 21 of a 32-slot cache in the decoder's [B, K, S, H] layout, left
    padding and empty slots after it invalid, GQA (N = 2·K), against the float64 definition."""
    s, start = 32, 21
    q, k, v, _ = _inputs(seed=2, t=1, s=s)
    valid = np.ones((B, s), np.int32)
    valid[0, :6], valid[:, start + 1:] = 0, 0
    masking = attention.Masking(q_start=jnp.int32(start), k_valid=jnp.asarray(valid), window=window)
    heads_first = [jnp.asarray(np.swapaxes(x, 1, 2)) for x in (k, v)]
    out = jax.jit(lambda q, k, v: attention.single_query(q, k, v, masking, softcap=softcap))(q[:, 0], *heads_first)
    visible = _visible(start, None, None, valid, window, 1, s)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, visible, softcap)[:, 0], atol=1e-5,
                               rtol=1e-5)


def test_blockwise_never_visits_key_blocks_outside_the_band():
    """Causal: query block i reads key blocks 0…i; with a window of 8 (one block) only the diagonal block and the
    one before it. Counted from the key-block loop's trip counts."""
    masking = attention.Masking()
    blocks = attention._blocks(64, 64, 8)
    ranges = [tuple(int(x) for x in attention._key_range(i, masking, blocks)) for i in range(blocks.nq)]
    assert ranges == [(0, i + 1) for i in range(8)]
    windowed = [tuple(int(x) for x in attention._key_range(i, masking._replace(window=8), blocks))
                for i in range(blocks.nq)]
    assert windowed == [(max(0, i - 1), i + 1) for i in range(8)]


def test_blockwise_memory_grows_linearly_not_quadratically():
    """The compiled forward + backward of blockwise attention at T = 2048 holds no [T, T]-sized buffer: its
    temporaries are far below one float32 [B, N, T, T] score matrix, which the dense path needs several of."""
    t = 2048
    q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)

    def temp_bytes(impl):
        def loss(q, k, v):
            return jnp.sum(attention.attend(q, k, v, attention.Masking(), impl=impl))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 4 * t * t * 4  # one float32 [1, 4, T, T]
    assert temp_bytes("blockwise") < 0.25 * scores < scores < temp_bytes("xla")


def test_model_windows_per_layer_and_the_cache_decoder_agree():
    """A model whose layer 1 attends in full and layer 0 in a window of 5: blockwise logits equal the dense
    implementation's, differ from the window-free model's, and the KV-cache decoder (a 24-token prefill, then 6
    single-token steps) reproduces the full forward."""
    base = helpers.tiny_model_config(vocab_size=64, max_seq_len=64)
    windowed = dataclasses.replace(base, sliding_window=5, full_attention_layers=(1,))
    assert windowed.layer_windows() == (5, 0)
    params = helpers.random_params(base)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 40)))

    def logits(config):
        graphdef = models.abstract_model(config)[0]
        return np.asarray(jax.jit(lambda p: models.merge(graphdef, p).logits(tokens))(params))

    blockwise = logits(dataclasses.replace(windowed, attention="blockwise"))
    np.testing.assert_allclose(blockwise, logits(dataclasses.replace(windowed, attention="xla")), atol=2e-5)
    assert np.abs(blockwise - logits(dataclasses.replace(base, attention="blockwise"))).max() > 1e-3
    graphdef = models.abstract_model(dataclasses.replace(windowed, attention="blockwise"))[0]

    @jax.jit
    def decoded(params):
        model = models.merge(graphdef, params)
        cache = model.init_cache(2, 40)
        positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
        valid = jnp.ones((2, 40), jnp.int32)
        prefill, cache = model.decode(tokens[:, :24], positions[:, :24], cache, 0, valid)
        steps = []
        for index in range(24, 30):  # one token per step, the last ones past the window of 5
            hidden, cache = model.decode(tokens[:, index:index + 1], positions[:, index:index + 1], cache,
                                         jnp.int32(index), valid)  # an array index, as in the sampler
            steps.append(hidden)
        return prefill, jnp.concatenate(steps, axis=1)

    full = np.asarray(jax.jit(lambda p: models.merge(graphdef, p)(tokens))(params))
    prefill, steps = decoded(params)
    np.testing.assert_allclose(np.asarray(prefill), full[:, :24], atol=2e-5)
    np.testing.assert_allclose(np.asarray(steps), full[:, 24:30], atol=2e-5)


def test_bad_attention_settings_fail_with_one_sentence():
    config = helpers.tiny_model_config()
    with pytest.raises(errors.ConfigError, match=r"model.attention must be one of \['auto', 'xla', 'blockwise', "
                                                 r"'splash', 'cudnn'\], not 'flash'"):
        dataclasses.replace(config, attention="flash")
    with pytest.raises(errors.ConfigError, match="model.sliding_window must be 0 .off. or a positive"):
        dataclasses.replace(config, sliding_window=-4)
    with pytest.raises(errors.ConfigError, match=r"model.full_attention_layers \[7\] are not layer indices"):
        dataclasses.replace(config, sliding_window=4, full_attention_layers=(7,))
    with pytest.raises(errors.ConfigError, match="model.attn_softcap must be >= 0"):
        dataclasses.replace(config, attn_softcap=-1.0)
    assert dataclasses.replace(config, attention="jnp").attention == "jnp"  # old checkpoints' configs still load


@pytest.mark.parametrize("window", [0, 16])
def test_splash_kernel_matches_the_reference_in_interpret_mode(window):
    """The Pallas TPU splash path (`models/splash.py`), run by the Pallas interpreter on CPU: grouped heads, two
    packed segments, a window, soft-capping — forward against the NumPy reference, input gradients against the
    dense implementation's."""
    from flaxalign.models import splash

    b, t, n, k_heads, h = 1, 256, 2, 1, 64  # T: a multiple of the kernel's 128-token blocks; heads of 64 (SmolLM2)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, k_heads, h)), jnp.float32) for _ in range(2))
    seg = np.ones((b, t), np.int32)
    seg[0, 100:] = 2
    masking = attention.Masking(q_segments=jnp.asarray(seg), k_segments=jnp.asarray(seg), window=window)
    assert splash.supported(q, k, masking)
    out = splash.attend(q, k, v, masking, softcap=5.0, interpret=True)
    visible = np.zeros((b, t, t), bool)
    cols = np.arange(t)
    visible[0] = (cols[None] <= cols[:, None]) & (seg[0][:, None] == seg[0][None])
    if window:
        visible[0] &= cols[:, None] - cols[None] < window
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, visible, 5.0), atol=2e-5, rtol=2e-5)
    grad_splash = jax.grad(lambda q: jnp.sum(splash.attend(q, k, v, masking, softcap=5.0, interpret=True) ** 2))(q)
    grad_dense = jax.grad(lambda q: jnp.sum(attention.dense(q, k, v, masking, softcap=5.0) ** 2))(q)
    np.testing.assert_allclose(np.asarray(grad_splash), np.asarray(grad_dense), atol=1e-4, rtol=1e-4)
    # shapes the kernel cannot take fall back to blockwise (here: a length that is not a multiple of 128), and
    # `recording` (what `flaxalign plan` reports) says which implementation was traced
    short = q[:, :200], k[:, :200], v[:, :200]
    assert not splash.supported(*short[:2], masking._replace(q_segments=None, k_segments=None))
    for args, traced in ((short, {"blockwise"}), ((q, k, v), {"splash"})):
        with attention.recording() as recorded:
            jax.eval_shape(lambda q, k, v: attention.attend(q, k, v, attention.Masking(), impl="splash"), *args)
        assert recorded == traced


def test_splash_tiles_lengths_that_512_does_not_divide_and_splits_grouped_heads_over_tensor():
    """T = 640 (five 128-token blocks, not a multiple of 256 or 512), 8 query heads over 2 kv heads on a mesh with
    tensor = 4: the kv heads cannot be split four ways, so the wrapper must pair each query head with its own kv
    head before splitting — the output equals the dense reference computed without a mesh."""
    from flaxalign.models import splash

    b, t, n, k_heads, h = 2, 640, 8, 2, 16
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, k_heads, h)), jnp.float32) for _ in range(2))
    masking = attention.Masking(window=200)
    assert splash._block(t, t) == 128
    expected = np.asarray(attention.dense(q, k, v, masking))
    with jax.set_mesh(helpers.mesh((2, 1, 4))):
        out = jax.jit(lambda q, k, v: splash.attend(q, k, v, masking, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="traced masking.window needs the static `windows`"):
        jax.jit(lambda w: splash.attend(q, k, v, masking._replace(window=w), interpret=True))(jnp.int32(4))


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_call_maps_right_padded_rows_to_lengths(packed):
    """The arguments given to cuDNN (`attention._cudnn`), run through the same `jax.nn.dot_product_attention`
    call with implementation="xla" so that this CPU can check them: right-padded one-document rows become query and
    key lengths (outputs equal the reference at every real position and are zero at padding, where blockwise
    attention gives non-zero values), packed rows take the blockwise branch (equal to it everywhere). On a mesh
    whose tensor axis (4) splits the 4 query heads but not the 2 kv heads, the result is the same."""
    q, k, v, _ = _inputs(seed=4)
    seg = np.ones((B, T), np.int32)
    seg[0, 30:], seg[1, 12:] = 0, 0
    if packed:
        seg[1, 6:12] = 2
    masking = attention.Masking(q_segments=jnp.asarray(seg), k_segments=jnp.asarray(seg), window=5)
    run = jax.jit(lambda q, k, v: attention._cudnn(q, k, v, masking, implementation="xla"))
    out = np.asarray(run(q, k, v))
    blockwise = np.asarray(attention.blockwise(q, k, v, masking))
    real = seg > 0
    if packed:
        np.testing.assert_allclose(out, blockwise, atol=1e-6)
    else:
        expected = _numpy_attention(q, k, v, _visible(0, seg, seg, None, 5, T, T), 0.0)
        np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)
        assert not out[~real].any() and np.abs(blockwise[~real]).max() > 0.1
    with jax.set_mesh(helpers.mesh((2, 1, 4))):
        np.testing.assert_allclose(np.asarray(run(q, k, v)), out, atol=1e-6)

"""The Llama-family model without reference libraries: param layout, attention maths, remat and document packing,
and the HF interop conversion (config mapping, state-dict round trip)."""

import dataclasses
import functools

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import errors, models, sharding
from flaxalign.interop import hf
from flaxalign.models import attention
from tests import helpers

TINY = models.ModelConfig(**models.preset("tiny"))
# untied head, q/k/v biases and q/k norms, so the round trip and the axes cover every parameter kind
FULL = dataclasses.replace(TINY, tie_embeddings=False, qkv_bias=True, qk_norm=True)


# Cached: treat as read only.
_random_params = functools.cache(helpers.random_params)


@functools.cache
def _logits_fn(config):
    """One jitted logits function per config, shared by the tests (each compile costs a second or two)."""
    graphdef, _, _ = models.abstract_model(config)
    return jax.jit(lambda p, t, pos=None, seg=None: models.merge(graphdef, p).logits(t, pos, seg))


def _tokens(config, shape, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape, dtype=np.int32)


def _batch(config, seed=0):
    """The one [2, 32] batch shape of these tests: row 0 packs document A (12 tokens) and B (20 tokens), positions
    restarting at B; row 1 is a single document."""
    tokens = _tokens(config, (2, 32), seed)
    positions = np.stack([np.concatenate([np.arange(12), np.arange(20)]), np.arange(32)]).astype(np.int32)
    segment_ids = np.array([[1] * 12 + [2] * 20, [1] * 32], np.int32)
    return tokens, positions, segment_ids


# --- param layout -------------------------------------------------------------------------------------------


def test_abstract_model_matches_init_params():
    _, abstract, _ = models.abstract_model(FULL)
    params = models.init_params(FULL, seed=0)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert "lm_head" not in models.abstract_model(TINY)[1]  # tied: the head is the embedding


def test_every_param_has_known_logical_axes():
    _, abstract, logical = models.abstract_model(FULL)
    flat_axes = dict(jax.tree.flatten_with_path(logical, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_params = dict(jax.tree.flatten_with_path(abstract)[0])
    assert flat_axes.keys() == flat_params.keys()
    for path, axes in flat_axes.items():
        assert len(axes) == len(flat_params[path].shape), jax.tree_util.keystr(path)
        assert set(axes) <= set(sharding.RULES), jax.tree_util.keystr(path)
    assert flat_axes[(jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("attn"),
                      jax.tree_util.DictKey("q"))] == ("layers", "embed", "heads", "head_dim")


# --- HF interop (numpy only) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, FULL], ids=["tied", "untied_bias"])
def test_hf_state_dict_round_trip(config):
    params = _random_params(config)
    state = hf.params_to_hf_state_dict(config, params)
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (config.n_heads * config.head_dim,
                                                                      config.d_model)
    assert ("lm_head.weight" in state) != config.tie_embeddings
    back = hf.params_from_hf_state_dict(config, state)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_hf_q_proj_layout_is_head_major():
    """HF output feature n·Dh + j is head n, dim j: flaxalign's q[:, n, j]."""
    params = _random_params(FULL)
    q_proj = hf.params_to_hf_state_dict(FULL, params)["model.layers.0.self_attn.q_proj.weight"]
    head, dim = 3, 5
    np.testing.assert_array_equal(q_proj[head * FULL.head_dim + dim], params["layers"]["attn"]["q"][0, :, head, dim])


def test_hf_state_dict_errors():
    state = hf.params_to_hf_state_dict(FULL, _random_params(FULL))
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(errors.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.params_from_hf_state_dict(FULL, missing)
    wrong_shape = {**state, "model.norm.weight": np.ones(3, np.float32)}
    with pytest.raises(errors.CheckpointError, match="shape"):
        hf.params_from_hf_state_dict(FULL, wrong_shape)
    extra = {**state, "model.layers.0.mlp.up_proj.bias": np.ones(TINY.d_ff, np.float32)}
    with pytest.raises(errors.CheckpointError, match="no place"):
        hf.params_from_hf_state_dict(FULL, extra)
    # harmless extras are dropped: rotary buffers and a zero o_proj bias
    ok = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
          "model.layers.0.self_attn.o_proj.bias": np.zeros(TINY.d_model, np.float32)}
    hf.params_from_hf_state_dict(FULL, ok)


def test_hf_tied_head_must_equal_embedding():
    state = hf.params_to_hf_state_dict(TINY, _random_params(TINY))
    hf.params_from_hf_state_dict(TINY, {**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    with pytest.raises(errors.CheckpointError, match="tie_embeddings"):
        hf.params_from_hf_state_dict(TINY, {**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1})


HF_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
                intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=512)


def test_model_config_from_hf_transformers4_spelling():
    config = hf.model_config_from_hf({**HF_LLAMA, "rope_theta": 500000.0,
                                      "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}})
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.d_ff) == (64, 2, 4, 2, 160)
    assert (config.head_dim, config.max_seq_len, config.rms_eps, config.tie_embeddings) == (16, 4096, 1e-5, True)
    assert (config.rope_theta, config.rope_scaling_factor, config.rope_original_max_len) == (500000.0, 8.0, 512)
    assert not config.qkv_bias


def test_model_config_from_hf_transformers5_spelling():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}
    old = hf.model_config_from_hf({**HF_LLAMA, "rope_theta": 500000.0,
                                   "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}})
    assert hf.model_config_from_hf({**HF_LLAMA, "rope_parameters": rope}) == old


def test_model_config_from_hf_qwen2_mistral_and_head_dim():
    qwen = {**HF_LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert hf.model_config_from_hf(qwen).qkv_bias and hf.model_config_from_hf(qwen).rope_theta == 1e6
    mistral = {**HF_LLAMA, "architectures": None, "model_type": "mistral", "head_dim": 32, "sliding_window": 4096}
    config = hf.model_config_from_hf(mistral)
    assert config.head_dim == 32 and config.rope_scaling_factor == 0.0
    assert hf.model_config_from_hf({**HF_LLAMA, "attention_bias": True}).qkv_bias


@pytest.mark.parametrize("change, match", [
    (dict(architectures=["GPT2LMHeadModel"]), "not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_model_config_from_hf_rejects(change, match):
    with pytest.raises(errors.ConfigError, match=match):
        hf.model_config_from_hf({**HF_LLAMA, **change})


# --- attention maths ------------------------------------------------------------------------------------------


def _numpy_attention(q, k, v, mask):
    """Textbook per-head softmax attention; query head n reads kv head n // (N/K) (HF repeat_kv order)."""
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        for head in range(n):
            scores = q[i, :, head] @ k[i, :, head // group].T / np.sqrt(h)
            scores = np.where(mask[i, 0], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[i, :, head] = (probs / probs.sum(-1, keepdims=True)) @ v[i, :, head // group]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_kernels_match_numpy(kv_heads):
    """Every implementation, and JAX's own `dot_product_attention`, against the textbook loop: row 0 holds two
    packed documents, row 1 one."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 6, kv_heads, 8)).astype(np.float32) for _ in range(2))
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
    causal = np.tril(np.ones((6, 6), bool))
    mask = (causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]  # [B, 1, T, S]
    expected = _numpy_attention(q, k, v, mask)
    masking = attention.Masking(q_segments=jnp.asarray(segments), k_segments=jnp.asarray(segments))
    for impl in ("xla", "blockwise"):
        np.testing.assert_allclose(attention.attend(q, k, v, masking, impl=impl, block=4), expected, atol=1e-5)
    np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v, mask=mask), expected, atol=1e-5)


def test_gqa_equals_multi_head_with_repeated_kv():
    """A GQA model computes what the n_kv_heads == n_heads model computes with each kv head repeated per group."""
    mha = dataclasses.replace(FULL, n_kv_heads=FULL.n_heads)
    params = _random_params(FULL)
    group = FULL.n_heads // FULL.n_kv_heads
    assert group > 1
    attn = dict(params["layers"]["attn"])
    # the kv-heads axis of the stacked [L, D, K, Dh] kernels and [L, K, Dh] biases
    for name, axis in (("k", 2), ("v", 2), ("k_bias", 1), ("v_bias", 1)):
        attn[name] = np.repeat(attn[name], group, axis=axis)
    mha_params = {**params, "layers": {**params["layers"], "attn": attn}}
    batch = _batch(FULL)
    np.testing.assert_allclose(_logits_fn(FULL)(params, *batch), _logits_fn(mha)(mha_params, *batch), atol=1e-5)


def test_attention_implementations_agree():
    """The dense reference and blockwise attention (the CPU default) give the same logits on a packed batch; an
    old checkpoint's attention name still selects the dense one."""
    params = _random_params(FULL)
    batch = _batch(FULL)
    dense = _logits_fn(dataclasses.replace(FULL, attention="xla"))(params, *batch)
    np.testing.assert_allclose(dense, _logits_fn(dataclasses.replace(FULL, attention="blockwise"))(params, *batch),
                               atol=1e-5)
    assert attention.resolve("dot_product") == "xla"


def test_packed_documents_do_not_see_each_other():
    params = _random_params(FULL)
    logits_fn = _logits_fn(FULL)
    tokens, positions, segment_ids = _batch(FULL)
    base = np.asarray(logits_fn(params, tokens, positions, segment_ids))
    changed = tokens.copy()
    changed[0, 12:] = _tokens(FULL, (20,), seed=7)
    after = np.asarray(logits_fn(params, changed, positions, segment_ids))
    np.testing.assert_allclose(after[0, :12], base[0, :12], atol=1e-6)
    assert np.abs(after[0, 12:] - base[0, 12:]).max() > 1e-2  # B's change shows, so the check above is not vacuous
    # A placed after B, positions restarting, computes the same logits as A placed first
    swapped = np.concatenate([tokens[:, 12:], tokens[:, :12]], axis=1)
    swapped_positions = np.concatenate([positions[:, 12:], positions[:, :12]], axis=1)
    swapped_segments = np.concatenate([segment_ids[:, 12:], segment_ids[:, :12]], axis=1)
    moved = np.asarray(logits_fn(params, swapped, swapped_positions, swapped_segments))
    np.testing.assert_allclose(moved[0, 20:], base[0, :12], atol=1e-5)
    np.testing.assert_allclose(moved[0, :20], base[0, 12:], atol=1e-5)


# --- remat ----------------------------------------------------------------------------------------------------


def test_remat_policies_keep_the_gradient():
    """Every remat policy gives the loss and gradient of no remat. One jit holds all policies: a single compile
    is about half the time of one per policy."""
    params = _random_params(FULL)
    tokens = _tokens(FULL, (2, 17))

    def loss_and_grad(policy):
        graphdef, _, _ = models.abstract_model(dataclasses.replace(FULL, remat=policy))

        def loss(p):
            logits = models.merge(graphdef, p).logits(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

        return jax.value_and_grad(loss)

    policies = models.config.REMAT_POLICIES
    results = jax.jit(lambda p: {policy: loss_and_grad(policy)(p) for policy in policies})(params)
    loss, grad = results["none"]
    for policy in policies:
        remat_loss, remat_grad = results[policy]
        np.testing.assert_allclose(remat_loss, loss, rtol=1e-6, err_msg=policy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy),
                     remat_grad, grad)


def test_unrolled_layers_equal_scanned_layers():
    params = _random_params(FULL)
    tokens, positions, segment_ids = _batch(FULL)
    scanned = _logits_fn(FULL)(params, tokens, positions, segment_ids)
    unrolled = _logits_fn(dataclasses.replace(FULL, scan_layers=False))(params, tokens, positions, segment_ids)
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_each_query_and_key_head():
    """Qwen3 / Gemma 3: q and k are RMS-normalised per head before RoPE, so scaling a head's projection changes
    nothing (eps made negligible here), while the norm scales themselves act on the scores."""
    config = dataclasses.replace(TINY, qk_norm=True, rms_eps=1e-12)
    params = helpers.random_params(config)
    assert params["layers"]["attn"]["q_norm"]["scale"].shape == (config.n_layers, config.head_dim)
    tokens = _tokens(config, (2, 16))
    logits = np.asarray(_logits_fn(config)(params, tokens))
    attn = params["layers"]["attn"]
    scaled = {**params, "layers": {**params["layers"], "attn": {
        **attn, "q": attn["q"] * np.array([3.0, 0.5, 2.0, 7.0])[None, None, :, None],
        "k": attn["k"] * np.array([4.0, 0.25])[None, None, :, None]}}}
    np.testing.assert_allclose(np.asarray(_logits_fn(config)(scaled, tokens)), logits, atol=1e-4)
    sharper = {**params, "layers": {**params["layers"], "attn": {
        **attn, "q_norm": {"scale": attn["q_norm"]["scale"] * 3.0}}}}
    assert np.abs(np.asarray(_logits_fn(config)(sharper, tokens)) - logits).max() > 1e-3


def _saved_residual_shapes(fn, *args, capsys) -> list[str]:
    """The shapes (as JAX prints them, e.g. 'f32[8,16]') of the residuals autodiff keeps for fn's backward pass."""
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.parametrize("act", [jax.nn.silu, functools.partial(jax.nn.gelu, approximate=True)], ids=["silu", "gelu"])
def test_the_gated_activation_has_autodiffs_gradient_and_keeps_only_gate_and_up(act, capsys):
    """act(gate) ⊙ up through `llama.gated`: the gradients of autodiff through the plain expression, while the
    backward pass keeps two [N, F] residuals (gate, up) where autodiff keeps more."""
    from flaxalign.models.llama import gated
    gate, up, weight = jax.random.normal(jax.random.key(0), (3, 24, 40))

    def loss(g, u, fn):
        return jnp.sum(weight * jnp.tanh(fn(g, u)))

    ours = jax.grad(loss, argnums=(0, 1))(gate, up, lambda g, u: gated(act, g, u))
    plain = jax.grad(loss, argnums=(0, 1))(gate, up, lambda g, u: act(g) * u)
    for got, want in zip(ours, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    kept = _saved_residual_shapes(lambda g, u: jnp.sum(gated(act, g, u) ** 2), gate, up, capsys=capsys)
    plain_kept = _saved_residual_shapes(lambda g, u: jnp.sum((act(g) * u) ** 2), gate, up, capsys=capsys)
    assert kept.count("f32[24,40]") == 3, kept  # gate, up, and the product the square needs
    assert plain_kept.count("f32[24,40]") > 3, plain_kept


def test_a_tied_head_multiplies_the_embedding_without_keeping_its_transpose(capsys):
    """LMHead(E, transposed=True) gives LMHead(Eᵀ)'s logits (2-D and 3-D hidden states, soft cap, temperature) and
    gradients, and its backward pass keeps no [D, V] copy of the embedding."""
    from flaxalign.models.lm_head import LMHead
    embed_VxD = jax.random.normal(jax.random.key(1), (50, 16))
    hidden = jax.random.normal(jax.random.key(2), (2, 6, 16))
    for softcap, temperature in ((0.0, 1.0), (3.0, 0.7)):
        tied = LMHead(embed_VxD, softcap=softcap, transposed=True).at_temperature(temperature)
        plain = LMHead(embed_VxD.T, softcap=softcap).at_temperature(temperature)
        np.testing.assert_allclose(tied.logits(hidden), plain.logits(hidden), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(tied.logits(hidden[0]), plain.logits(hidden[0]), rtol=1e-6, atol=1e-6)

    def loss(e, h, transposed):
        head = LMHead(e, transposed=True) if transposed else LMHead(e.T)
        return jnp.sum(jax.nn.log_softmax(head.logits(h)) ** 2)

    for got, want in zip(jax.grad(loss, argnums=(0, 1))(embed_VxD, hidden[0], True),
                         jax.grad(loss, argnums=(0, 1))(embed_VxD, hidden[0], False), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    wrt_hidden = _saved_residual_shapes(lambda h: loss(embed_VxD, h, True), hidden[0], capsys=capsys)
    assert "f32[16,50]" not in wrt_hidden, wrt_hidden
    assert "f32[16,50]" in _saved_residual_shapes(lambda h: loss(embed_VxD, h, False), hidden[0], capsys=capsys)

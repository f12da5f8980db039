"""LoRA / rsLoRA / DoRA over the parameter tree: identity at init, training touches only the adapter, merge and
unmerge, the closed forms against numpy, sharding, per-path patterns and every user error."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from flaxalign import errors, models, sharding
from flaxalign.peft import lora
from tests import helpers

TINY = helpers.tiny_model_config()  # tied embeddings: no lm_head
UNTIED = dataclasses.replace(TINY, tie_embeddings=False)
ATTN_MLP = ["layers/attn/k", "layers/attn/o", "layers/attn/q", "layers/attn/v", "layers/mlp/down",
            "layers/mlp/gate", "layers/mlp/up"]


@functools.cache
def _model(config):
    """(graphdef, logical axes) of a model config."""
    graphdef, _, logical = models.abstract_model(config)
    return graphdef, logical


@functools.cache
def _init_params(config):
    """Params from `models.init_params` (cached: treat as read only)."""
    return models.init_params(config, seed=0)


@functools.cache
def _logits_fn(config, lora_config=None):
    """Jitted logits of the base params, or of `apply_lora(params, lora_params)` when a LoRA config is given."""
    graphdef, _ = _model(config)
    if lora_config is None:
        return jax.jit(lambda params, tokens: models.merge(graphdef, params).logits(tokens))
    return jax.jit(lambda params, lora_params, tokens: models.merge(
        graphdef, lora.apply_lora(params, lora_params, lora_config)).logits(tokens))


def _tokens(seed=0, shape=(2, 16)):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, shape, dtype=np.int32)


def _randomised(lora_params, seed=1, scale=0.1):
    """The adapter with every leaf random (B ≠ 0, magnitudes positive), as after some training."""
    leaves, treedef = jax.tree.flatten_with_path(lora_params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        is_magnitude = jax.tree_util.keystr(path).endswith("['magnitude']")
        out.append(np.abs(leaf) * (1.0 + 0.2 * noise) if is_magnitude else scale * noise)
    return jax.tree.unflatten(treedef, out)


def _init(config, lora_config, params=None, seed=0):
    params = _init_params(config) if params is None else params
    return lora.init_lora(params, _model(config)[1], lora_config, jax.random.key(seed))


def _max_diff(x, y):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))


# --- identity at init, training ------------------------------------------------------------------------------


def test_lora_at_init_gives_exactly_the_base_logits():
    config = lora.LoraConfig(rank=4, alpha=16)
    params = _init_params(TINY)
    lora_params, _ = _init(TINY, config)
    tokens = _tokens()
    base = np.asarray(_logits_fn(TINY)(params, tokens))
    adapted = np.asarray(_logits_fn(TINY, config)(params, lora_params, tokens))
    np.testing.assert_array_equal(adapted, base)  # bitwise: B = 0
    assert all(not np.any(adapter["b"]) for adapter in jax.tree.leaves(
        lora_params, is_leaf=lambda x: isinstance(x, dict) and "b" in x))


def test_dora_at_init_equals_the_base():
    config = lora.LoraConfig(rank=4, alpha=16, variant="dora")
    params = _init_params(TINY)
    lora_params, _ = _init(TINY, config)
    # m = ‖W‖ and B = 0 give W' = W·‖W‖/‖W‖; the logits then follow (the sharded test runs DoRA's forward)
    assert _max_diff(lora.apply_lora(params, lora_params, config), params) <= 1e-6


def test_training_changes_only_the_adapter():
    config = lora.LoraConfig(rank=4, alpha=16)
    params = _init_params(TINY)
    base_before = jax.tree.map(np.array, params)
    lora_params, _ = _init(TINY, config)
    graphdef, _ = _model(TINY)
    tokens = _tokens(shape=(4, 17))
    optimizer = optax.adam(1e-2)

    def loss_fn(lora_params):
        logits = models.merge(graphdef, lora.apply_lora(params, lora_params, config)).logits(tokens[:, :-1])
        logps = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1))

    @jax.jit
    def step(lora_params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(lora_params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(lora_params, updates), opt_state, loss

    opt_state = optimizer.init(lora_params)
    losses = []
    for _ in range(4):
        lora_params, opt_state, loss = step(lora_params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, params, base_before)  # bitwise unchanged
    assert all(np.any(adapter["b"]) for adapter in jax.tree.leaves(
        lora_params, is_leaf=lambda x: isinstance(x, dict) and "b" in x))


# --- merge / unmerge -------------------------------------------------------------------------------------------


def test_merged_forward_equals_the_adapted_forward():
    config = lora.LoraConfig(rank=4, alpha=16)
    params = _init_params(TINY)
    lora_params = _randomised(_init(TINY, config)[0])
    tokens = _tokens()
    merged = lora.merge(params, lora_params, config)  # eager, outside the jitted forward
    assert _max_diff(merged, params) > 1e-3  # the adapter does something
    np.testing.assert_allclose(np.asarray(_logits_fn(TINY)(merged, tokens)),
                               np.asarray(_logits_fn(TINY, config)(params, lora_params, tokens)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_unmerge_inverts_merge(variant):
    config = lora.LoraConfig(rank=4, alpha=16, variant=variant)
    params = helpers.random_params(TINY)
    lora_params = _randomised(_init(TINY, config, params)[0])
    restored = lora.unmerge(lora.merge(params, lora_params, config), lora_params, config)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert _max_diff(restored, params) <= 1e-6


def test_a_chain_of_adapters_concatenates_into_one_with_the_same_merged_weights():
    """merge(merge(W, A₁), A₂) = merge(W, [A₁ A₂]) for a rank-4 rsLoRA on all linear weights followed by a rank-2
    LoRA on q, v and the LM head (ranks add where both adapt, scales fold into B), in float32."""
    first = lora.LoraConfig(rank=4, alpha=16, variant="rslora")
    second = lora.LoraConfig(rank=2, alpha=3, targets=("q", "v", "lm_head"), rank_pattern={"v": 3})
    params = helpers.random_params(UNTIED)
    one = _randomised(_init(UNTIED, first, params)[0], seed=1)
    two = _randomised(_init(UNTIED, second, params)[0], seed=2)
    config, joined = lora.concatenate_adapters(params, [(second, two), (first, one)])
    assert lora.rank_for("layers/attn/q", config) == 6 and lora.rank_for("layers/attn/v", config) == 7
    assert lora.rank_for("layers/mlp/up", config) == 4 and lora.rank_for("lm_head", config) == 2
    chained = lora.merge(lora.merge(params, one, first), two, second)
    assert _max_diff(lora.merge(params, joined, config), chained) <= 1e-5
    assert _max_diff(chained, params) > 1e-2  # both adapters changed the weights
    with pytest.raises(errors.ConfigError, match="cannot be summed into one LoRA adapter"):
        lora.concatenate_adapters(params, [(dataclasses.replace(first, variant="dora"), one)])


def test_dora_unmerge_is_refused():
    config = lora.LoraConfig(rank=4, variant="dora")
    params = helpers.random_params(TINY)
    lora_params, _ = _init(TINY, config, params)
    with pytest.raises(errors.ConfigError, match="unmerge is not defined for lora.variant='dora'"):
        lora.unmerge(params, lora_params, config)


def test_untouched_leaves_are_the_same_objects_and_lora_off_is_the_identity():
    params = helpers.random_params(TINY)
    config = lora.LoraConfig(rank=2, targets=["q"])
    lora_params, _ = _init(TINY, config, params)
    adapted = lora.apply_lora(params, lora_params, config)
    assert adapted["embed"] is params["embed"] and adapted["layers"]["mlp"] is params["layers"]["mlp"]
    assert adapted["layers"]["attn"]["k"] is params["layers"]["attn"]["k"]
    off = lora.LoraConfig(rank=0)
    assert _init(TINY, off, params) == ({}, {})
    assert lora.apply_lora(params, {}, off) is params


# --- closed forms against numpy --------------------------------------------------------------------------------


def _numpy_delta(adapter, n_layers=1):
    """A·B as [L, I, O] matrices."""
    a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
    layers, rank = a.shape[:n_layers], a.shape[-1]
    return np.matmul(a.reshape(*layers, -1, rank), b.reshape(*layers, rank, -1))


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree.flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, dict) and "a" in x)[0]}


@pytest.mark.parametrize("variant, scale", [("lora", 16 / 4), ("rslora", 16 / 2)])
def test_lora_and_rslora_scaling(variant, scale):
    config = lora.LoraConfig(rank=4, alpha=16, variant=variant)
    params = helpers.random_params(TINY)
    lora_params = _randomised(_init(TINY, config, params)[0])
    merged = _flat(lora.merge(params, lora_params, config))
    base = _flat(params)
    for key, adapter in _flat(lora_params).items():
        w = np.asarray(base[key], np.float64)
        expected = w.reshape(_numpy_delta(adapter).shape) + scale * _numpy_delta(adapter)
        np.testing.assert_allclose(np.asarray(merged[key]).reshape(expected.shape), expected, atol=1e-6, rtol=0)


def test_dora_closed_form_against_numpy():
    config = lora.LoraConfig(rank=4, alpha=8, variant="dora")
    params = helpers.random_params(TINY)
    lora_params = _randomised(_init(TINY, config, params)[0], scale=0.3)
    merged, base = _flat(lora.merge(params, lora_params, config)), _flat(params)
    for key, adapter in _flat(lora_params).items():
        delta = _numpy_delta(adapter)  # [L, I, O]
        v = np.asarray(base[key], np.float64).reshape(delta.shape) + (8 / 4) * delta
        m = np.asarray(adapter["magnitude"], np.float64).reshape(delta.shape[0], 1, delta.shape[2])
        expected = m * v / np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(merged[key]).reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)


def test_dora_norm_is_a_constant_in_the_backward_pass():
    """d/dB of Σ C⊙W' with the norm n held fixed: s·Aᵀ(C ⊙ m/n), what PEFT's detached weight_norm gives."""
    config = lora.LoraConfig(rank=3, alpha=6, targets=["up"], variant="dora")
    params = helpers.random_params(TINY)
    lora_params = _randomised(_init(TINY, config, params)[0], scale=0.3)
    cotangent = np.random.default_rng(2).normal(size=params["layers"]["mlp"]["up"].shape).astype(np.float32)

    def objective(lora_params):
        return jnp.sum(cotangent * lora.apply_lora(params, lora_params, config)["layers"]["mlp"]["up"])

    grad_b = np.asarray(jax.grad(objective)(lora_params)["layers"]["mlp"]["up"]["b"], np.float64)
    adapter = lora_params["layers"]["mlp"]["up"]
    a, s = np.asarray(adapter["a"], np.float64), 6 / 3
    v = np.asarray(params["layers"]["mlp"]["up"], np.float64) + s * _numpy_delta(adapter)
    ratio = np.asarray(adapter["magnitude"], np.float64)[:, None, :] / np.linalg.norm(v, axis=1, keepdims=True)
    expected = s * np.einsum("lir,lio->lro", a, cotangent * ratio)
    np.testing.assert_allclose(grad_b, expected, atol=1e-4, rtol=1e-4)


# --- sharding --------------------------------------------------------------------------------------------------


def test_sharded_equals_unsharded_and_adapters_follow_their_weight():
    config = lora.LoraConfig(rank=4, alpha=16, variant="dora")
    params = _init_params(TINY)
    lora_params, lora_logical = _init(TINY, config)
    lora_params = _randomised(lora_params)
    tokens = _tokens(shape=(4, 16))
    expected = np.asarray(_logits_fn(TINY, config)(params, lora_params, tokens))

    mesh = helpers.mesh((2, 2, 2))
    params_sh = sharding.tree_shardings(_model(TINY)[1], params, mesh)
    lora_sh = sharding.tree_shardings(lora_logical, lora_params, mesh)
    specs = jax.tree.map(lambda s: s.spec, lora_sh)
    assert specs["layers"]["attn"]["q"] == {"a": P(None, "fsdp", None), "b": P(None, None, "tensor", None),
                                            "magnitude": P(None, "tensor", None)}
    assert specs["layers"]["attn"]["o"] == {"a": P(None, "tensor", None, None), "b": P(None, None, "fsdp"),
                                            "magnitude": P(None, "fsdp")}
    assert specs["layers"]["mlp"]["down"] == {"a": P(None, "tensor", None), "b": P(None, None, "fsdp"),
                                              "magnitude": P(None, "fsdp")}
    with jax.set_mesh(mesh):
        sharded = _logits_fn(TINY, config)(jax.device_put(params, params_sh), jax.device_put(lora_params, lora_sh),
                                           tokens)
    np.testing.assert_allclose(np.asarray(sharded), expected, atol=1e-5, rtol=0)


# --- targets and patterns --------------------------------------------------------------------------------------


def _paths(config, lora_config):
    _, abstract, logical = models.abstract_model(config)
    return lora.target_paths(abstract, logical, lora_config)


@pytest.mark.parametrize("targets, exclude, expected", [
    ("all-linear", (), ATTN_MLP),  # no lm_head, no embedding, no norms
    (["lm_head"], (), ["lm_head"]),
    (["q", "v"], (), ["layers/attn/q", "layers/attn/v"]),
    ("layers/attn/(q|v)", (), ["layers/attn/q", "layers/attn/v"]),
    (["attn/.*"], ["o", "k"], ["layers/attn/q", "layers/attn/v"]),
    ("all-linear", ["layers/mlp/.*"], ATTN_MLP[:4]),
])
def test_target_selection(targets, exclude, expected):
    assert _paths(UNTIED, lora.LoraConfig(rank=2, targets=targets, exclude=exclude)) == expected
    assert _paths(UNTIED, lora.LoraConfig(rank=0, targets=targets, exclude=exclude)) == []


def test_lm_head_layout_is_embed_to_vocab():
    config = lora.LoraConfig(rank=2, targets=["lm_head"])
    _, abstract, logical = models.abstract_model(UNTIED)
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    lora_params, lora_logical = lora.init_lora(params, logical, config, jax.random.key(0))
    assert lora_logical == {"lm_head": {"a": ("embed", None), "b": (None, "vocab")}}
    assert lora_params["lm_head"]["a"].shape == (64, 2) and lora_params["lm_head"]["b"].shape == (2, 512)


def test_rank_and_alpha_patterns_apply_per_path():
    config = lora.LoraConfig(rank=4, alpha=8, rank_pattern={"q": 2, "layers/mlp/.*": 3}, alpha_pattern={"o": 1.5})
    params = helpers.random_params(TINY)
    lora_params = _randomised(_init(TINY, config, params)[0])
    ranks = {key: adapter["a"].shape[-1] for key, adapter in _flat(lora_params).items()}
    assert ranks == {"['layers']['attn']['k']": 4, "['layers']['attn']['o']": 4, "['layers']['attn']['q']": 2,
                     "['layers']['attn']['v']": 4, "['layers']['mlp']['down']": 3, "['layers']['mlp']['gate']": 3,
                     "['layers']['mlp']['up']": 3}
    assert lora_params["layers"]["attn"]["q"]["b"].shape == (2, 2, 4, 16)
    merged = lora.merge(params, lora_params, config)
    for name, scale in [("o", 1.5 / 4), ("q", 8 / 2), ("k", 8 / 4)]:
        adapter = lora_params["layers"]["attn"][name]
        delta = np.asarray(merged["layers"]["attn"][name]) - params["layers"]["attn"][name]
        np.testing.assert_allclose(delta.reshape(_numpy_delta(adapter).shape), scale * _numpy_delta(adapter),
                                   atol=1e-6)


def test_kaiming_and_gaussian_init_bounds():
    params = helpers.random_params(TINY)
    kaiming = _init(TINY, lora.LoraConfig(rank=4), params)[0]["layers"]["mlp"]["down"]["a"]
    # U(±1/√I): std 1/√(3I)
    assert np.max(np.abs(kaiming)) <= 1 / math.sqrt(192) and np.std(kaiming) > 0.9 / math.sqrt(3 * 192)
    gaussian = _init(TINY, lora.LoraConfig(rank=4, init="gaussian"), params)[0]["layers"]["mlp"]["down"]["a"]
    assert abs(float(np.std(gaussian)) - 1 / 4) < 0.02


def test_trainable_mask_and_counts():
    _, abstract, logical = models.abstract_model(UNTIED)
    config = lora.LoraConfig(rank=4, modules_to_save=["lm_head"])
    mask = lora.trainable_mask(abstract, config)
    assert mask["lm_head"] and not mask["embed"] and not any(jax.tree.leaves(mask["layers"]))
    assert lora.modules_to_save_paths(abstract, config) == ["lm_head"]
    lora_params, _ = lora.init_lora(jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract), logical,
                                    config, jax.random.key(0))
    d, f, kv = 64, 192, 2 * 16
    per_layer = 4 * ((d + 64) + (d + kv) * 2 + (64 + d) + 2 * (d + f) + (f + d))  # q, k, v, o, gate, up, down
    assert lora.count_params(lora_params) == 2 * per_layer


def test_config_round_trip_and_hashable():
    values = dict(rank=8, alpha=16.0, targets=["q", "v"], exclude=["layers/attn/k"], variant="rslora", dropout=0.1,
                  init="gaussian", rank_pattern={"q": 4}, alpha_pattern={"v": 32.0}, modules_to_save=["lm_head"])
    config = lora.LoraConfig.from_dict(ml_collections.ConfigDict(values))
    assert config.to_dict() == values
    assert lora.LoraConfig.from_dict(config.to_dict()) == config
    hash(config)


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(rank=-1), "lora.rank must be 0"),
    (dict(rank=4, alpha=-2.0), "lora.alpha must not be negative"),
    (dict(rank=4, variant="vera"), "lora.variant must be one of"),
    (dict(rank=4, init="pissa"), "lora.init must be one of"),
    (dict(rank=4, dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
    (dict(rank=4, rank_pattern={"q": 0}), "must be positive; use lora.exclude"),
    (dict(rank=4, targets="layers/(q"), "not a valid regular expression"),
    (dict(rank=4, ranks=2), r"unknown lora config field\(s\) \['ranks'\]"),
])
def test_config_errors(values, message):
    with pytest.raises(errors.ConfigError, match=message):
        lora.LoraConfig.from_dict(values)


@pytest.mark.parametrize("values, message", [
    (dict(targets=["query"]), r"matches no linear parameter; available: \['layers/attn/k'"),
    (dict(targets="attn/q"), r"lora.targets='attn/q' .* matches no linear parameter"),  # a string is a full match
    (dict(targets=["embed"]), "matches no linear parameter"),  # the token embedding is a lookup table
    (dict(targets=["q"], exclude=["attn/.*"]), "matches no linear parameter"),
    (dict(rank=40, targets=["k", "q"]), r"lora rank 40 for 'layers/attn/k' exceeds min\(input 64, output 32\)"),
    (dict(rank=4, rank_pattern={"down": 100}), r"'layers/mlp/down' exceeds min\(input 192, output 64\)"),
])
def test_target_errors(values, message):
    with pytest.raises(errors.ConfigError, match=message):
        _paths(TINY, lora.LoraConfig(**{"rank": 4, **values}))


def test_modules_to_save_error_on_a_tied_head():
    _, abstract, _ = models.abstract_model(TINY)
    with pytest.raises(errors.ConfigError, match=r"modules_to_save=\['lm_head'\] matches no parameter"):
        lora.trainable_mask(abstract, lora.LoraConfig(rank=4, modules_to_save=["lm_head"]))


def test_dora_apply_needs_magnitudes():
    params = helpers.random_params(TINY)
    lora_params, _ = _init(TINY, lora.LoraConfig(rank=2, targets=["q"]), params)
    with pytest.raises(errors.ConfigError, match="has no magnitude"):
        lora.apply_lora(params, lora_params, lora.LoraConfig(rank=2, targets=["q"], variant="dora"))

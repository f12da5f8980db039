"""Bottleneck adapters: identity at init, named sets and the base-model reference mode, adapter-only training with a
frozen base, parameter count, config errors, unrolled layers, and sharded == unsharded."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxalign import errors, models, sharding
from flaxalign.models import adapters
from flaxalign.policy import TrainableModel
from flaxalign.stages import clm
from tests import helpers

BASE = helpers.tiny_model_config()
HOULSBY = helpers.tiny_model_config(adapter_placement="houlsby", adapter_names=("a", "task-2"), active_adapter="a")
PFEIFFER = dataclasses.replace(HOULSBY, adapter_placement="pfeiffer")


def _with_active(config, name):
    return dataclasses.replace(config, active_adapter=name)


@functools.cache
def _logits_fn(config):
    graphdef, _, _ = models.abstract_model(config)
    return jax.jit(lambda p, t: models.merge(graphdef, p).logits(t))


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, BASE.vocab_size, (2, 32), dtype=np.int32)


@functools.cache
def _random_params(config, seed=0):
    """Random numpy params with every adapter weight non-zero (read only: cached)."""
    return helpers.random_params(config, seed)


def _flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- layout, count, split/join ----------------------------------------------------------------------------------


def test_param_layout_and_count():
    _, abstract, logical = models.abstract_model(HOULSBY)
    adapter_tree, base_tree = adapters.split_trainable(abstract)
    assert set(abstract["layers"]["adapters"]) == {"a", "task-2"}
    assert jax.tree.structure(base_tree) == jax.tree.structure(models.abstract_model(BASE)[1])
    a = abstract["layers"]["adapters"]["a"]["attn"]
    d, r, layers = 64, 64 // 16, BASE.n_layers
    assert (a["down"].shape, a["down_bias"].shape, a["up"].shape, a["up_bias"].shape) == (
        (layers, d, r), (layers, r), (layers, r, d), (layers, d))
    assert logical["layers"]["adapters"]["a"]["mlp"]["down"] == ("layers", "embed", None)
    assert logical["layers"]["adapters"]["a"]["mlp"]["up"] == ("layers", None, "embed")
    # L · sets · sites · (2·D·r + r + D)
    expected = layers * 2 * 2 * (2 * d * r + r + d)
    assert adapters.count_params(adapter_tree) == HOULSBY.num_adapter_params() == expected == 4640
    assert adapters.count_params(adapters.split_trainable(models.abstract_model(PFEIFFER)[1])[0]) == expected // 2
    assert HOULSBY.num_params() == BASE.num_params() + expected == adapters.count_params(abstract)
    assert "mlp" in abstract["layers"]["adapters"]["a"] and "attn" not in (
        models.abstract_model(PFEIFFER)[1]["layers"]["adapters"]["a"])


def test_split_join_and_filter_are_dict_ops():
    params = _random_params(HOULSBY)
    adapter_tree, base_tree = adapters.split_trainable(params)
    flags = jax.tree_util.tree_map_with_path(lambda path, _: adapters.adapter_param_filter(path), params)
    assert all(jax.tree.leaves(adapters.split_trainable(flags)[0]))
    assert not any(jax.tree.leaves(adapters.split_trainable(flags)[1]))
    assert adapters.adapter_param_filter(("layers", "adapters", "a", "mlp", "up"))
    assert adapters.adapter_param_filter("layers/adapters/a/mlp/up")
    assert not adapters.adapter_param_filter("layers/mlp/up")
    joined = adapters.join(adapter_tree, base_tree)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    assert all(x is y for x, y in zip(jax.tree.leaves(joined), jax.tree.leaves(params)))  # no copies
    assert base_tree["layers"]["attn"]["q"] is params["layers"]["attn"]["q"]
    with pytest.raises(ValueError, match="both"):
        adapters.join(base_tree, base_tree)


# --- identity at init, named sets, reference mode -----------------------------------------------------------------


def _zero_up(params):
    """The params with every adapter's up matrix and biases at their init value, zero; the down matrices random."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if not adapters.adapter_param_filter(path) or jax.tree_util.keystr(path).endswith(
            "['down']") else np.zeros_like(x), params)


def test_init_is_zero_up_and_draws_nothing_from_the_base_stream():
    rngs = nnx.Rngs(params=0)
    sets = nnx.to_pure_dict(nnx.state(adapters.adapter_sets(HOULSBY, rngs, stack=(BASE.n_layers,))))
    # Adapter keys fold a constant into the stream's key without drawing: the base init is as without adapters.
    assert int(rngs.params.count[...]) == 0
    for key, value in _flat(sets).items():
        if key.endswith("['down']"):
            assert abs(float(np.std(value)) - HOULSBY.init_std) < 2e-3, key
        else:
            assert not np.any(value), key
    assert not np.array_equal(sets["a"]["attn"]["down"], sets["a"]["mlp"]["down"])
    assert not np.array_equal(sets["a"]["mlp"]["down"], sets["task-2"]["mlp"]["down"])


@pytest.mark.parametrize("config", [HOULSBY, PFEIFFER], ids=["houlsby", "pfeiffer"])
def test_identity_at_init(config):
    params = _zero_up(_random_params(config))
    _, base_params = adapters.split_trainable(params)
    tokens = _tokens()
    np.testing.assert_array_equal(_logits_fn(config)(params, tokens), _logits_fn(BASE)(base_params, tokens))


def test_named_sets_switch_and_empty_name_is_the_base():
    params = _random_params(HOULSBY)
    _, base_params = adapters.split_trainable(params)
    tokens = _tokens(1)
    base = np.asarray(_logits_fn(BASE)(base_params, tokens))
    set_a = np.asarray(_logits_fn(HOULSBY)(params, tokens))
    set_b = np.asarray(_logits_fn(_with_active(HOULSBY, "task-2"))(params, tokens))
    reference = np.asarray(_logits_fn(_with_active(HOULSBY, ""))(params, tokens))
    np.testing.assert_array_equal(reference, base)  # adapters off = the base model, from the same tree
    for x, y in [(set_a, base), (set_b, base), (set_a, set_b)]:
        assert np.abs(x - y).max() > 1e-2
    # Another set is a compute setting: same parameter tree, same checkpoint identity.
    assert "active_adapter" not in HOULSBY.checkpoint_identity()
    assert HOULSBY.checkpoint_identity() == _with_active(HOULSBY, "task-2").checkpoint_identity()
    assert models.abstract_model(_with_active(HOULSBY, ""))[1].keys() == models.abstract_model(HOULSBY)[1].keys()


def test_unrolled_layers_equal_scanned_layers():
    params = _random_params(HOULSBY)
    tokens = _tokens(2)
    scanned = _logits_fn(HOULSBY)(params, tokens)
    unrolled = _logits_fn(dataclasses.replace(HOULSBY, scan_layers=False))(params, tokens)
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_adapter_matches_its_equation(activation):
    """h' = h + act(h·W_down + b_down)·W_up + b_up against numpy, with every weight non-zero."""
    rng = np.random.default_rng(0)
    layer = adapters.BottleneckAdapter(8, 2, jax.random.key(0), activation=activation)
    for name in ("down", "down_bias", "up", "up_bias"):
        getattr(layer, name)[...] = rng.normal(size=getattr(layer, name).shape).astype(np.float32)
    h = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w = {name: np.asarray(getattr(layer, name)[...], np.float64) for name in ("down", "down_bias", "up", "up_bias")}
    z = h @ w["down"] + w["down_bias"]
    act = {"relu": lambda x: np.maximum(x, 0), "silu": lambda x: x / (1 + np.exp(-x)),
           "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))}[activation]
    np.testing.assert_allclose(layer(jnp.asarray(h)), h + act(z) @ w["up"] + w["up_bias"], rtol=1e-5, atol=1e-5)


# --- training only the adapters --------------------------------------------------------------------------------


def _adapter_loss_fn(config, chunk_size=16):
    """mean token loss as a function of (adapter params, frozen base params, batch)."""
    policy = TrainableModel(config)

    def mean_loss(adapter_params, base_params, batch):
        loss_sum, (count, _) = clm.clm_loss(adapter_params, base_params, batch, None, policy=policy,
                                            chunk_size=chunk_size)
        return loss_sum / count

    return mean_loss


@functools.cache
def _loss_and_adapter_grads(config):
    """Jitted, unsharded; shared by the training and the sharding test so that it compiles once."""
    return jax.jit(jax.value_and_grad(_adapter_loss_fn(config)))


def test_training_adapters_leaves_the_base_unchanged_and_lowers_the_loss():
    trainable, frozen = adapters.split_trainable(jax.device_put(_zero_up(_random_params(HOULSBY))))
    frozen_before = _flat(frozen)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def update(trainable, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    batch = helpers.packed_batch(batch_size=4, seq_len=32)
    opt_state = optimizer.init(trainable)
    losses = []
    for _ in range(6):
        loss, grads = _loss_and_adapter_grads(HOULSBY)(trainable, frozen, batch)
        trainable, opt_state = update(trainable, opt_state, grads)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses  # the last loss is after five updates
    for key, value in _flat(frozen).items():
        np.testing.assert_array_equal(value, frozen_before[key], err_msg=key)
    # only the active set ("a") learnt; "task-2" got zero gradients
    assert np.any(trainable["layers"]["adapters"]["a"]["mlp"]["up"])
    assert not np.any(trainable["layers"]["adapters"]["task-2"]["mlp"]["up"])


# --- sharding -----------------------------------------------------------------------------------------------------


def test_sharded_equals_unsharded():
    mesh = helpers.mesh((2, 2, 2))
    batch = helpers.packed_batch(batch_size=4, seq_len=32, seed=1)  # rows divide data×fsdp = 4
    params = _random_params(HOULSBY)
    ref_loss, ref_grads = _loss_and_adapter_grads(HOULSBY)(*adapters.split_trainable(params), batch)

    _, abstract, logical = models.abstract_model(HOULSBY)
    shardings = sharding.tree_shardings(logical, abstract, mesh)
    trainable_sh, _ = adapters.split_trainable(shardings)
    down_spec = trainable_sh["layers"]["adapters"]["a"]["attn"]["down"].spec
    assert down_spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # bottleneck replicated
    trainable, frozen = adapters.split_trainable(jax.device_put(params, shardings))
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(_adapter_loss_fn(HOULSBY)),
                     out_shardings=(sharding.replicated(mesh), trainable_sh))
        loss, grads = fn(trainable, frozen, sharding.global_batch(batch, mesh))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    ref_grads, grads = _flat(ref_grads), _flat(grads)
    for key, g_ref in ref_grads.items():
        if "task-2" in key:  # the inactive set
            assert not np.any(grads[key]) and not np.any(g_ref), key
            continue
        rel = np.linalg.norm(grads[key] - g_ref) / np.linalg.norm(g_ref)
        assert rel <= 1e-5, f"{key}: relative grad difference {rel:.2e}"


# --- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(adapter_placement="parallel", adapter_names=("a",)), "adapter_placement must be one of"),
    (dict(adapter_placement="houlsby", adapter_names=("a",), adapter_reduction=5), "positive divisor"),
    (dict(adapter_placement="houlsby", adapter_names=("a",), adapter_reduction=0), "positive divisor"),
    (dict(adapter_placement="houlsby", adapter_names=("a",), active_adapter="b"), "is not one of"),
    (dict(adapter_names=("a",), active_adapter="a"), "needs model.adapter_placement"),
    (dict(adapter_placement="houlsby", adapter_names=("a", "b", "a")), "more than once"),
    (dict(adapter_placement="pfeiffer"), "needs at least one name"),
    (dict(adapter_placement="pfeiffer", adapter_names=("a/b",)), "letters, digits"),
    (dict(adapter_placement="pfeiffer", adapter_names="ab"), "tuple of names"),
    (dict(adapter_placement="pfeiffer", adapter_names=("a",), adapter_activation="tanh"), "adapter_activation"),
])
def test_config_errors(change, match):
    with pytest.raises(errors.ConfigError, match=match) as info:
        helpers.tiny_model_config(**change)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")  # one sentence


def test_defaults_keep_the_plain_config():
    # a width no reduction divides is fine without adapters; identities from before adapters still match
    assert helpers.tiny_model_config(d_model=60, n_heads=4, n_kv_heads=2).num_adapter_params() == 0
    assert helpers.tiny_model_config(adapter_reduction=0).num_params() == BASE.num_params()
    assert not any(k.startswith("adapter") or k == "active_adapter" for k in BASE.checkpoint_identity())
    assert BASE.flops_per_token(32) == _with_active(HOULSBY, "").flops_per_token(32)
    config = models.ModelConfig.from_dict({**HOULSBY.to_dict(), "adapter_names": ["a", "task-2"]})  # from JSON
    assert config == HOULSBY and hash(config) == hash(HOULSBY)
    assert HOULSBY.checkpoint_identity()["adapter_names"] == ["a", "task-2"]  # as the JSON metadata returns it

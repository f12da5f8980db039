"""A finished run's weights read back (`flaxalign.weights`): `init_from` a LoRA or QLoRA run gives its merged
weights, `run_weights` of an adapter run keeps its adapters, and a quantized base survives a checkpoint."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxalign import models, sharding, weights
from flaxalign.models import adapters
from flaxalign.peft import lora, quant
from flaxalign.policy import TrainableModel
from flaxalign.stages import lm
from flaxalign.train import checkpoint, loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from tests import helpers

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)


def _train_and_save(policy: TrainableModel, path, mesh, steps=3):
    """`steps` SFT updates of `policy`, saved at the last step; returns the final state."""
    task = lm.make_task("sft", policy, helpers.optim_config(lr=5e-2), chunk_size=16)
    checkpointer = Checkpointer(str(path / "checkpoints"), async_save=False)
    state, shardings, _ = loop.initial_state(task, 0, mesh, checkpointer)
    step = CompiledStep(task.train_step, mesh, shardings)
    for seed in range(steps):  # the learning rate warms up from 0
        state, _ = step(state, helpers.packed_batch(seed=seed))
    checkpointer.save(steps, state, {"batches_consumed": steps}, task.metadata)
    checkpointer.close()
    return state


def _hidden(config, params, tokens):
    return np.asarray(models.merge(models.abstract_model(config)[0], params)(tokens))


@pytest.mark.slow  # a run trained, saved and read back (10–13 s): the default group is at its 15-min budget
def test_init_from_a_lora_run_gives_its_merged_weights(tmp_path):
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, modules_to_save=("final_norm/scale",))
    policy = TrainableModel(CONFIG, lora_config)
    mesh = helpers.mesh((2, 1, 1))
    state = _train_and_save(policy, tmp_path, mesh)

    _, abstract, logical = models.abstract_model(CONFIG)
    merged = weights.initializer(CONFIG, str(tmp_path))(sharding.tree_shardings(logical, abstract, mesh))
    tokens = helpers.packed_batch(batch_size=2)["inputs"]
    expected = np.asarray(policy.model(state.params, state.frozen)(tokens))
    np.testing.assert_allclose(_hidden(CONFIG, merged, tokens), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(merged["final_norm"]["scale"]), 1.0)  # the trained module, not the base's
    drop = ("lm_head",)
    without_head = weights.initializer(CONFIG, str(tmp_path), drop=drop)
    assert "lm_head" not in without_head(sharding.tree_shardings(
        {k: v for k, v in logical.items() if k not in drop}, {k: v for k, v in abstract.items() if k not in drop},
        mesh))
    assert jax.tree.structure(merged) == jax.tree.structure(abstract)


@pytest.mark.parametrize("method", ["lora", pytest.param("adapters", marks=pytest.mark.slow)])  # 8 s each
def test_a_frozen_base_stored_in_bfloat16_trains_resumes_and_merges_in_float32(tmp_path, method):
    """model.frozen_dtype=bfloat16: the frozen base is held (and checkpointed) in bfloat16, the trained part and
    the optimizer in float32; the run trains, resumes, and reads back as float32 weights equal to merging the
    trained part into the bfloat16 base; resuming with another frozen dtype casts the frozen part as it is read."""
    config = dataclasses.replace(CONFIG, frozen_dtype="bfloat16")
    if method == "adapters":
        config = dataclasses.replace(config, adapter_placement="houlsby", adapter_names=("task",),
                                     active_adapter="task")
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, modules_to_save=("final_norm/scale",)) if (
        method == "lora") else None
    policy = TrainableModel(config, lora_config)
    assert {x.dtype for x in jax.tree.leaves(policy.abstract_frozen)} == {np.dtype("bfloat16")}
    mesh = helpers.mesh((1, 1, 1))
    state = _train_and_save(policy, tmp_path, mesh)
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {np.dtype("float32"),
                                                                                    np.dtype("int32")}
    loaded_config, params = weights.run_weights(str(tmp_path), mesh)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    tokens = helpers.packed_batch(batch_size=2)["inputs"]
    expected = np.asarray(policy.model(state.params, state.frozen)(tokens))
    np.testing.assert_allclose(_hidden(loaded_config, params, tokens), expected, rtol=2e-5, atol=2e-5)
    # the same run resumed as saved, and with a float32 base: refused, naming the setting
    class Data:  # the data position a resume restores
        def set_state(self, state):
            self.state = state

    def task_of(policy):
        return lm.make_task("sft", policy, helpers.optim_config(lr=5e-2), chunk_size=16, train_data=Data())

    resumed = loop.initial_state(task_of(policy), 0, mesh,
                                 Checkpointer(str(tmp_path / "checkpoints"), async_save=False))[0]
    assert int(resumed.step) == 3
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), resumed.frozen,
                                     state.frozen))
    # resumed (or read) with another frozen dtype — a run saved before frozen_dtype existed, on another backend —
    # the frozen part is cast as it is read, and the trained part is untouched
    float_policy = TrainableModel(dataclasses.replace(config, frozen_dtype="float32"), lora_config)
    as_float = loop.initial_state(task_of(float_policy), 0, mesh,
                                  Checkpointer(str(tmp_path / "checkpoints"), async_save=False))[0]
    for got, saved in zip(jax.tree.leaves(as_float.frozen), jax.tree.leaves(state.frozen), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved).astype(np.float32))
    np.testing.assert_array_equal(jax.tree.leaves(as_float.params)[0], jax.tree.leaves(state.params)[0])


@pytest.mark.slow  # a run trained, saved and read back (10–13 s): the default group is at its 15-min budget
def test_a_qlora_run_keeps_its_quantized_base_and_reads_back_merged(tmp_path):
    """NF4 base + LoRA: the checkpoint holds the base quantized (uint8 codes, bitwise as trained), resuming
    restores it, and `init_from` / `run_weights` give the dequantized base with the LoRA merged."""
    policy = TrainableModel(CONFIG, lora.LoraConfig(rank=4, alpha=8.0), quant.QuantConfig("nf4", double_quant=True))
    mesh = helpers.mesh((1, 1, 1))
    state = _train_and_save(policy, tmp_path, mesh)
    codes = state.frozen["layers"]["mlp"]["up"].codes
    assert codes.dtype == np.uint8 and codes.shape == (CONFIG.n_layers, CONFIG.d_model // 2, CONFIG.d_ff)

    task = lm.make_task("sft", policy, helpers.optim_config(lr=5e-2), chunk_size=16,
                        train_data=helpers.DataPosition())
    restored, _, step = loop.initial_state(task, 0, mesh, Checkpointer(str(tmp_path / "checkpoints")))
    assert step == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    tokens = helpers.packed_batch(batch_size=2)["inputs"]
    expected = np.asarray(policy.model(state.params, state.frozen)(tokens))
    config, params = weights.run_weights(str(tmp_path), mesh)
    assert config == CONFIG and all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(_hidden(CONFIG, params, tokens), expected, rtol=1e-5, atol=1e-5)
    _, abstract, logical = models.abstract_model(CONFIG)
    merged = weights.initializer(CONFIG, str(tmp_path))(sharding.tree_shardings(logical, abstract, mesh))
    np.testing.assert_allclose(_hidden(CONFIG, merged, tokens), expected, rtol=1e-5, atol=1e-5)


def test_run_weights_of_an_adapter_run_keep_its_adapters(tmp_path):
    config = dataclasses.replace(CONFIG, adapter_placement="houlsby", adapter_names=("task",), active_adapter="task")
    mesh = helpers.mesh((1, 1, 1))
    state = _train_and_save(TrainableModel(config), tmp_path, mesh)
    loaded_config, params = weights.run_weights(str(tmp_path), mesh)
    assert loaded_config == config
    tokens = helpers.packed_batch(batch_size=2)["inputs"]
    np.testing.assert_array_equal(_hidden(config, params, tokens),
                                  _hidden(config, adapters.join(state.params, state.frozen), tokens))


def _quantized_base(policy, init_base, mesh):
    shardings = sharding.tree_shardings(policy.frozen_logical, policy.abstract_frozen, mesh)
    return jax.device_get(policy.init_frozen(shardings, init_base))


def _float32_stacks(created: list, config) -> list:
    """The float32 arrays of a layer weight's full stacked shape among the arrays `created`."""
    stacked = {(config.n_layers,) + s for s in [(config.d_model, config.d_ff), (config.d_ff, config.d_model)]}
    return [shape for shape, dtype in created if dtype == np.float32 and shape in stacked]


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_a_quantized_base_is_built_one_layer_at_a_time_from_pretrained_files(tmp_path, monkeypatch, kind):
    """QLoRA from `hf:DIR` or `gguf:FILE`: the NF4 base equals quantizing the float32 weights whole, bit for bit,
    while no float32 array of a whole stacked layer weight is ever placed on the devices (each layer is quantized as
    it is read)."""
    from flaxalign import interop

    config = dataclasses.replace(CONFIG, d_ff=128)
    params = helpers.random_params(config)
    if kind == "hf":
        interop.save_hf(config, params, str(tmp_path / "hf"))
        source = f"hf:{tmp_path / 'hf'}"
    else:
        from tests.interop.test_gguf import write_gguf
        source = f"gguf:{write_gguf(tmp_path / 'tiny.gguf', config, params)}"
    policy = TrainableModel(config, lora.LoraConfig(rank=4), quant.QuantConfig("nf4"))
    mesh = helpers.mesh((2, 1, 1))
    created = []
    original = jax.make_array_from_callback

    def recording(shape, sharding_, callback, *args, **kwargs):
        array = original(shape, sharding_, callback, *args, **kwargs)
        created.append((tuple(shape), array.dtype))
        return array

    monkeypatch.setattr(jax, "make_array_from_callback", recording)
    streamed = _quantized_base(policy, weights.initializer(config, source), mesh)
    monkeypatch.undo()
    assert created and not _float32_stacks(created, config), created
    whole = jax.device_get(quant.quantize_tree(params, models.abstract_model(config)[2], policy.quant))
    assert jax.tree.structure(streamed) == jax.tree.structure(whole)
    for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_quantized_base_is_read_one_weight_at_a_time_from_a_full_run(tmp_path, monkeypatch):
    """QLoRA from a full fine-tuning run: the base equals quantizing the run's float32 weights whole (int8 here),
    and each checkpoint read holds one weight, never the whole float32 base."""
    config = dataclasses.replace(CONFIG, d_ff=128)
    state = _train_and_save(TrainableModel(config), tmp_path, helpers.mesh((1, 1, 1)), steps=1)
    policy = TrainableModel(config, lora.LoraConfig(rank=4), quant.QuantConfig("int8"))
    reads = []
    original = checkpoint.load_params

    def recording(path, abstract, shardings, part="params"):
        reads.append(sum(x.size for x in jax.tree.leaves(abstract)))
        return original(path, abstract, shardings, part)

    monkeypatch.setattr(checkpoint, "load_params", recording)
    streamed = _quantized_base(policy, weights.initializer(config, str(tmp_path)), helpers.mesh((2, 1, 1)))
    monkeypatch.undo()
    largest = max(x.size for x in jax.tree.leaves(state.params))
    assert len(reads) == len(jax.tree.leaves(state.params)) and max(reads) == largest
    whole = jax.device_get(quant.quantize_tree(jax.device_get(state.params), models.abstract_model(config)[2],
                                               policy.quant))
    for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_scoring_model_keeps_its_own_adapters_and_the_policys_compute_settings(monkeypatch):
    """`same_vocabulary` builds the config of a reference / reward model from its own metadata: an adapters policy
    with a plain reward model gets a plain reward model (not the policy's active adapter set), a reward model with
    adapters keeps its sets and active one, and both take the policy's compute dtype."""
    policy = dataclasses.replace(CONFIG, adapter_placement="houlsby", adapter_names=("task",), active_adapter="task",
                                 dtype="bfloat16")
    plain_rm = dataclasses.replace(CONFIG, init_std=0.05)
    monkeypatch.setattr(weights, "metadata", lambda source: {"model": plain_rm.to_dict(), "tokenizer": ""})
    config = models.ModelConfig.from_dict(weights.same_vocabulary({}, "rm", policy, "reward"))
    assert config == dataclasses.replace(plain_rm, dtype="bfloat16")
    adapter_rm = dataclasses.replace(CONFIG, adapter_placement="pfeiffer", adapter_names=("rm", "other"),
                                     active_adapter="rm")
    monkeypatch.setattr(weights, "metadata", lambda source: {"model": adapter_rm.to_dict(), "tokenizer": ""})
    config = models.ModelConfig.from_dict(weights.same_vocabulary({}, "rm", policy, "reward"))
    assert config == dataclasses.replace(adapter_rm, dtype="bfloat16")

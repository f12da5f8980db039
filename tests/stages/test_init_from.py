"""`init_from` a LoRA run: the next stage starts from the LoRA run's merged weights."""

import jax
import numpy as np

from flaxalign import models, sharding
from flaxalign.peft import lora
from flaxalign.stages import lm
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from tests import helpers

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)


def test_init_from_a_lora_run_gives_its_merged_weights(tmp_path):
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, modules_to_save=("final_norm/scale",))
    task = lm.make_task("sft", CONFIG, helpers.optim_config(lr=5e-2), lora_config=lora_config, chunk_size=16)
    mesh = helpers.mesh((2, 1, 1))
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    state, shardings, _ = loop.initial_state(task, 0, mesh, checkpointer)
    step = CompiledStep(task.train_step, mesh, shardings)
    for seed in range(3):  # the learning rate warms up from 0
        state, _ = step(state, helpers.packed_batch(seed=seed))
    checkpointer.save(3, state, {}, task.metadata)
    checkpointer.close()

    graphdef, abstract, logical = models.abstract_model(CONFIG)
    init = lm.base_initializer(CONFIG, str(tmp_path))
    merged = init(sharding.tree_shardings(logical, abstract, mesh))
    tokens = helpers.packed_batch(batch_size=2)["inputs"]
    params, transform = lm.model_params(state.params, state.frozen, None, lora_config=lora_config)
    expected = models.merge(graphdef, params)(tokens, layer_transform=transform)
    got = models.merge(graphdef, merged)(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(merged["final_norm"]["scale"]), 1.0)  # the trained module, not the base's
    without_head = lm.base_initializer(CONFIG, str(tmp_path), drop=("lm_head",))
    assert "lm_head" not in without_head(sharding.tree_shardings(
        lm.without(logical, ("lm_head",)), lm.without(abstract, ("lm_head",)), mesh))
    assert jax.tree.structure(merged) == jax.tree.structure(abstract)


def test_run_weights_of_an_adapter_run_keep_its_adapters(tmp_path):
    import dataclasses

    from flaxalign.models import adapters

    config = dataclasses.replace(CONFIG, adapter_placement="houlsby", adapter_names=("task",), active_adapter="task")
    task = lm.make_task("sft", config, helpers.optim_config(lr=5e-2), chunk_size=16)
    mesh = helpers.mesh((1, 1, 1))
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    state, shardings, _ = loop.initial_state(task, 0, mesh, checkpointer)
    step = CompiledStep(task.train_step, mesh, shardings)
    for seed in range(3):
        state, _ = step(state, helpers.packed_batch(seed=seed))
    checkpointer.save(3, state, {}, task.metadata)
    checkpointer.close()

    loaded_config, params = lm.load_run_weights(str(tmp_path), mesh)
    assert loaded_config == config
    graphdef = models.abstract_model(config)[0]
    tokens = helpers.packed_batch(batch_size=2)["inputs"]
    expected = models.merge(graphdef, adapters.join(state.params, state.frozen))(tokens)
    np.testing.assert_array_equal(np.asarray(models.merge(graphdef, params)(tokens)), np.asarray(expected))

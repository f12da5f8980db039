"""Checkpoints restore onto a different mesh; a changed model is refused with a clear error."""

import os

import jax
import numpy as np
import pytest

from flaxalign import errors, sharding
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from tests import helpers


def _task(**model_overrides):
    task = helpers.clm_task(helpers.tiny_model_config(**model_overrides))
    task.train_data = helpers.DataPosition()
    return task


def test_restore_from_2x2x2_onto_8x1x1_gives_equal_params(tmp_path):
    directory = str(tmp_path / "ckpt")
    saver_task, saver_mesh = _task(), helpers.mesh((2, 2, 2))
    checkpointer = Checkpointer(directory)
    state, shardings, _ = loop.initial_state(saver_task, 0, saver_mesh, checkpointer)
    state, _ = CompiledStep(saver_task.train_step, saver_mesh, shardings)(
        state, sharding.global_batch(helpers.packed_batch(), saver_mesh))  # moments are non-zero now
    saved = jax.tree.map(np.asarray, state)
    saver_task.train_data.state = {"batches_consumed": 7}
    checkpointer.save(1, state, saver_task.train_data.get_state(), saver_task.metadata)
    checkpointer.close()

    loader_task, loader_mesh = _task(), helpers.mesh((8, 1, 1))
    restored, shardings, step = loop.initial_state(loader_task, 0, loader_mesh, Checkpointer(directory))
    assert step == 1 and loader_task.train_data.get_state() == {"batches_consumed": 7}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), b)
    embed = restored.params["embed"]
    assert embed.sharding.mesh.shape == loader_mesh.shape  # placed on the new mesh, not the saved one


def test_restore_refuses_a_different_model(tmp_path):
    directory = str(tmp_path / "ckpt")
    task, mesh = _task(), helpers.mesh((1, 1, 1))
    checkpointer = Checkpointer(directory)
    state, _, _ = loop.initial_state(task, 0, mesh, checkpointer)
    checkpointer.save(0, state, task.train_data.get_state(), task.metadata)
    checkpointer.close()
    with pytest.raises(errors.CheckpointError, match=r"different model config \(changed: model.d_ff\)"):
        loop.initial_state(_task(d_ff=128), 0, mesh, Checkpointer(directory))
    assert os.listdir(directory) == ["0"]
    # compute-only settings may change between runs
    _, _, step = loop.initial_state(_task(remat="full", attention="dot_product"), 0, mesh, Checkpointer(directory))
    assert step == 0

"""CLM step: sharding invariance, micro-batch invariance, compile-once, golden one-step metrics."""

import functools
import os

import jax
import numpy as np
import pytest

from flaxalign import models, sharding
from flaxalign.policy import TrainableModel
from flaxalign.stages import clm
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from tests import helpers


def _fresh_state(task, mesh, tmp_path, name="ckpt"):
    checkpointer = Checkpointer(os.path.join(tmp_path, name))
    state, shardings, restored = loop.initial_state(task, 0, mesh, checkpointer)
    assert restored is None
    return state, shardings, checkpointer


def _loss_and_grads(model_config, mesh, batch):
    _, abstract, logical = models.abstract_model(model_config)
    params_sh = sharding.tree_shardings(logical, abstract, mesh)
    params = models.init_params(model_config, 0, params_sh)
    loss_fn = functools.partial(clm.clm_loss, policy=TrainableModel(model_config), chunk_size=16)

    def mean_loss(params, batch):
        loss_sum, (count, _) = loss_fn(params, {}, batch, None)
        return loss_sum / count

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(mean_loss), out_shardings=(sharding.replicated(mesh), params_sh))
        loss, grads = fn(params, sharding.global_batch(batch, mesh))
    return float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1)])
def test_sharded_loss_and_grads_equal_unsharded(shape):
    model_config = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2)
    batch = helpers.packed_batch(batch_size=8, seq_len=32)
    ref_loss, ref_grads = _loss_and_grads(model_config, helpers.mesh((1, 1, 1)), batch)
    loss, grads = _loss_and_grads(model_config, helpers.mesh(shape), batch)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for path, g, g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads),
                              jax.tree.leaves(ref_grads)):
        rel = np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)
        assert rel <= 1e-5, f"{jax.tree_util.keystr(path[0])}: relative grad difference {rel:.2e} on mesh {shape}"


def _one_update(tmp_path, batch, grad_accum):
    task = helpers.clm_task(helpers.tiny_model_config(), grad_accum=grad_accum)
    mesh = helpers.mesh((2, 1, 4))  # micro-batches of 2 rows must divide data×fsdp
    state, shardings, _ = _fresh_state(task, mesh, str(tmp_path), f"accum{grad_accum}")
    step = CompiledStep(task.train_step, mesh, shardings)
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    return jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


def test_micro_batches_give_the_same_update_as_one_batch(tmp_path):
    batch = helpers.packed_batch(batch_size=8, seq_len=32, seed=3)
    one_params, one_metrics = _one_update(tmp_path, batch, grad_accum=1)
    acc_params, acc_metrics = _one_update(tmp_path, batch, grad_accum=4)
    np.testing.assert_allclose(acc_metrics["loss"], one_metrics["loss"], rtol=1e-6)
    assert acc_metrics["loss_tokens"] == one_metrics["loss_tokens"]
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_train_step_compiles_once(tmp_path):
    task = helpers.clm_task(helpers.tiny_model_config())
    mesh = helpers.mesh((2, 2, 2))
    state, shardings, _ = _fresh_state(task, mesh, str(tmp_path))
    step = CompiledStep(task.train_step, mesh, shardings)
    losses = []
    for i in range(5):
        state, metrics = step(state, sharding.global_batch(helpers.packed_batch(seed=i), mesh))
        losses.append(float(metrics["loss"]))
    assert step.trace_count == 1, f"the train step was traced {step.trace_count} times in 5 steps"
    assert int(state.step) == 5 and len(set(losses)) == 5


# Recorded on the tiny preset, seed 0, no warmup, helpers.packed_batch(seed=0), one device, jax 0.10.2 / CPU.
GOLDEN_ONE_STEP = {"loss": 6.242022, "grad_norm": 0.9932361, "loss_after": 5.773457}


def test_golden_one_step_metrics(tmp_path):
    task = helpers.clm_task(helpers.tiny_model_config(), helpers.optim_config(warmup_steps=0))
    mesh = helpers.mesh((1, 1, 1))
    state, shardings, _ = _fresh_state(task, mesh, str(tmp_path))
    step = CompiledStep(task.train_step, mesh, shardings)
    batch = sharding.global_batch(helpers.packed_batch(seed=0), mesh)
    state, first = step(state, batch)
    _, second = step(state, batch)
    measured = {"loss": float(first["loss"]), "grad_norm": float(first["grad_norm"]),
                "loss_after": float(second["loss"])}
    for key, golden in GOLDEN_ONE_STEP.items():
        assert measured[key] == pytest.approx(golden, rel=1e-4), (
            f"{key} after one step changed: {measured[key]:.7g} vs recorded {golden:.7g} — did you mean to change "
            f"this? If so, update GOLDEN_ONE_STEP (all measured: {measured}).")

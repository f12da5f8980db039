"""A non-finite loss or gradient never reaches the weights: the update is skipped and counted, a run of such steps
stops the training with one error, and no checkpoint ever holds non-finite parameters."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flaxalign import errors
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer, load_params
from flaxalign.train.optim import make_optimizer
from flaxalign.train.state import create_state
from flaxalign.train.step import gradient_step
from tests import helpers


def _quadratic_loss(params, frozen, batch, rng):
    """Σ (w − target)², NaN when the batch says so."""
    loss = jnp.sum((params["w"] - batch["target"]) ** 2) * batch["scale"]
    return loss, (jnp.asarray(1.0), {})


def _one_step(scale):
    optimizer = make_optimizer(helpers.optim_config(warmup_steps=0))
    state = create_state({"w": jnp.ones(3)}, optimizer, seed=0)
    batch = {"target": jnp.zeros(3), "scale": jnp.asarray(scale, jnp.float32)}
    new, metrics = jax.jit(lambda s, b: gradient_step(_quadratic_loss, s, b, optimizer=optimizer,
                                                      schedule=optax.constant_schedule(1e-2), grad_accum=1))(state,
                                                                                                         batch)
    return state, new, metrics


@pytest.mark.parametrize("scale", [np.nan, np.inf])
def test_a_nonfinite_loss_skips_the_update_and_counts_the_step(scale):
    state, new, metrics = _one_step(scale)
    assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == int(state.step) + 1
    for before, after in zip(jax.tree.leaves((state.params, state.opt_state)),
                             jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(before, after)


def test_a_finite_loss_updates_as_before():
    state, new, metrics = _one_step(1.0)
    assert float(metrics["nonfinite"]) == 0.0
    assert float(jnp.max(jnp.abs(new.params["w"] - state.params["w"]))) > 1e-3


def _loop_config(**overrides):
    values = dict(steps=12, log_every=4, eval_every=0, checkpoint_every=2, keep_checkpoints=2, seed=0,
                  max_nonfinite_steps=3)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


class _Batches:
    """Packed CLM batches; from batch `poison_from` on, the loss mask is NaN, so the loss and the gradients are
    NaN (as a corrupt batch or an overflow would make them)."""

    def __init__(self, poison_from: int):
        self.poison_from, self.consumed = poison_from, 0

    def __next__(self):
        batch = helpers.packed_batch(seed=self.consumed)
        if self.consumed >= self.poison_from:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        self.consumed += 1
        return batch

    def __iter__(self):
        return self

    def get_state(self):
        return {"batches_consumed": self.consumed}

    def set_state(self, state):
        self.consumed = state["batches_consumed"]


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_finite_checkpoints(tmp_path):
    task = helpers.clm_task(helpers.tiny_model_config())
    task.train_data = _Batches(poison_from=5)  # steps 6, 7 and 8 are non-finite
    with pytest.raises(errors.TrainingError, match=r"3 consecutive steps \(from step 6\).*last checkpoint \(step 6\)"):
        loop.train(task, _loop_config(), str(tmp_path), helpers.mesh((1, 1, 1)))
    # step 6 skipped its update, so its params are step 5's (finite) and it was saved; the run stopped at step 8,
    # its third non-finite step, without saving
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4, 6]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = load_params(str(tmp_path), task.abstract_params, jax.tree.map(lambda _: device, task.abstract_params))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 4, 8]
    assert rows[1]["nonfinite"] == 0.0 and rows[2]["nonfinite"] == 1.0


def test_start_up_line_counts_trained_and_frozen_parameters():
    """The log line a run starts with: LoRA-like trained leaves, a frozen float32 and a frozen uint8 (quantized)
    leaf, and AdamW's two moments of the trained leaves."""
    import jax.numpy as jnp
    import optax

    from flaxalign.train.loop import describe_state
    from flaxalign.train.state import create_state

    params = {"a": jnp.zeros((4, 8)), "b": jnp.zeros((8, 4))}  # 64 values, 256 bytes
    frozen = {"w": jnp.zeros((256, 256)), "codes": jnp.zeros((1024,), jnp.uint8)}  # 66,560 values, 263,168 bytes
    state = create_state(params, optax.adamw(1e-3), 0, frozen)
    assert describe_state(state) == (
        "Parameters: 64 trained (0.00 MiB, 0.0961% of the values held), 66,560 frozen values (0.25 MiB); "
        "optimizer state 0.00 MiB")

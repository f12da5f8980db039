"""Online DPO stage: the pairing (higher reward first, the first sample on a tie), a golden one-step update against a
DPO loss written from scratch over unpadded rows (ties left out, or kept as TRL does), the invariances (sharded,
micro-batched), a non-finite reward skipping the update, and the `loss` block's one-line errors."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxalign import errors
from flaxalign.data.batching import left_pad_prompts
from flaxalign.policy import TrainableModel
from flaxalign.stages import group_rollout, online_dpo, onpolicy
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from flaxalign.train.task import Task
from tests import helpers, rollout_reference

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2)
PROMPT_IDS = [list(np.random.default_rng(0).integers(4, 512, size=n)) for n in (3, 6, 4, 5)]
NEW_TOKENS, LR, BETA = 6, 0.05, 0.1
REWARDS = [1.0, 0.0, 0.0, 2.0, 0.5, 0.5, -1.0, 3.0]  # pairs: first wins, second wins, tie, second wins


def _task(h, grad_accum=1):
    policy = TrainableModel(CONFIG)
    m = group_rollout.RolloutModels(policy=onpolicy.Policy(policy, 1.0, 16))
    layout = group_rollout.rollout_layout(
        policy, init_base=lambda shardings: jax.device_put(helpers.random_params(CONFIG, 0), shardings),
        reference=True)
    optimizer = optax.sgd(LR)
    task = Task(name="online_dpo", optimizer=optimizer, eval_step=None, train_data=None, eval_batches=None,
                train_step=functools.partial(online_dpo.online_dpo_step, m=m, h=h, optimizer=optimizer,
                                             grad_accum=grad_accum),
                tokens_per_step=1, flops_per_step=1.0, metadata={}, **layout)
    return task, m


def _state(task, mesh, tmp, name):
    return loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(tmp, name)))[:2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A rollout of 4 prompts × 2 samples with an EOS some rows emit, scored by the stage's pieces."""
    h = online_dpo.OnlineDpoHyper(beta=BETA)
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path_factory.mktemp("setup")), "rollout")
    prompts = left_pad_prompts(PROMPT_IDS, pad_id=0)

    @jax.jit
    def fn(state, prompts, eos_id):
        prompts = group_rollout.repeat_prompts({**prompts, "index": np.arange(len(PROMPT_IDS))}, 2)
        engine = m.policy.rollout_sampler(eos_id=eos_id, pad_id=0)
        sampled = engine.traced(m.policy.weights(state.params, state.frozen),
                                {k: prompts[k] for k in onpolicy.PROMPT_KEYS}, jax.random.PRNGKey(3),
                                onpolicy.Sampling(NEW_TOKENS, 1.0))
        return group_rollout.score_rollout(state, sampled, prompts["index"], m=m, with_reference=True)

    with jax.set_mesh(mesh):
        free = jax.device_get(fn(state, prompts, np.int32(-1)))["response"]
        eos_id = max(set(free[:, :4].ravel()), key=lambda t: int(np.sum((free[:, :4] == t).any(1))))
        batch = jax.device_get(fn(state, prompts, np.int32(eos_id)))
    batch["rewards"] = np.asarray(REWARDS, np.float32)
    assert len(set(batch["response_mask"].sum(1))) > 1
    return h, batch, int(eos_id), jax.device_get(state.params)


def test_chosen_first_orders_each_pair_by_reward():
    batch = {k: np.arange(8 * 3).reshape(8, 3) for k in online_dpo.PAIR_KEYS}
    batch["rewards"] = np.asarray(REWARDS, np.float32)
    pairs = jax.device_get(online_dpo.chosen_first(batch))
    np.testing.assert_array_equal(pairs["scores"], [[1, 0], [2, 0], [0.5, 0.5], [3, -1]])
    np.testing.assert_array_equal(pairs["tokens"][:, 0, 0], [0, 9, 12, 21])  # rows 0, 3, 4 (tie: first), 7
    np.testing.assert_array_equal(pairs["tokens"][:, 1, 0], [3, 6, 15, 18])


def _reference_update(params, batch, eos_id, skip_ties):
    """SGD on the mean DPO sigmoid loss of the pairs (the tied pair left out with `skip_ties`), written from scratch:
    each row rebuilt unpadded, its response log-prob summed from the model's logits at positions 0 … T − 1, chosen
    by reward (the first row on a tie), the reference being the starting weights."""
    rows = [rollout_reference.unpadded_row(PROMPT_IDS[i // 2], r, eos_id) for i, r in enumerate(batch["response"])]
    prompt_lens = [len(PROMPT_IDS[i // 2]) for i in range(len(rows))]
    width = max(len(r) for r in rows)
    tokens = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int32)
    forward = rollout_reference._forward(CONFIG, "logits")

    def sums(p):
        logp = jax.nn.log_softmax(forward(p, tokens).astype(jnp.float64), axis=-1)
        return jnp.stack([jnp.sum(logp[i, jnp.arange(n - 1, len(r) - 1), r[n:]]) for i, (r, n) in
                          enumerate(zip(rows, prompt_lens))])

    rewards = np.asarray(REWARDS).reshape(-1, 2)
    chosen = np.where(rewards[:, 1] > rewards[:, 0], 1, 0)
    pick = np.arange(0, len(rows), 2)
    decisive = rewards[:, 0] != rewards[:, 1] if skip_ties else np.ones(len(rewards), bool)

    def loss(p, ref):
        s = sums(p) - ref
        margin = (s[pick + chosen] - s[pick + 1 - chosen])[decisive]
        return jnp.mean(-jax.nn.log_sigmoid(BETA * margin))

    with jax.enable_x64(True):
        ref = jax.lax.stop_gradient(sums(params))
        value, grads = jax.value_and_grad(loss)(params, ref)
    return float(value), jax.tree.map(lambda p, g: p - LR * np.asarray(g, np.float32), params, grads)


@pytest.mark.parametrize("skip_ties", [True, False])
def test_one_step_equals_dpo_written_from_scratch(setup, tmp_path, skip_ties):
    h, batch, eos_id, params = setup
    h = dataclasses.replace(h, skip_ties=skip_ties)
    task, _ = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path), "golden")
    new_state, metrics = jax.device_get(CompiledStep(task.train_step, mesh, shardings)(state, batch))
    value, expected = _reference_update(params, batch, eos_id, skip_ties)
    assert value == pytest.approx(np.log(2), abs=1e-6)  # π = π_ref at the start: every pair's loss is ln 2
    assert metrics["loss"] == pytest.approx(value, abs=1e-6) and metrics["skipped"] == 0
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)))
    error = max(float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.params)))
    assert moved > 1e-4 and error < 1e-6, (moved, error)
    assert metrics["tie_rate"] == 0.25 and metrics["reward_margin"] == pytest.approx((1 + 2 + 0 + 4) / 4)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the rollout's policy is the reference


def test_sharded_and_micro_batched_steps_equal_one_device(setup, tmp_path):
    h, batch, _, _ = setup
    tmp = str(tmp_path)

    def run(task, mesh, name):
        state, shardings = _state(task, mesh, tmp, name)
        return jax.device_get(CompiledStep(task.train_step, mesh, shardings)(state, batch)[0].params)

    task, _ = _task(h)
    reference = run(task, helpers.mesh((1, 1, 1)), "one")
    assert helpers.max_difference(reference, run(task, helpers.mesh((2, 2, 1)), "sharded")) < 1e-6
    assert helpers.max_difference(reference, run(_task(h, grad_accum=2)[0], helpers.mesh((1, 1, 1)), "micro")) < 1e-6


def test_nonfinite_reward_skips_the_update(setup, tmp_path):
    h, batch, _, params = setup
    task, _ = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path), "nan")
    bad = dict(batch, rewards=np.where(np.arange(8) == 3, np.nan, batch["rewards"]).astype(np.float32))
    new_state, metrics = jax.device_get(CompiledStep(task.train_step, mesh, shardings)(state, bad))
    assert metrics["skipped"] == 1 and int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state.params, params)


def test_a_rollout_of_ties_only_updates_nothing(setup, tmp_path):
    """With `skip_ties`, a step whose pairs all tie is skipped (no optimizer update that momentum could drive);
    without it, TRL's way, the first sample of each pair is trained as chosen."""
    h, batch, _, params = setup
    ties = dict(batch, rewards=np.ones(8, np.float32))
    mesh = helpers.mesh((1, 1, 1))
    for skip_ties, skipped in ((True, 1), (False, 0)):
        task, _ = _task(dataclasses.replace(h, skip_ties=skip_ties))
        state, shardings = _state(task, mesh, str(tmp_path), f"ties_{skip_ties}")
        new_state, metrics = jax.device_get(CompiledStep(task.train_step, mesh, shardings)(state, ties))
        assert metrics["skipped"] == skipped and int(new_state.step) == 1
        assert (helpers.max_difference(new_state.params, params) == 0) == bool(skipped)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="orpo"), "Unknown DPO loss_type 'orpo'; valid ones: sigmoid, robust"),
    (dict(beta=0.0), "loss.beta must be > 0, got 0.0."),
    (dict(loss_type="exo_pair"), "'exo_pair' needs 0 < label_smoothing < 1"),
    (dict(missing_eos_penalty=-1.0), "missing_eos_penalty must be >= 0, got -1.0."),
])
def test_bad_loss_settings_are_one_line(kwargs, message):
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        online_dpo.OnlineDpoHyper(**kwargs)

"""Distillation stage: a golden one-step update against generalized JSD written from scratch over unpadded rows (a
one-layer student of width 32, a two-layer teacher of width 64, one vocabulary), the invariances (sharded,
micro-batched), responses drawn by the student or — sequence-level KD — by the teacher, and the config errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxalign import errors, models, sampler
from flaxalign.data.batching import left_pad_prompts
from flaxalign.policy import TrainableModel
from flaxalign.stages import distill, group_rollout, onpolicy
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from flaxalign.train.task import Task
from tests import helpers, rollout_reference

TEACHER = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2)
STUDENT = helpers.tiny_model_config(d_model=32, n_heads=2, n_kv_heads=1, n_layers=1)
PROMPT_IDS = [list(np.random.default_rng(0).integers(4, 512, size=n)) for n in (3, 6, 4, 5)]
NEW_TOKENS, LR, BETA, TAU = 6, 0.05, 0.3, 0.9  # β ≠ ½: JSD_β is not symmetric, so a swap of roles shows


def _task(h, grad_accum=1):
    student = TrainableModel(STUDENT)
    graphdef, abstract, logical = models.abstract_model(TEACHER)
    teacher = (abstract, logical, lambda shardings: jax.device_put(helpers.random_params(TEACHER, 1), shardings))
    m = distill.DistillModels(onpolicy.Policy(student, TAU, 16), graphdef, 16)
    layout = group_rollout.rollout_layout(
        student, init_base=lambda shardings: jax.device_put(helpers.random_params(STUDENT, 0), shardings),
        reference=False, frozen_models={"teacher": teacher})
    optimizer = optax.sgd(LR)
    task = Task(name="distill", optimizer=optimizer, eval_step=None, train_data=None, eval_batches=None,
                train_step=functools.partial(distill.distill_step, m=m, h=h, optimizer=optimizer,
                                             grad_accum=grad_accum),
                tokens_per_step=1, flops_per_step=1.0, metadata={}, **layout)
    return task, m


def _state(task, mesh, tmp, name):
    return loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(tmp, name)))[:2]


def _rollout(m, h, state, mesh, eos_id):
    prompts = {k: v for k, v in left_pad_prompts(PROMPT_IDS, pad_id=0).items() if k in onpolicy.PROMPT_KEYS}
    rollouts = distill.DistillRollouts(mesh, m, h, sampling=onpolicy.Sampling(NEW_TOKENS, 1.0), eos_id=eos_id,
                                       pad_id=0)
    return jax.device_get(rollouts(state, 0, prompts)[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The student's rollout of 4 prompts, with an EOS that some rows emit."""
    h = distill.DistillHyper(beta=BETA, temperature=TAU)
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path_factory.mktemp("setup")), "rollout")
    free = _rollout(m, h, state, mesh, -1)["response"]
    eos_id = int(max(set(free[:, :4].ravel()), key=lambda t: int(np.sum((free[:, :4] == t).any(1)))))
    batch = _rollout(m, h, state, mesh, eos_id)
    assert len(set(batch["response_mask"].sum(1))) > 1
    return h, batch, eos_id, jax.device_get(state)


def _jsd(log_s, log_t):
    """Generalized JSD at β = BETA from log-probabilities, written out."""
    log_m = jnp.logaddexp(jnp.log(BETA) + log_t, jnp.log1p(-BETA) + log_s)
    return (BETA * jnp.sum(jnp.exp(log_t) * (log_t - log_m), -1)
            + (1 - BETA) * jnp.sum(jnp.exp(log_s) * (log_s - log_m), -1))


def _reference_update(student_params, teacher_params, batch, eos_id):
    """SGD on the token mean of JSD_β(student ‖ teacher) at τ over every response token, written from scratch: each
    row rebuilt unpadded and run at positions 0 … T − 1 by both models."""
    rows = [rollout_reference.unpadded_row(PROMPT_IDS[i], r, eos_id) for i, r in enumerate(batch["response"])]
    width = max(len(r) for r in rows)
    tokens = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int32)
    picks = [(i, t) for i, r in enumerate(rows) for t in range(len(PROMPT_IDS[i]) - 1, len(r) - 1)]
    rows_at, positions = (np.asarray(x) for x in zip(*picks))
    teacher_logits = rollout_reference._forward(TEACHER, "logits")(teacher_params, tokens)[rows_at, positions]
    log_t = jax.nn.log_softmax(np.asarray(teacher_logits, np.float64) / TAU, -1)
    student_forward = rollout_reference._forward(STUDENT, "logits")

    def loss(params):
        logits = student_forward(params, tokens)[rows_at, positions].astype(jnp.float64)
        return jnp.mean(_jsd(jax.nn.log_softmax(logits / TAU, -1), log_t))

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss)(student_params)
    return float(value), jax.tree.map(lambda p, g: p - LR * np.asarray(g, np.float32), student_params, grads)


def test_one_step_equals_generalized_jsd_written_from_scratch(setup, tmp_path):
    h, batch, eos_id, start = setup
    task, _ = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path), "golden")
    new_state, metrics = jax.device_get(CompiledStep(task.train_step, mesh, shardings)(state, batch))
    value, expected = _reference_update(start.params, start.frozen["teacher"], batch, eos_id)
    assert value > 0.05 and metrics["loss"] == pytest.approx(value, rel=1e-5)
    assert metrics["jsd"] == pytest.approx(value, rel=1e-5)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(expected),
                                                             jax.tree.leaves(start.params)))
    error = max(float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.params)))
    assert moved > 1e-4 and error < 1e-6, (moved, error)
    jax.tree.map(np.testing.assert_array_equal, new_state.frozen["teacher"], start.frozen["teacher"])


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


def test_sequence_level_kd_samples_from_the_teacher(setup, tmp_path):
    h, _, eos_id, start = setup
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path), "seq_kd")
    teacher_rollout = _rollout(m, distill.DistillHyper(beta=BETA, seq_kd=True, lmbda=0.0), state, mesh, eos_id)
    student_rollout = _rollout(m, h, state, mesh, eos_id)
    prompts = sampler.trim_left_padding(
        {k: v for k, v in left_pad_prompts(PROMPT_IDS, pad_id=0).items() if k in onpolicy.PROMPT_KEYS})
    engine = sampler.KVCacheSampler(lambda w: models.merge(m.teacher_graphdef, w), eos_id=eos_id, pad_id=0)
    with jax.set_mesh(mesh):
        expected = jax.device_get(engine.sample(start.frozen["teacher"], prompts, jax.random.fold_in(state.rng, 1),
                                                onpolicy.Sampling(NEW_TOKENS, 1.0)))
    np.testing.assert_array_equal(teacher_rollout["tokens"], expected["tokens"])
    assert (teacher_rollout["response"] != student_rollout["response"]).any()


def _completion_batch(eos_id):
    """The left-padded prompts with dataset completions (as `build_prompt_completion_datasets` lays them out): two end
    with EOS, one fills the width without it (cut: not ended), one is the EOS alone."""
    tokens = [t for t in range(300, 340) if t != eos_id]
    completions = [tokens[:2] + [eos_id], [eos_id], tokens[2:2 + NEW_TOKENS], tokens[10:13] + [eos_id]]
    batch = {k: v for k, v in left_pad_prompts(PROMPT_IDS, pad_id=0).items() if k in onpolicy.PROMPT_KEYS}
    batch["completion"] = np.zeros((len(completions), NEW_TOKENS), np.int32)
    batch["completion_mask"] = np.zeros((len(completions), NEW_TOKENS), np.int32)
    for row, completion in enumerate(completions):
        batch["completion"][row, :len(completion)] = completion
        batch["completion_mask"][row, :len(completion)] = 1
    batch["completion_ended"] = np.array([1, 1, 0, 1], np.int32)
    return batch, completions


def test_a_dataset_completion_step_trains_on_the_records_completions(setup, tmp_path):
    """lmbda = 0 without seq_kd: the step's responses are the batch's completions after their prompts, and one update
    on them equals generalized JSD written from scratch on those rows."""
    h, _, eos_id, start = setup
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path), "dataset")
    batch, completions = _completion_batch(eos_id)
    rollouts = distill.DistillRollouts(mesh, m, distill.DistillHyper(beta=BETA, lmbda=0.0),
                                       sampling=onpolicy.Sampling(NEW_TOKENS, 1.0), eos_id=eos_id, pad_id=0)
    rollout, logged = rollouts(state, 0, batch)
    rollout = jax.device_get(rollout)
    assert logged == {"on_policy": 0.0}
    for row, completion in enumerate(completions):
        real = rollout["tokens"][row][rollout["mask"][row] == 1].tolist()
        assert real == [int(t) for t in PROMPT_IDS[row]] + completion
        assert rollout["response"][row][: len(completion)].tolist() == completion
        assert rollout["response_mask"][row].sum() == len(completion)
    assert rollout["ended"].tolist() == [True, True, False, True]

    new_state, metrics = jax.device_get(CompiledStep(task.train_step, mesh, shardings)(state, rollout))
    value, expected = _reference_update(start.params, start.frozen["teacher"], rollout, eos_id)
    assert metrics["loss"] == pytest.approx(value, rel=1e-5)
    assert helpers.max_difference(expected, new_state.params) < 1e-6


def test_lmbda_is_the_share_of_on_policy_steps_drawn_from_the_seed_and_the_step(setup, tmp_path):
    mixed = distill.DistillHyper(lmbda=0.3)
    draws = [mixed.on_policy(0, step) for step in range(4000)]
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert draws == [mixed.on_policy(0, step) for step in range(4000)]  # a resumed run draws the same
    assert draws != [mixed.on_policy(1, step) for step in range(4000)]
    assert all(distill.DistillHyper(lmbda=1.0).on_policy(0, s) for s in range(200))
    assert not any(distill.DistillHyper(lmbda=0.0).on_policy(0, s) for s in range(200))

    # an on-policy step of a mixed run samples the student exactly as lmbda = 1 does; the others are the dataset's
    h, _, eos_id, _ = setup
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path), "mixed")
    batch, _ = _completion_batch(eos_id)
    half = distill.DistillHyper(beta=BETA, lmbda=0.5)
    on, off = (next(s for s in range(100) if half.on_policy(0, s) is flag) for flag in (True, False))
    rollouts = distill.DistillRollouts(mesh, m, half, sampling=onpolicy.Sampling(NEW_TOKENS, 1.0), eos_id=eos_id,
                                       pad_id=0)
    sampled, logged = rollouts(state, on, batch)
    assert logged == {"on_policy": 1.0}
    np.testing.assert_array_equal(jax.device_get(sampled)["tokens"], _rollout(m, h, state, mesh, eos_id)["tokens"])
    dataset, logged = rollouts(state, off, batch)
    assert logged == {"on_policy": 0.0}
    np.testing.assert_array_equal(jax.device_get(dataset)["response"], batch["completion"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=1.5), "distill.beta must be in [0, 1], got 1.5."),
    (dict(temperature=0.0), "distill.temperature must be > 0, got 0.0."),
    (dict(lmbda=1.5), "distill.lmbda must be in [0, 1], got 1.5."),
    (dict(seq_kd=True), "distill.seq_kd samples from the teacher on the 1 − lmbda share of steps"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(errors.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        distill.DistillHyper(**kwargs)

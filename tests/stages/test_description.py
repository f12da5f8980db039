"""A stage is described once (issue 19): `describe(config, mesh)` is what `flaxalign plan` compiles and what
`build_task` adds the data to. The checks that the planned step is the trained step (parameters, frozen models,
logical axes, cost, step function, resume identity) guard against a `build_task` that changes what `describe`
gave; the one that matters most is that the abstract batch the plan compiles with has the shapes and dtypes of the
batches training feeds its step — read from the data for the offline stages, produced by a real rollout
(`Task.prepare`) for GRPO and online DPO, by the dataset-completion path for distillation."""

import os

import jax
import numpy as np
import pytest

from flaxalign import plan, plan_rollout, sharding
from flaxalign.stages import STAGES
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from tests.config_files import stage_config
from tests.test_config_errors import BASE, files  # noqa: F401  (`files`: the fixture the BASE values name)

OFFLINE = ("clm", "sft", "reward", "dpo")  # their batches come from data; the RL stages' from a rollout
# the random policies of GRPO and online DPO sample ids their rewards decode: the tokenizer's vocabulary
CASES = {**BASE, **{stage: {**BASE[stage], "model.vocab_size": 512} for stage in ("grpo", "online_dpo")},
         "distill_on_completions": {**BASE["distill"], "distill.lmbda": 0.0,
                                            "data.train": "builtin:arithmetic_sft?n=32"}}


def _structs(tree) -> dict:
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_adds_data_to_the_description_that_plan_compiles(files, case, tmp_path):  # noqa: F811
    stage = case.split("_on_")[0]
    values = {k: v.format(**files) if isinstance(v, str) else v for k, v in CASES[case].items()}
    mesh = sharding.make_mesh(-1, 1, 1)
    described = STAGES[stage].describe(stage_config(stage, values), mesh)
    task = STAGES[stage].build_task(stage_config(stage, values), str(tmp_path), mesh)
    planned = described.task

    for field in ("abstract_params", "abstract_frozen"):
        assert _structs(getattr(task, field)) == _structs(getattr(planned, field)), field
    for field in ("params_logical", "frozen_logical"):
        assert _leaves(getattr(task, field)) == _leaves(getattr(planned, field)), field
    assert (task.tokens_per_step, task.flops_per_step) == (planned.tokens_per_step, planned.flops_per_step)
    assert task.flops_per_step > 0
    assert task.train_step.func is planned.train_step.func
    assert sorted(task.train_step.keywords) == sorted(planned.train_step.keywords)
    assert task.metadata["resume_identity"] == planned.metadata["resume_identity"]
    assert {k: v for k, v in task.metadata.items() if k in planned.metadata} == planned.metadata
    # what only the data gives
    assert task.train_data is not None and planned.train_data is None
    assert (task.prepare is None) == (stage in OFFLINE) and planned.prepare is None
    assert (described.rollout is None) == (stage in OFFLINE)
    assert "tokenizer" in task.metadata and "tokenizer" not in planned.metadata

    state = jax.eval_shape(lambda p, f: {"params": p, "frozen": f}, planned.abstract_params, planned.abstract_frozen)
    first = sharding.global_batch(next(task.train_data), mesh)
    if stage in OFFLINE:
        real = first
    elif stage in ("grpo", "online_dpo"):  # a rollout of the random policy, scored and rewarded
        state, _, _ = loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(str(tmp_path), "ckpt")))
        real, _ = task.prepare(state, 0, first, lambda: sharding.global_batch(next(task.train_data), mesh))
        state = jax.eval_shape(lambda s: s, state)
    elif case == "distill_on_completions":  # lmbda = 0: the dataset's completions, no model runs
        real, _ = task.prepare(None, 0, first)
    else:  # PPO and on-policy distillation sample from checkpoints that hold no weights here
        return
    expected = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in described.abstract_batch(state).items()}
    got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in real.items()}
    if stage not in OFFLINE:  # prompts are trimmed to their bucket: tokens/mask are at most the planned width
        for key in ("tokens", "mask"):
            (rows, width), dtype = got[key]
            assert width <= expected[key][0][1] and width > real["response"].shape[1]
            got[key] = ((rows, expected[key][0][1]), dtype)
    assert got == expected


def test_the_distillation_plan_names_the_teacher_among_the_roles(files):  # noqa: F811
    """What `plan` reports per role for distillation: the trained student, the frozen teacher (the CLM run's
    architecture, from its metadata only) and the optimizer state, each as the bytes one chip holds."""
    config = stage_config("distill", {k: v.format(**files) if isinstance(v, str) else v
                                      for k, v in BASE["distill"].items()})
    mesh = sharding.make_mesh(-1, 1, 1)
    task, _, batch, rollout = plan.abstract_task(config, mesh)
    state, _, _ = plan.abstract_arguments(task, batch, mesh, config.seed)
    roles = plan_rollout.role_bytes(rollout, state)
    assert list(roles) == ["policy (trained)", "teacher (frozen)", "optimizer state"]
    assert roles["teacher (frozen)"] == plan_rollout.per_chip_bytes(state.frozen["teacher"]) > 0

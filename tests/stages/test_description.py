"""A stage is described once (issue 19): `describe(config, mesh)` is what `flaxalign plan` compiles and what
`build_task` adds the data to, so the planned step is the trained step — the same parameters, frozen models,
logical axes, cost, resume identity and step function — and the abstract batch the plan compiles with has the
shapes and dtypes of the batches training reads."""

import jax
import numpy as np
import pytest

from flaxalign import sharding
from flaxalign.stages import STAGES
from tests.config_files import stage_config
from tests.test_config_errors import BASE, files  # noqa: F401  (`files`: the fixture the BASE values name)

OFFLINE = ("clm", "sft", "reward", "dpo")  # their batches come from data; the RL stages' from a rollout


def _structs(tree) -> dict:
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("stage", sorted(BASE))
def test_training_adds_data_to_the_description_that_plan_compiles(files, stage, tmp_path):  # noqa: F811
    values = {k: v.format(**files) if isinstance(v, str) else v for k, v in BASE[stage].items()}
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

    if stage in OFFLINE:
        state = jax.eval_shape(lambda p, f: {"params": p, "frozen": f}, planned.abstract_params,
                               planned.abstract_frozen)
        abstract = described.abstract_batch(state)
        real = sharding.global_batch(next(task.train_data), mesh)
        assert _structs(real) == _structs(abstract)

"""A stage described once. `describe(config, mesh)` builds, from the config and the metadata of the checkpoints it
names (never their weights, a tokenizer or a data file), everything a stage is apart from its data: the train
step, the param layout and its loaders, the optimizer, the cost, the train step's abstract global batch and an RL
stage's sampler. Training (`build_task`) adds the data to it; `flaxalign plan` compiles it as it is.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign.models import ModelConfig
from flaxalign.sampler import Sampling
from flaxalign.train.task import Task


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """What an RL stage's rollout samples: with which policy (an `onpolicy.Policy`), how, how many rows of which
    prompt width, and where the policy's trained part sits in the train state's params."""
    policy: Any
    sampling: Sampling
    rows: int
    prompt_len: int
    policy_params: Callable  # state.params -> the policy's trained part
    scoring_forwards: int  # forward passes of the learner's scoring: old log-probs, reference, value, reward model
    rounds: int = 1  # the most rollouts a step may run, the first included (DAPO's dynamic sampling refills)
    share: float = 1.0  # the expected share of steps that sample (distillation's lmbda; the others read the data)
    group_size: int = 1  # rows per prompt (GRPO's G, online DPO's 2): the sampler prefills rows / group_size of them


@dataclasses.dataclass(frozen=True)
class Description:
    """A stage's task before data. `task` has no `train_data`, `eval_batches`, `prepare` or `eval_extra`, and its
    metadata lacks what the data decides (tokenizer, data stats, chat template)."""
    task: Task
    model_config: ModelConfig
    meta: dict  # the metadata of the `init_from` source, or {}
    init_path: str  # the `init_from` source, or ""
    abstract_batch: Callable[[Any], dict]  # abstract train state -> the train step's abstract global batch
    rollout: RolloutSpec | None = None
    parts: dict = dataclasses.field(default_factory=dict)  # stage-specific pieces `build_task` wires the data to

    def with_data(self, *, metadata: dict, **fields) -> Task:
        """The task with its data (`train_data`, `eval_batches`, `prepare`, `eval_extra`, `finalize`) and the
        metadata the data decides."""
        return dataclasses.replace(self.task, metadata={**self.task.metadata, **metadata}, **fields)


class Stage(NamedTuple):
    describe: Callable[[Any, Any], Description]  # (config, mesh) -> Description
    build_task: Callable[[Any, str, Any], Task]  # (config, workdir, mesh) -> Task with data


def abstract_rows(keys, shape: tuple, float_keys=()) -> dict:
    """ShapeDtypeStructs of `shape` for `keys`: float32 for `float_keys`, int32 for the rest."""
    return {k: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(np.float32 if k in float_keys else np.int32))
            for k in keys}

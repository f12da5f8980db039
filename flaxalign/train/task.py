"""What a stage hands to the generic loop: its step functions, data and bookkeeping. The loop never asks which
algorithm it is running."""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import optax


class ResumableIterator(Protocol):
    def __next__(self) -> dict: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class Task:
    name: str
    # params
    abstract_params: Any  # ShapeDtypeStructs
    params_logical: Any  # logical axis names per parameter
    init_params: Callable[[Any, Any], Any]  # (shardings, frozen params) -> trained params, created in place
    optimizer: optax.GradientTransformation
    # steps: pure functions, jitted by the loop
    train_step: Callable[[Any, dict], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
    eval_step: Callable[[Any, dict], dict] | None  # (state, batch) -> sums, with a "count" key
    # data: local (this process's) numpy batches
    train_data: ResumableIterator
    eval_batches: Callable[[], Iterable[dict]] | None
    # bookkeeping
    tokens_per_step: int  # global tokens processed per step (for tokens/s)
    flops_per_step: float  # global training FLOPs per step (for MFU)
    metadata: dict  # saved with every checkpoint; its `resume_identity` must match to resume
    abstract_frozen: Any = dataclasses.field(default_factory=dict)
    frozen_logical: Any = dataclasses.field(default_factory=dict)
    init_frozen: Callable[[Any], Any] = lambda shardings: {}
    # run once after the last step of a finished run (not a preempted one), e.g. a reward model's normalisation
    finalize: Callable[[Any], dict] | None = None
    # the eval loss is a mean token negative log-likelihood: the loop also reports eval_perplexity = exp(eval_loss)
    eval_loss_is_token_nll: bool = False
    # extra evaluation beyond the batched eval_step (e.g. sampling from the policy): state -> {name: mean}
    eval_extra: Callable[[Any], dict] | None = None
    # host-side work between reading a batch and the train step, e.g. an RL rollout scored by Python reward
    # functions: (state, step, global batch, draw) -> (batch for train_step, {name: value} to log), where draw()
    # reads the next global batch (e.g. DAPO's dynamic sampling refills with new prompts; the data position saved with
    # the checkpoint counts what it read). It sees the state before the step; a FlaxalignError it raises stops the
    # run after a checkpoint of that state.
    prepare: Callable[[Any, int, dict, Callable[[], dict]], tuple[dict, dict]] | None = None

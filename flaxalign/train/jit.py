"""The one jit wrapper: shardings from the rule table, donated state, compiled once per run."""

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from flaxalign import sharding
from flaxalign.train.state import TrainState


def opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments (subtrees shaped like the params) follow the params; scalars (counts) are replicated."""
    params_def = jax.tree.structure(params_shardings)

    def is_params_like(node):
        try:
            return jax.tree.structure(node) == params_def
        except Exception:  # noqa: BLE001 - unflattenable nodes are simply not params-like
            return False

    return jax.tree.map(lambda node: params_shardings if is_params_like(node) else sharding.replicated(mesh),
                        abstract_opt_state, is_leaf=is_params_like)


def state_shardings(abstract_state: TrainState, params_logical: Any, frozen_logical: Any, mesh: Mesh) -> TrainState:
    params_sh = sharding.tree_shardings(params_logical, abstract_state.params, mesh)
    frozen_sh = sharding.tree_shardings(frozen_logical, abstract_state.frozen, mesh)
    return TrainState(step=sharding.replicated(mesh), params=params_sh, frozen=frozen_sh,
                      opt_state=opt_state_shardings(abstract_state.opt_state, params_sh, mesh),
                      rng=sharding.replicated(mesh))


class CompiledStep:
    """`jax.jit(step, in_shardings=(state, batch), out_shardings=(state, replicated), donate state)` run under the
    mesh. `trace_count` counts traces so tests can assert the step compiled once."""

    def __init__(self, step_fn: Callable, mesh: Mesh, state_sh: Any, donate: bool = True):
        self.mesh = mesh
        self.trace_count = 0

        def traced(state, batch):
            self.trace_count += 1
            return step_fn(state, batch)

        self._jitted = jax.jit(traced, in_shardings=(state_sh, None), out_shardings=(state_sh,
                               sharding.replicated(mesh)), donate_argnums=(0,) if donate else ())

    def __call__(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._jitted(state, batch)

    def lower(self, state, batch):
        """The lowered step for (abstract) arguments, e.g. to compile it ahead of time for other devices."""
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(state, batch)


class CompiledEval:
    """A jitted `eval_fn(state, batch) -> metrics` under the mesh, metrics replicated."""

    def __init__(self, eval_fn: Callable, mesh: Mesh, state_sh: Any):
        self.mesh = mesh
        self._jitted = jax.jit(eval_fn, in_shardings=(state_sh, None), out_shardings=sharding.replicated(mesh))

    def __call__(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._jitted(state, batch)

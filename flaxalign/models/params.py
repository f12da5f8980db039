"""From NNX module to plain pytrees: graphdef, float32 params, and the logical axes of each parameter.

Outside `models/` everything is a plain nested dict of arrays; `nnx.merge(graphdef, params)` rebuilds the module
inside a traced step.
"""

from typing import Any

import jax
from flax import nnx

from flaxalign.models.config import ModelConfig
from flaxalign.models.families import family
from flaxalign.models.llama import CausalLM


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract params as ShapeDtypeStructs, logical axes) without allocating any memory. The module is
    the `CausalLM` class of `config.family` (`models.families`), here and in `init_params`."""
    model = nnx.eval_shape(lambda: family(config).model(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    logical = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=_is_variable)
    return graphdef, nnx.to_pure_dict(state), _to_plain_dict(logical)


def _to_plain_dict(state: Any) -> Any:
    if isinstance(state, (nnx.State, dict)):
        return {k: _to_plain_dict(v) for k, v in state.items()}
    return state


def init_params(config: ModelConfig, seed: int, shardings: Any = None, select=None) -> Any:
    """Initialised float32 params, created directly in their shardings (no full copy on one device first).
    `select(params) -> part` keeps only a part (e.g. the adapters): XLA then never materialises the rest."""

    def create():
        params = nnx.to_pure_dict(nnx.state(family(config).model(config, nnx.Rngs(params=seed))))
        return params if select is None else select(params)

    return jax.jit(create, out_shardings=shardings)()


def merge(graphdef: nnx.GraphDef, params: Any) -> CausalLM:
    """The model of `graphdef` (any family's: a `CausalLM` or a subclass) holding `params`."""
    return nnx.merge(graphdef, params)

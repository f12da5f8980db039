"""Orbax checkpoints: train state + data-iterator position + metadata, async, keep-N, atomic.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoints intact and the half-written one is ignored on restore.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from flaxalign import errors


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, metadata: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(metadata)), force=True)

    def restore(self, step: int, target_shardings: Any, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores onto `target_shardings` (any mesh shape or process count), not the one it was saved with."""
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_state, target_shardings)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise errors.CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model or optimizer "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e
        return restored["state"], restored["data"], restored["meta"]

    def restore_metadata(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _checkpoint_dir(path: str) -> str:
    """A run's workdir or its `checkpoints/` folder → the folder holding the step directories."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def latest_checkpoint(path: str) -> tuple[ocp.CheckpointManager, int]:
    directory = _checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise errors.CheckpointError(f"checkpoint path '{path}' does not exist.")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
        raise errors.CheckpointError(f"'{path}' holds no finished checkpoint.")
    return manager, step


def read_metadata(path: str) -> dict:
    """The metadata (model config, tokenizer, …) of the latest checkpoint of a run."""
    manager, step = latest_checkpoint(path)
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_params(path: str, abstract_params: Any, shardings: Any, part: str = "params") -> Any:
    """Only the trained params (or, `part="frozen"`, the frozen ones; or a subtree such as "params/policy") of the
    latest checkpoint of another run (e.g. SFT starting from CLM), placed directly into `shardings`; the optimizer
    state and everything else are not read."""
    manager, step = latest_checkpoint(path)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
    keys = part.split("/")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=_nested(keys, target), restore_args=_nested(keys, restore_args), partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
        raise errors.CheckpointError(
            f"the params in {path} (step {step}) do not match this model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e
    out = restored["state"]
    for key in keys:
        out = out[key]
    return out


def _nested(keys: list[str], leaf: Any) -> dict:
    for key in reversed(keys):
        leaf = {key: leaf}
    return leaf


def model_parts(meta: dict) -> tuple[str, str]:
    """Where a run keeps its language model (trained part, frozen part) in the train state: ("params", "frozen")
    for LM, SFT and DPO runs; ("params/model", "frozen") for a reward model's backbone (its head is at
    "params/head"); runs that train more than one model (PPO's value model) name the subtrees in their metadata
    (`model_params`, `model_frozen`)."""
    default = "params/model" if meta.get("stage") == "reward" else "params"
    return meta.get("model_params", default), meta.get("model_frozen", "frozen")

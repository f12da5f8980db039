"""Orbax checkpoints: train state + data-iterator position + metadata, async, keep-N, atomic, and read back past
damage.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoints intact and the half-written one is ignored on restore. A finished step can still be
damaged later (a truncated file, a deleted item, a hand-edited position): reading falls back to the newest step
that reads, and a resume moves the damaged newer ones aside to `checkpoints/corrupt-N` (never deletes them). A
checkpoint that reads but belongs to another model or optimizer is not damage: that stays an error.
"""

import contextlib
import gc
import logging as pylogging
import os
import re
import sys
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from flaxalign import errors

ITEMS = ("state", "data", "meta")


class Unreadable(Exception):
    """A checkpoint step whose files cannot be read back (the message says which item and why)."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, metadata: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(metadata)), force=True)

    def restore_newest_readable(self, target_shardings: Any, abstract_state: Any,
                                accept: Callable[[int, dict], None]) -> tuple[Any, dict, dict, int] | None:
        """(state, data position, metadata, step) of the newest step that reads, restored onto `target_shardings`
        (any mesh shape or process count, not the one it was saved with); None when there is no checkpoint.

        `accept(step, metadata)` raises a `FlaxalignError` for a checkpoint that is readable but not this run's (a
        changed model); a state whose layout differs from `abstract_state` is refused the same way. Newer steps
        that do not read are logged and moved aside to `corrupt-N`, but only once an older step has read: when
        none reads, nothing is moved (a later run must not silently start from scratch) and the error names each
        step and its damage."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                meta, data = read_json_item(self.directory, step, "meta"), read_json_item(self.directory, step, "data")
                check_data_position(data)
                accept(step, meta)
                check_layout(self.directory, step, "state", abstract_state)
                state = self._restore_state(step, abstract_state, target_shardings)
            except Unreadable as e:
                damaged.append((step, str(e)))
                continue
            for bad_step, reason in damaged:
                self._set_aside(bad_step, reason)
            return state, data, meta, step
        if damaged:
            raise errors.CheckpointError(
                f"no checkpoint in {self.directory} can be read ("
                + "; ".join(f"step {s}: {reason}" for s, reason in damaged)
                + "); nothing was moved or deleted — restore the files, or use a new --workdir.")
        return None

    def _restore_state(self, step: int, abstract_state: Any, target_shardings: Any) -> Any:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_state, target_shardings)
        return _read_arrays(lambda: self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"], "state item")

    def _set_aside(self, step: int, reason: str) -> None:
        """Renames step N to `corrupt-N` (`corrupt-N.1`, … if taken) on process 0, so the next save of N and the
        step listing no longer see it."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target = os.path.join(self.directory, f"corrupt-{step}")
            suffix = 0
            while os.path.exists(target):
                suffix += 1
                target = os.path.join(self.directory, f"corrupt-{step}.{suffix}")
            os.rename(source, target)
            logging.warning("checkpoint step %d cannot be read (%s): moved aside to %s; resuming from an older "
                            "step.", step, reason, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"flaxalign_set_aside_{step}")
        self._manager.reload()

    def restore_metadata(self, step: int) -> dict:
        return read_json_item(self.directory, step, "meta")

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _read_arrays(read: Callable[[], Any], what: str) -> Any:
    """`read()` (an Orbax restore), with a failure turned into `Unreadable` naming `what` and the innermost cause."""
    failed = True  # also when interrupted: an interrupted read abandons its siblings too
    _READ_ECHOES.start()
    try:
        result = read()
        failed = False
    except Exception as e:  # noqa: BLE001 — the layout was checked first: whatever fails now is the files
        message = _first_line(e)
    finally:
        _READ_ECHOES.end(failed=failed)
    if not failed:
        return result
    gc.collect()
    raise Unreadable(f"the {what} ({message})")


class _ReadEchoes:
    """Drops the echoes of a failed Orbax read — while any read runs and, once one has failed, for the rest of the
    process; a process whose reads all succeed keeps every message.

    When one array fails to read, Orbax closes its event loop with the sibling reads still in flight. Each of those
    later reports from a TensorStore thread — seconds after, at no predictable moment — as an unraisable "Event
    loop is closed" from `call_soon_threadsafe`, an "Exception ignored in <coroutine …>" with a page of TensorStore
    spec when collected, asyncio's "exception was never retrieved", or — when a read's coroutines reach the closed
    loop before they start — a RuntimeWarning "coroutine '…' was never awaited" at whichever line collects them.
    Silencing only after the failure missed a sibling that reported while the failure was still unwinding through
    Orbax (CI, stop 37), so the filters go in before each read. These four kinds and nothing else are dropped (the
    unraisable ones only while this hook is in place: one installed later hides it until the next read)."""

    UNAWAITED = r"coroutine '.*' was never awaited"

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0
        self._failed = False
        self._hook = None
        self._logger_filtered = False

    @property
    def silenced(self) -> bool:
        return self._failed or self._running > 0

    def start(self) -> None:
        with self._lock:
            self._running += 1
            if sys.unraisablehook is not self._hook:  # first read, or someone replaced the hook since
                previous = sys.unraisablehook

                def hook(unraisable):
                    if not (self.silenced and _is_read_echo(unraisable)):
                        previous(unraisable)

                self._hook = sys.unraisablehook = hook
            if not self._logger_filtered:
                self._logger_filtered = True
                pylogging.getLogger("asyncio").addFilter(
                    lambda record: not (self.silenced and "exception was never retrieved" in str(record.msg)))
            warnings.filterwarnings("ignore", message=self.UNAWAITED, category=RuntimeWarning)

    def end(self, failed: bool) -> None:
        with self._lock:
            self._running -= 1
            self._failed |= failed
            if not self.silenced:  # the entry `filterwarnings` made; the version bump makes callers re-check filters
                filters = getattr(warnings, "_get_filters", lambda: warnings.filters)()  # 3.14: per context
                with contextlib.suppress(ValueError):
                    filters.remove(("ignore", re.compile(self.UNAWAITED, re.I), RuntimeWarning, None, 0))
                    warnings._filters_mutated()


def _is_read_echo(unraisable) -> bool:
    closed_loop = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                   and "Event loop is closed" in str(unraisable.exc_value))
    return closed_loop or isinstance(unraisable.object, types.CoroutineType)


_READ_ECHOES = _ReadEchoes()


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause (TensorStore's "OUT_OF_RANGE: … byte range …", not the wrappers)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def read_json_item(directory: str, step: int, item: str) -> dict:
    """The JSON object saved as `item` ("meta" or "data") of a step, read directly (no Orbax manager needed)."""
    path = epath.Path(directory) / str(step) / item
    try:
        value = ocp.JsonCheckpointHandler().restore(path)
    except Exception as e:  # noqa: BLE001 — missing folder, missing or torn file, invalid JSON
        raise Unreadable(f"the {item} item ({_first_line(e)})") from e
    if not isinstance(value, dict):
        raise Unreadable(f"the {item} item holds {type(value).__name__}, not a JSON object")
    return value


def check_data_position(data: dict) -> None:
    """A data-iterator position (`BatchIterator.get_state`) is a JSON object of non-negative integers."""
    bad = {k: v for k, v in data.items() if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)}
    if bad or not data:
        raise Unreadable(f"the data position {data} is not a set of non-negative integers")


def _layout(tree: Any, prefix: tuple = ()) -> dict:
    """{("opt_state", "1", "0", "mu", "embed"): (shape, dtype), …} of a pytree of arrays, abstract arrays or
    Orbax array metadata, keyed by plain names (dict keys, attribute names and sequence indices alike)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[prefix + names] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def check_layout(directory: str, step: int, item: str, abstract: Any, part: tuple = (), *,
                 partial: bool = False) -> None:
    """Raises `CheckpointError` when the saved arrays (below `part`) differ in names, shapes or dtypes from
    `abstract` (another model or optimizer: not damage) — with `partial`, only a missing or different array counts,
    not one more in the checkpoint — and `Unreadable` when the layout itself cannot be read."""
    try:
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / item)
    except Exception as e:  # noqa: BLE001
        raise Unreadable(f"the {item} item's layout ({_first_line(e)})") from e
    saved_layout = {k: v for k, v in _layout(saved).items() if k[: len(part)] == part}
    wanted = _layout(abstract, part)
    for key, (shape, dtype) in wanted.items():  # a frozen part is read in the dtype asked for (model.frozen_dtype)
        if key[0] == "frozen" and saved_layout.get(key, (None,))[0] == shape and _floating(dtype) and _floating(
                saved_layout[key][1]):
            saved_layout[key] = (shape, dtype)
    if saved_layout == wanted or (partial and all(saved_layout.get(k) == v for k, v in wanted.items())):
        return
    missing = sorted(set(wanted) - set(saved_layout))
    extra = [] if partial else sorted(set(saved_layout) - set(wanted))
    changed = sorted(k for k in set(wanted) & set(saved_layout) if wanted[k] != saved_layout[k])
    first = (f"missing {'/'.join(missing[0])}" if missing else f"unexpected {'/'.join(extra[0])}" if extra else
             f"{'/'.join(changed[0])} is {saved_layout[changed[0]]} in the checkpoint, {wanted[changed[0]]} here")
    raise errors.CheckpointError(
        f"checkpoint {directory}/{step} does not match this run's model or optimizer ({first}).")


def _floating(dtype: str) -> bool:
    return dtype in ("float32", "bfloat16", "float16", "float64")


def _checkpoint_dir(path: str) -> str:
    """A run's workdir or its `checkpoints/` folder → the folder holding the step directories."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def _finished_steps(path: str) -> tuple[str, list[int]]:
    """(the folder holding the step directories, its finished steps, newest first)."""
    directory = _checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise errors.CheckpointError(f"checkpoint path '{path}' does not exist.")
    manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(create=False))
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise errors.CheckpointError(f"'{path}' holds no finished checkpoint.")
    return directory, steps


def _newest_readable(path: str, read: Callable[[str, int], Any]) -> tuple[Any, int]:
    """`read(directory, step)` of the newest step it succeeds on, warning about each newer one that does not read
    (another run's folder is only read, never changed)."""
    directory, steps = _finished_steps(path)
    damage = []
    for step in steps:
        try:
            return read(directory, step), step
        except Unreadable as e:
            logging.warning("checkpoint step %d of %s cannot be read (%s); trying the one before.", step, path, e)
            damage.append(f"step {step}: {e}")
    raise errors.CheckpointError(f"no checkpoint in '{path}' can be read ({'; '.join(damage)}).")


def latest_step(path: str) -> int:
    """The newest step of another run whose metadata reads."""
    return _newest_readable(path, lambda directory, step: read_json_item(directory, step, "meta"))[1]


def read_metadata(path: str) -> dict:
    """The metadata (model config, tokenizer, …) of the newest readable checkpoint of a run."""
    return _newest_readable(path, lambda directory, step: read_json_item(directory, step, "meta"))[0]


def load_params(path: str, abstract_params: Any, shardings: Any, part: str = "params") -> Any:
    """Only the trained params (or, `part="frozen"`, the frozen ones; or a subtree such as "params/policy") of the
    newest readable checkpoint of another run (e.g. SFT starting from CLM), placed directly into `shardings`; the
    optimizer state and everything else are not read."""
    keys = part.split("/")
    manager = ocp.CheckpointManager(_checkpoint_dir(path), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings)
    restore_args = jax.tree.map(lambda x, s: ocp.ArrayRestoreArgs(sharding=s, dtype=x.dtype), abstract_params,
                                shardings)

    def read(directory: str, step: int):
        try:
            check_layout(directory, step, "state", abstract_params, tuple(keys), partial=True)
        except errors.CheckpointError as e:
            raise errors.CheckpointError(f"the params in {path} (step {step}) do not match this model "
                                         f"({str(e).split('(', 1)[-1]}") from None
        restored = _read_arrays(lambda: manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=_nested(keys, target), restore_args=_nested(keys, restore_args), partial_restore=True)))["state"],
            "state item")
        for key in keys:
            restored = restored[key]
        return restored

    return _newest_readable(path, read)[0]


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

"""Host-side work on the rows of a global batch when it spans several processes.

An RL rollout is a set of global `[B, ...]` arrays sharded by rows over the mesh. Reward functions are Python over
decoded text, so they run on the host: each process decodes and scores only the rows it *owns* — rows one of its
devices holds, each row owned by the lowest-numbered process holding it, so a row replicated over processes is scored
once — and the per-row results are all-gathered, after which every process holds the same `[B, ...]` numpy arrays.
With one process every row is owned and nothing is gathered.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxalign import errors


def owned_rows(x: jax.Array) -> np.ndarray:
    """The (sorted) rows of the global array `x` this process answers for."""
    if jax.process_count() == 1:
        return np.arange(x.shape[0])
    owner = np.full(x.shape[0], jax.process_count())
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        held = np.arange(x.shape[0])[index[0]]
        owner[held] = np.minimum(owner[held], device.process_index)
    return np.flatnonzero(owner == jax.process_index())


def local_rows(x: jax.Array, rows: np.ndarray) -> np.ndarray:
    """The values of `rows` (held by this process's devices) of the global array `x`, as numpy."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))[rows]
    out = np.empty((len(rows),) + x.shape[1:], x.dtype)
    found = np.zeros(len(rows), bool)
    for shard in x.addressable_shards:
        held = np.arange(x.shape[0])[shard.index[0]]
        wanted = np.isin(rows, held)
        if wanted.any():
            data = np.asarray(shard.data)
            out[wanted] = data[np.searchsorted(held, rows[wanted])]
            found |= wanted
    if not found.all():
        raise ValueError("local_rows: a row is not held by this process")
    return out


def gather_rows(values: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
    """`[total, ...]` float32: every process's `values` (one per row it owns, `[len(rows), ...]`) put at their rows
    (float32 whatever the process count: the all-gather goes through the devices). Called by every process at
    once."""
    values = np.asarray(values, np.float32)
    if jax.process_count() == 1:
        return values
    full = np.zeros((total,) + values.shape[1:], values.dtype)
    full[rows] = values
    owned = np.zeros(total, bool)
    owned[rows] = True
    everyone, owners = multihost_utils.process_allgather((full, owned))
    return everyone[np.argmax(owners, axis=0), np.arange(total)]


def raise_together(error: Exception | None) -> None:
    """Raises on every process when any process failed (`error` is this process's failure or None), so no process
    is left waiting in the next collective: the failed process raises its own error (an unexpected one as a
    `TrainingError` naming it, when other processes are waiting), the others name the failed process."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    failed = multihost_utils.process_allgather(np.asarray(error is not None))
    if isinstance(error, errors.FlaxalignError):
        raise error
    if error is not None:
        raise errors.TrainingError(f"scoring the rollout failed on this process: {type(error).__name__}: "
                                   f"{error}") from error
    if failed.any():
        first = int(np.argmax(failed))
        raise errors.TrainingError(f"process {first} stopped on an error (see its log); this process stops too.")

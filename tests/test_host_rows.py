"""Which process scores which rollout rows (`flaxalign.host_rows`), with the process layout faked: each row is owned
by exactly one process (the lowest-numbered one holding it), a process holding only rows another owns scores none,
and the gathered rows land where they belong. The real 2-process runs are in tests/stages/test_multihost_rl.py."""

import types

import jax
import numpy as np
import pytest

from flaxalign import errors, host_rows


class _Device:
    def __init__(self, process_index: int):
        self.process_index = process_index


def _array(rows: int, held: dict[int, list[slice]]):
    """A stand-in for a global `[rows, 3]` array: {process: [row slices its devices hold]}, a device per slice."""
    mapping = {_Device(process): (rows_slice, slice(None)) for process, slices in held.items()
               for rows_slice in slices}
    sharding = types.SimpleNamespace(devices_indices_map=lambda shape: mapping)
    return types.SimpleNamespace(shape=(rows, 3), sharding=sharding)


def _as_process(monkeypatch, index: int, count: int = 2):
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: index)


def test_every_row_has_one_owner_and_replicated_rows_go_to_the_lowest_process(monkeypatch):
    # rows 2-3 are held by both processes (replicated over them)
    x = _array(6, {0: [slice(0, 2), slice(2, 4)], 1: [slice(2, 4), slice(4, 6)]})
    owned = {}
    for process in (0, 1):
        _as_process(monkeypatch, process)
        owned[process] = host_rows.owned_rows(x).tolist()
    assert owned == {0: [0, 1, 2, 3], 1: [4, 5]}


def test_a_process_holding_only_replicated_rows_owns_none(monkeypatch):
    x = _array(4, {0: [slice(0, 4)], 1: [slice(0, 4)]})  # every row on both processes: process 0 scores them all
    _as_process(monkeypatch, 1)
    assert host_rows.owned_rows(x).size == 0


def test_gathered_rows_land_at_their_rows_as_float32(monkeypatch):
    """Process 1 owns rows 1 and 3; the fake all-gather stacks what each process put at its rows."""
    _as_process(monkeypatch, 1)
    others = np.zeros((4, 2), np.float32)
    others[[0, 2]] = [[1, 2], [5, 6]]  # process 0's rows

    def allgather(tree):
        full, owned = tree
        return np.stack([others, full]), np.stack([np.array([True, False, True, False]), owned])

    monkeypatch.setattr(host_rows.multihost_utils, "process_allgather", allgather)
    got = host_rows.gather_rows(np.array([[3, 4], [7, np.nan]], np.float64), np.array([1, 3]), 4)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1, 2], [3, 4], [5, 6], [7, np.nan]])


def test_one_process_gets_its_own_values_back_as_float32():
    values = np.arange(6, dtype=np.float64).reshape(3, 2)
    got = host_rows.gather_rows(values, np.arange(3), 3)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


def test_a_failure_stops_every_process(monkeypatch):
    _as_process(monkeypatch, 0)
    monkeypatch.setattr(host_rows.multihost_utils, "process_allgather", lambda flag: np.array([False, True]))
    with pytest.raises(errors.TrainingError, match="process 1 stopped on an error"):
        host_rows.raise_together(None)  # this process was fine; process 1 was not
    monkeypatch.setattr(host_rows.multihost_utils, "process_allgather", lambda flag: np.array([True, False]))
    with pytest.raises(errors.TrainingError, match="scoring the rollout failed on this process: KeyError"):
        host_rows.raise_together(KeyError("answer"))  # an unexpected error, named in one line
    monkeypatch.setattr(host_rows.multihost_utils, "process_allgather", lambda flag: np.array([False, False]))
    host_rows.raise_together(None)  # nobody failed: nothing raised

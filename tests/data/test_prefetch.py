"""Tests of flaxalign.data.prefetch.Prefetcher: same batches, exact resume, errors, shutdown."""

import threading

import jax
import numpy as np
import pytest

from flaxalign import sharding
from flaxalign.data.loader import BatchIterator
from flaxalign.data.prefetch import Prefetcher
from tests.data.batch_asserts import assert_same_batches, take


def _iterator(**overrides):
    rows = np.arange(37)
    arrays = {"row": rows, "pair": np.stack([rows, -rows], axis=1)}
    return BatchIterator(arrays, 8, seed=overrides.pop("seed", 5), **overrides)


class _FailingSource:
    """A resumable source whose batch number `fail_at` raises."""

    def __init__(self, fail_at):
        self.position, self.fail_at = 0, fail_at

    def __next__(self):
        if self.position == self.fail_at:
            raise ValueError(f"bad record at batch {self.position}")
        self.position += 1
        return {"x": np.array([self.position])}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


class _Watched:
    """Wraps a resumable source and lets the test wait until the producer thread has drawn `n` batches from it:
    a synchronisation point instead of a sleep that hopes the thread has run."""

    def __init__(self, source):
        self.source, self.drawn = source, 0
        self._changed = threading.Condition()

    def __next__(self):
        batch = next(self.source)
        with self._changed:
            self.drawn += 1
            self._changed.notify_all()
        return batch

    def get_state(self):
        return self.source.get_state()

    def set_state(self, state):
        self.source.set_state(state)

    def wait_until_drawn(self, n, timeout=30):
        with self._changed:
            assert self._changed.wait_for(lambda: self.drawn >= n, timeout), f"only {self.drawn} of {n} drawn"


def test_same_batches_as_the_plain_iterator():
    with Prefetcher(_iterator(), depth=3) as prefetcher:
        assert_same_batches(take(prefetcher, 20), take(_iterator(), 20))


def test_state_is_the_consumers_position_not_the_producers():
    source = _Watched(_iterator())
    prefetcher = Prefetcher(source, depth=4)
    take(prefetcher, 3)
    source.wait_until_drawn(3 + 4)  # the producer has run ahead: 4 batches queued beyond the 3 handed out
    state = prefetcher.get_state()
    assert state["batches_consumed"] == 3
    assert source.source.batches_consumed >= 7  # the source itself is ahead
    expected = take(prefetcher, 5)
    prefetcher.close()

    resumed = _iterator()
    resumed.set_state(state)
    with Prefetcher(resumed, depth=2) as restarted:
        assert_same_batches(take(restarted, 5), expected)


def test_set_state_on_a_running_prefetcher_discards_prefetched_batches():
    reference = take(_iterator(), 12)
    with Prefetcher(_iterator(), depth=4) as prefetcher:
        take(prefetcher, 2)
        state = prefetcher.get_state()
        take(prefetcher, 7)
        prefetcher.set_state(state)
        assert prefetcher.get_state() == state
        assert_same_batches(take(prefetcher, 10), reference[2:12])


def test_transform_runs_ahead_and_state_still_matches():
    mesh = sharding.make_mesh(8, 1, 1)
    with Prefetcher(_iterator(), depth=2,
                    transform=lambda batch: sharding.global_batch(batch, mesh)) as prefetcher:
        batches = take(prefetcher, 4)
        assert all(isinstance(batch["row"], jax.Array) for batch in batches)
        assert batches[0]["row"].sharding.spec == sharding.batch_sharding(mesh, 8, 1).spec
        assert_same_batches(batches, take(_iterator(), 4))
        assert prefetcher.get_state()["batches_consumed"] == 4


def test_a_source_exception_surfaces_in_the_consumer_after_the_good_batches():
    prefetcher = Prefetcher(_FailingSource(fail_at=3), depth=2)
    assert [int(next(prefetcher)["x"][0]) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError, match="bad record at batch 3"):
        next(prefetcher)
    assert prefetcher.get_state() == {"position": 3}
    with pytest.raises(ValueError, match="bad record"):
        next(prefetcher)  # stays failed instead of hanging
    assert prefetcher.close(timeout=5)


def test_a_transform_exception_surfaces_too():
    def transform(batch):
        raise RuntimeError("device is full")

    with Prefetcher(_iterator(), transform=transform) as prefetcher, \
            pytest.raises(RuntimeError, match="device is full"):
        next(prefetcher)


def test_close_stops_the_thread_even_with_a_full_queue():
    before = {thread.ident for thread in threading.enumerate()}
    source = _Watched(_iterator())
    prefetcher = Prefetcher(source, depth=1)
    next(prefetcher)
    # Batch 2 is queued (depth 1) before batch 3 is drawn: the producer now holds a batch it cannot put.
    source.wait_until_drawn(3)
    assert prefetcher._queue.full()
    producer = prefetcher._thread
    assert producer.daemon and producer.is_alive()
    assert prefetcher.close(timeout=5)
    assert not producer.is_alive()
    assert {thread.ident for thread in threading.enumerate()} <= before
    with pytest.raises(RuntimeError, match="closed"):
        next(prefetcher)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(_iterator(), depth=0)

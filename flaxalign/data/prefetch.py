"""Preparing batches on a background thread, with exact resume.

`Prefetcher` wraps a resumable iterator (`__next__`, `get_state`,
`set_state`, like `BatchIterator`) and keeps up to `depth` batches ready,
optionally already passed through a `transform` such as
`sharding.global_batch`, so the training step never waits on Python.

The producer runs ahead of the consumer, so the wrapped iterator's own state
is the producer's position.  Each queued batch therefore carries the state
the iterator had right after producing it, and `get_state()` returns the
state of the last batch handed out: saving it and resuming gives exactly the
batches the consumer has not seen yet.
"""

import copy
import queue
import threading

# How often a blocked producer or consumer wakes up to check for close().
_POLL_SECONDS = 0.05


class _Failure:
    """An exception raised on the producer thread, to re-raise on the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Prefetcher:
    """Iterator that produces the next `depth` batches on a daemon thread."""

    def __init__(self, iterator, depth: int = 2, transform=None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}.")
        self._iterator = iterator
        self._depth = depth
        self._transform = transform
        self._state = copy.deepcopy(iterator.get_state())
        self._error = None
        self._ended = False
        self._closed = False
        self._start()

    def __iter__(self):
        return self

    def __next__(self):
        """Returns the next batch, or re-raises an exception from the source."""
        if self._closed:
            raise RuntimeError("this Prefetcher is closed.")
        if self._error is not None:
            raise self._error
        if self._ended:
            raise StopIteration
        item = self._get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._error = item.error
            raise self._error
        batch, self._state = item
        return batch

    def get_state(self):
        """Returns the wrapped iterator's state as of the last batch handed out."""
        return copy.deepcopy(self._state)

    def set_state(self, state) -> None:
        """Drops the prefetched batches and restarts from `state`."""
        if not self._stop_thread():
            # Moving the source while the old thread still uses it would corrupt both.
            raise RuntimeError("the prefetch thread did not stop, so the position cannot be changed.")
        self._iterator.set_state(state)
        self._state = copy.deepcopy(self._iterator.get_state())
        self._error = None
        self._ended = False
        self._start()

    def close(self, timeout: float = 10.0) -> bool:
        """Stops the producer thread; returns whether it ended within `timeout` seconds.

        A thread stuck inside the source's `next()` cannot be interrupted; it
        is a daemon thread, so it never keeps the process alive.
        """
        self._closed = True
        return self._stop_thread(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _start(self):
        self._queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self._queue, self._stop), name="flaxalign-prefetch",
            daemon=True,
        )
        self._thread.start()

    def _stop_thread(self, timeout: float = 10.0) -> bool:
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _produce(self, out_queue, stop):
        """Producer loop: batch, state after it, transform, enqueue; until stopped."""
        try:
            while not stop.is_set():
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    _put(out_queue, stop, _END)
                    return
                state = copy.deepcopy(self._iterator.get_state())
                if self._transform is not None:
                    batch = self._transform(batch)
                if not _put(out_queue, stop, (batch, state)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, not swallowed
            _put(out_queue, stop, _Failure(error))

    def _get(self):
        """Waits for the next item, failing if the producer died without leaving one."""
        while True:
            try:
                return self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without producing a batch.")


def _put(out_queue, stop, item) -> bool:
    """Puts an item unless stopped first; returns whether it was put."""
    while not stop.is_set():
        try:
            out_queue.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False

"""Helpers shared by the iterator tests: take batches, compare batch streams."""

import numpy as np


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            np.testing.assert_array_equal(np.asarray(batch_a[key]), np.asarray(batch_b[key]))

"""Tests of flaxalign.data.packing.pack_documents."""

import numpy as np
import pytest

from flaxalign.data.packing import pack_documents
from tests.data.line_count import python_lines

PAD, BOS, EOS = 0, 2, 3
SPECIAL = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


def _pieces(packed):
    """Yields (inputs, targets, positions) of every piece, in packing order."""
    for row in range(len(packed["inputs"])):
        segments = packed["segment_ids"][row]
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            yield (packed["inputs"][row][where], packed["targets"][row][where],
                   packed["positions"][row][where])


def _random_docs(seed, count, max_len, seq_len):
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(0, max_len, size=count)) + [seq_len - 1, seq_len, seq_len + 1, 3 * seq_len]
    return [rng.integers(4, 1000, size=length) for length in lengths]


def test_small_example_by_hand():
    packed = pack_documents([[10, 11, 12], [], list(range(20, 31))], 8, **SPECIAL)
    np.testing.assert_array_equal(packed["inputs"], [
        [2, 10, 11, 12, 2, 0, 0, 0],
        [2, 20, 21, 22, 23, 24, 25, 26],
        [27, 28, 29, 30, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(packed["targets"], [
        [10, 11, 12, 3, 3, 0, 0, 0],
        [20, 21, 22, 23, 24, 25, 26, 27],
        [28, 29, 30, 3, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(packed["segment_ids"], [
        [1, 1, 1, 1, 2, 0, 0, 0], [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed["positions"], [
        [0, 1, 2, 3, 0, 0, 0, 0], list(range(8)), [0, 1, 2, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed["loss_mask"], packed["segment_ids"] > 0)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_every_target_appears_once_and_never_crosses_a_piece(seq_len):
    docs = _random_docs(seed=seq_len, count=200, max_len=3 * seq_len + 5, seq_len=seq_len)
    packed = pack_documents(docs, seq_len, **SPECIAL)

    assert {key: (value.dtype, value.shape[1]) for key, value in packed.items()} == {
        "inputs": (np.int32, seq_len), "targets": (np.int32, seq_len),
        "segment_ids": (np.int32, seq_len), "positions": (np.int32, seq_len),
        "loss_mask": (np.float32, seq_len)}
    all_inputs, all_targets = [], []
    for inputs, targets, positions in _pieces(packed):
        np.testing.assert_array_equal(positions, np.arange(len(inputs)))
        # Within a piece, each target is the next input: no target crosses a piece.
        np.testing.assert_array_equal(inputs[1:], targets[:-1])
        all_inputs.append(inputs)
        all_targets.append(targets)
    # Reading targets piece by piece gives every document's tokens + eos exactly once.
    expected_targets = np.concatenate([np.append(doc, EOS) for doc in docs])
    expected_inputs = np.concatenate([np.insert(doc, 0, BOS) for doc in docs])
    np.testing.assert_array_equal(np.concatenate(all_targets), expected_targets)
    np.testing.assert_array_equal(np.concatenate(all_inputs), expected_inputs)
    assert packed["loss_mask"].sum() == sum(len(doc) + 1 for doc in docs)


def test_segments_are_contiguous_and_padding_is_masked():
    packed = pack_documents(_random_docs(seed=1, count=300, max_len=40, seq_len=32), 32, **SPECIAL)
    segments = packed["segment_ids"]
    # Segment ids never decrease along a row until the padding (0) at its end.
    real = segments > 0
    assert np.all(np.diff(real.astype(int), axis=1) <= 0)
    steps = np.diff(segments, axis=1)[real[:, 1:]]
    assert set(np.unique(steps).tolist()) <= {0, 1}  # 1, 1, 2, 2, 2, 3...
    assert np.all(segments[:, 0] == 1)
    padding = ~real
    assert np.all(packed["loss_mask"][padding] == 0) and np.all(packed["loss_mask"][real] == 1)
    assert np.all(packed["inputs"][padding] == PAD) and np.all(packed["targets"][padding] == PAD)
    assert np.all(packed["positions"][padding] == 0)


def test_lists_and_arrays_give_the_same_rows():
    docs = _random_docs(seed=2, count=50, max_len=30, seq_len=16)
    from_arrays = pack_documents(docs, 16, **SPECIAL)
    from_lists = pack_documents([doc.tolist() for doc in docs], 16, **SPECIAL)
    for key in from_arrays:
        np.testing.assert_array_equal(from_arrays[key], from_lists[key])


def test_no_documents_gives_no_rows():
    packed = pack_documents([], 8, **SPECIAL)
    assert all(value.shape == (0, 8) for value in packed.values())


def test_a_million_tokens_pack_into_every_target_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 32000, size=length) for length in rng.integers(1, 1000, size=2000)]
    assert sum(len(doc) for doc in docs) > 900_000
    packed = pack_documents(docs, 1024, **SPECIAL)
    assert packed["loss_mask"].sum() == sum(len(doc) + 1 for doc in docs)


def test_python_work_grows_with_documents_not_tokens():
    """Making every document 10x longer (still one piece each) adds no Python work per token: the token work is
    vectorised. (Its speed is timed by bench/data_loader.py, not here.) Measured: 3,593 lines for the short
    documents, 3,885 for the long ones; the 292 more are the greedy loop's one line per extra row (26 → 318
    rows), where a per-token Python loop would add ~220k."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 100, size=500)
    short = [rng.integers(4, 32000, size=n) for n in lengths]
    long = [rng.integers(4, 32000, size=10 * n) for n in lengths]
    packed_short, short_lines = python_lines(pack_documents, short, 1024, **SPECIAL)
    packed_long, long_lines = python_lines(pack_documents, long, 1024, **SPECIAL)
    assert packed_long["loss_mask"].sum() == sum(len(doc) + 1 for doc in long)
    assert packed_long["loss_mask"].sum() > 9 * packed_short["loss_mask"].sum()
    assert short_lines < 10 * len(short)
    extra_rows = len(packed_long["inputs"]) - len(packed_short["inputs"])
    assert long_lines - short_lines <= 2 * extra_rows, (short_lines, long_lines, extra_rows)

"""Tests of flaxalign.data.batching: SFT packing, over-length policies, preference rows, left padding."""

import jax
import numpy as np
import pytest

from flaxalign.data.batching import (
    left_pad_prompts,
    pack_sft,
    preference_batch,
    split_pair,
    stack_pairs,
    truncate_examples,
    unstack_pairs,
)
from flaxalign.errors import DataError
from tests.data.line_count import python_lines

PAD = 0


def _assert_arrays(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _random_sft_examples(seed, count, min_len, max_len):
    """Examples of a mask-0 prompt then a mask-1 completion (sometimes a second user turn)."""
    rng = np.random.default_rng(seed)
    examples = []
    for length in rng.integers(min_len, max_len + 1, size=count).tolist():
        ids = rng.integers(4, 1000, size=length).tolist()
        prompt = int(rng.integers(0, length))
        mask = [0] * prompt + [1] * (length - prompt)
        if length > 6 and rng.random() < 0.3:
            mask[-3:-1] = [0, 0]  # a mask-0 run in the middle, like a later user turn
        examples.append((ids, mask))
    return examples


def _segments(packed):
    """Yields (row, segment) index masks of every packed example, in packing order."""
    for row in range(len(packed["inputs"])):
        for segment in range(1, packed["segment_ids"][row].max() + 1):
            yield row, packed["segment_ids"][row] == segment


# ----------------------------------------------------------------------------
# pack_sft


def test_pack_sft_small_example_by_hand():
    examples = [
        ([1, 10, 11, 12, 2], [0, 0, 1, 1, 1]),  # 4 pairs
        ([1, 20, 21], [0, 0, 1]),  # 2 pairs: fits after the first (4 + 2 <= 6)
        ([1, 30, 31, 32, 2], [0, 1, 0, 1, 1]),  # 4 pairs: starts row 2
        ([1, 40], [0, 1]),  # 1 pair: fits after it
    ]
    packed = pack_sft(examples, 6, pad_id=PAD)
    _assert_arrays(packed, {
        "inputs": [[1, 10, 11, 12, 1, 20], [1, 30, 31, 32, 1, 0]],
        "targets": [[10, 11, 12, 2, 20, 21], [30, 31, 32, 2, 40, 0]],
        "segment_ids": [[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 0]],
        "positions": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 0]],
        # The mask of each *target*: example 1 learns 11, 12, 2; example 2 learns 21; ...
        "loss_mask": [[0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0]],
    })
    assert {key: value.dtype for key, value in packed.items()} == {
        "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
        "positions": np.int32, "loss_mask": np.float32}


def test_pack_sft_example_of_exactly_seq_len_plus_one_fills_a_row():
    packed = pack_sft([([5, 6], [0, 1]), ([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])], 4, pad_id=PAD)
    _assert_arrays(packed, {
        "inputs": [[5, 0, 0, 0], [1, 2, 3, 4]],
        "targets": [[6, 0, 0, 0], [2, 3, 4, 5]],
        "segment_ids": [[1, 0, 0, 0], [1, 1, 1, 1]],
        "positions": [[0, 0, 0, 0], [0, 1, 2, 3]],
        "loss_mask": [[1, 0, 0, 0], [0, 1, 1, 1]],
    })


@pytest.mark.parametrize("seq_len", [1, 5, 64])
def test_pack_sft_keeps_every_example_once_in_order_and_masks_stay_inside(seq_len):
    examples = _random_sft_examples(seq_len, 300, 2, seq_len + 1)
    packed = pack_sft(examples, seq_len, pad_id=PAD)

    rebuilt = []
    for row, where in _segments(packed):
        inputs, targets = packed["inputs"][row][where], packed["targets"][row][where]
        np.testing.assert_array_equal(packed["positions"][row][where], np.arange(where.sum()))
        np.testing.assert_array_equal(inputs[1:], targets[:-1])
        assert np.ptp(where.nonzero()[0]) == where.sum() - 1  # one contiguous run per example
        rebuilt.append((inputs.tolist() + [int(targets[-1])],
                        packed["loss_mask"][row][where].tolist()))
    assert len(rebuilt) == len(examples)
    for (ids, mask), (got_ids, got_shifted_mask) in zip(examples, rebuilt):
        assert got_ids == ids
        assert got_shifted_mask == mask[1:]
    padding = packed["segment_ids"] == 0
    assert not packed["loss_mask"][padding].any()
    assert (packed["inputs"][padding] == PAD).all() and (packed["targets"][padding] == PAD).all()


def test_pack_sft_numpy_examples_and_float_masks_equal_list_examples():
    examples = _random_sft_examples(0, 100, 2, 40)
    as_arrays = [(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))
                 for ids, mask in examples]
    float_masks = [(ids, [float(value) for value in mask]) for ids, mask in examples]
    expected = pack_sft(examples, 39, pad_id=PAD)
    _assert_arrays(pack_sft(as_arrays, 39, pad_id=PAD), expected)
    _assert_arrays(pack_sft(float_masks, 39, pad_id=PAD), expected)
    fractional = pack_sft([([1, 2, 3], [0.0, 0.5, 1.0])], 2, pad_id=PAD)
    np.testing.assert_array_equal(fractional["loss_mask"], [[1, 1]])  # nonzero means learn


@pytest.mark.parametrize("examples, message", [
    ([([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1])], "truncate_examples(examples, 5"),
    ([([1, 2], [0, 1]), ([7], [1])], "SFT example 1 has 1 token"),
    ([([1, 2, 3], [0, 1])], "3 token ids but 2 loss-mask values"),
    ([([1, -2], [0, 1])], "token ids must be in"),
    ([(np.array([1.0, 2.0]), [0, 1])], "token ids must be integers"),
    ([([1, "a"], [0, 1])], "token ids and masks must be numbers"),
    ([], "no SFT examples"),
])
def test_pack_sft_bad_examples_get_one_sentence(examples, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")) as error:
        pack_sft(examples, 4, pad_id=PAD)
    assert str(error.value).count(". ") == 0


def test_pack_sft_python_work_grows_with_examples_not_tokens():
    """Examples given as Python lists, then the same examples 10x longer (prompt and completion repeated): the
    Python lines run barely change, so the per-token work is done in NumPy. (bench/data_loader.py times it.)
    Measured: 4,086 lines for the short examples, 4,226 for the long ones; the 140 more are the greedy loop's one
    line per extra row (13 → 153 rows), where a per-token Python loop would add ~235k."""
    short = _random_sft_examples(1, 500, 2, 100)
    long = [(ids * 10, mask * 10) for ids, mask in short]
    packed_short, short_lines = python_lines(pack_sft, short, 2048, pad_id=PAD)
    packed_long, long_lines = python_lines(pack_sft, long, 2048, pad_id=PAD)
    assert packed_long["loss_mask"].sum() == sum(sum(mask[1:]) for _, mask in long)
    assert packed_long["segment_ids"].max() > 1
    assert short_lines < 10 * len(short)
    extra_rows = len(packed_long["inputs"]) - len(packed_short["inputs"])
    assert long_lines - short_lines <= 2 * extra_rows, (short_lines, long_lines, extra_rows)


# ----------------------------------------------------------------------------
# truncate_examples


def test_truncate_prompt_left_cuts_the_prompt_then_the_completion():
    fits = ([1, 2, 3], [0, 1, 1])
    long_prompt = ([1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 1, 1])
    long_completion = ([1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 1, 1, 1])
    no_prompt = ([1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1])
    kept, stats = truncate_examples(
        [fits, long_prompt, long_completion, no_prompt], 4, "truncate_prompt_left")
    assert kept == [
        fits,
        ([4, 5, 6, 7], [0, 0, 1, 1]),  # only prompt tokens removed
        ([2, 3, 4, 5], [0, 1, 1, 1]),  # one prompt token kept, completion cut on the right
        ([1, 2, 3, 4], [1, 1, 1, 1]),
    ]
    assert kept[0] is fits
    assert stats == {"examples": 4, "kept": 4, "truncated": 3, "dropped": 0, "tokens_removed": 8}


def test_truncated_examples_pack_into_rows():
    examples = _random_sft_examples(2, 200, 2, 100)
    kept, stats = truncate_examples(examples, 17, "truncate_prompt_left")
    assert stats["truncated"] == sum(len(ids) > 17 for ids, _ in examples) > 0
    packed = pack_sft(kept, 16, pad_id=PAD)
    assert (packed["segment_ids"] > 0).sum() == sum(len(ids) - 1 for ids, _ in kept)
    for (ids, mask), (cut_ids, cut_mask) in zip(examples, kept):
        # The completion's first token survives whenever the example had a prompt and a completion.
        if mask[0] == 0 and 1 in mask:
            assert cut_mask[0] == 0 and 1 in cut_mask


def test_drop_policy_counts_and_keeps_order():
    examples = [([1, 2], [0, 1]), ([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([3, 4, 5], [0, 1, 1])]
    kept, stats = truncate_examples(examples, 3, "drop")
    assert kept == [examples[0], examples[2]]
    assert stats == {"examples": 3, "kept": 2, "truncated": 0, "dropped": 1, "tokens_removed": 5}


def test_dropping_everything_or_an_unknown_policy_is_a_data_error():
    with pytest.raises(DataError, match="all 1 examples are longer than 3 tokens"):
        truncate_examples([([1, 2, 3, 4], [0, 1, 1, 1])], 3, "drop")
    with pytest.raises(DataError, match="unknown over-length policy 'keep_end'"):
        truncate_examples([([1, 2], [0, 1])], 3, "keep_end")
    with pytest.raises(DataError, match="no examples"):
        truncate_examples([], 3, "drop")


def test_pairs_keep_one_shared_prompt_when_truncated():
    pairs = [
        ([1, 2, 3], [4, 5], [6]),  # 5 tokens: fits
        ([1, 2, 3, 4, 5], [6, 7], [8, 9, 10]),  # 8: prompt cut by 2
        ([1, 2], [3, 4, 5, 6, 7, 8], [9]),  # 8: prompt cut to 1 token, chosen cut on the right
    ]
    kept, stats = truncate_examples(pairs, 5, "truncate_prompt_left")
    assert kept == [pairs[0], ([4, 5], [6, 7], [8, 9, 10]), ([2], [3, 4, 5, 6], [9])]
    assert stats == {"examples": 3, "kept": 3, "truncated": 2, "dropped": 0, "tokens_removed": 6}
    kept, stats = truncate_examples(pairs, 5, "drop")
    assert kept == [pairs[0]] and stats["dropped"] == 2


# ----------------------------------------------------------------------------
# preference_batch


def test_preference_batch_small_example_by_hand():
    pairs = [([1, 2], [3, 4, 5], [6]), ([7], [8], [9, 10])]
    batch = preference_batch(pairs, 4, pad_id=PAD)
    _assert_arrays(batch, {
        # rows: prompt0+chosen0, prompt1+chosen1, prompt0+rejected0, prompt1+rejected1
        "inputs": [[1, 2, 3, 4], [7, 0, 0, 0], [1, 2, 0, 0], [7, 9, 0, 0]],
        "targets": [[2, 3, 4, 5], [8, 0, 0, 0], [2, 6, 0, 0], [9, 10, 0, 0]],
        "positions": [[0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]],
        "segment_ids": [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
        "attention_mask": [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
        "completion_mask": [[0, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]],
    })
    assert batch["completion_mask"].dtype == np.float32
    chosen, rejected = split_pair(batch["targets"])
    np.testing.assert_array_equal(chosen, batch["targets"][:2])
    np.testing.assert_array_equal(rejected, batch["targets"][2:])


def test_preference_masks_count_each_completion_token_once():
    rng = np.random.default_rng(3)
    pairs = [(rng.integers(4, 99, size=p).tolist(), rng.integers(4, 99, size=c).tolist(),
              rng.integers(4, 99, size=r).tolist())
             for p, c, r in rng.integers(1, 12, size=(50, 3)).tolist()]
    batch = preference_batch(pairs, 24, pad_id=PAD)
    chosen_mask, rejected_mask = split_pair(batch["completion_mask"])
    chosen_targets, rejected_targets = split_pair(batch["targets"])
    for index, (prompt, chosen, rejected) in enumerate(pairs):
        assert chosen_targets[index][chosen_mask[index] == 1].tolist() == chosen
        assert rejected_targets[index][rejected_mask[index] == 1].tolist() == rejected
    assert not (batch["completion_mask"] * (1 - batch["segment_ids"])).any()


def test_over_long_pairs_are_refused_until_truncated():
    pairs = [([1, 2, 3], [4, 5, 6], [7])]
    with pytest.raises(DataError, match=r"truncate_examples\(pairs, 5"):
        preference_batch(pairs, 4, pad_id=PAD)
    kept, _ = truncate_examples(pairs, 5, "truncate_prompt_left")
    batch = preference_batch(kept, 4, pad_id=PAD)
    np.testing.assert_array_equal(batch["inputs"], [[2, 3, 4, 5], [2, 3, 0, 0]])
    with pytest.raises(DataError, match="pair 0 has an empty prompt"):
        preference_batch([([], [1], [2])], 4, pad_id=PAD)
    with pytest.raises(DataError, match="pair 0 has an empty rejected completion"):
        preference_batch([([1], [1], [])], 4, pad_id=PAD)


def test_stack_pairs_round_trips_in_numpy_and_in_jit():
    batch = preference_batch([([1], [2], [3]), ([4], [5, 6], [7])], 3, pad_id=PAD)
    stacked = stack_pairs(batch)
    assert stacked["inputs"].shape == (2, 2, 3)
    np.testing.assert_array_equal(stacked["inputs"][:, 0], split_pair(batch["inputs"])[0])
    _assert_arrays(unstack_pairs(stacked), batch)
    in_jit = jax.jit(unstack_pairs)({key: jax.numpy.asarray(value) for key, value in stacked.items()})
    _assert_arrays({key: np.asarray(value) for key, value in in_jit.items()}, batch)


# ----------------------------------------------------------------------------
# left_pad_prompts


def test_left_pad_prompts_by_hand():
    padded = left_pad_prompts([[5, 6, 7], [8]], pad_id=PAD)
    _assert_arrays(padded, {
        "input_ids": [[0, 0, 0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 8]],
        "attention_mask": [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]],
        "positions": [[0, 0, 0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 0, 0, 0]],
    })


def test_left_pad_prompts_length_rounding_and_errors():
    assert left_pad_prompts([list(range(1, 10))], pad_id=PAD)["input_ids"].shape == (1, 16)
    assert left_pad_prompts([list(range(1, 9))], pad_id=PAD)["input_ids"].shape == (1, 8)
    padded = left_pad_prompts([np.array([3, 4])], pad_id=1, length=3)
    _assert_arrays(padded, {"input_ids": [[1, 3, 4]], "attention_mask": [[0, 1, 1]],
                            "positions": [[0, 0, 1]]})
    with pytest.raises(DataError, match="more than the padded length 2"):
        left_pad_prompts([[1, 2, 3]], pad_id=PAD, length=2)
    with pytest.raises(DataError, match="prompt 1 is empty"):
        left_pad_prompts([[1], []], pad_id=PAD)

"""`read_splits`: a data config block's train and eval records, and `data.mix` (a data mixture)."""

import ml_collections
import pytest

from flaxalign.data.sources import read_records
from flaxalign.data.splits import interleave, read_splits


def _data(**fields):
    return ml_collections.ConfigDict({**dict(train="builtin:arithmetic_sft?n=90&max=9", eval="", eval_fraction=0.1,
                                             max_examples=0, format="trl", columns={}), **fields})


def test_interleave_spreads_each_source_evenly_in_its_own_order():
    assert interleave([list("abcdef"), [1, 2]]) == ["a", "b", 1, "c", "d", "e", 2, "f"]
    assert interleave([[1, 2], ["x"]]) == [1, "x", 2]  # a tie at ½: the earlier source first
    assert interleave([[1, 2, 3]]) == [1, 2, 3]


def test_mix_joins_train_in_proportion_and_the_hold_out_and_max_examples_keep_it():
    arithmetic = read_records("builtin:arithmetic_sft?n=90&max=9", "sft")
    docs = read_records("builtin:sft?n=30", "sft")
    splits = read_splits(_data(mix="builtin:sft?n=30"), "sft")
    train, held_out = splits["train"][1], splits["eval"][1]
    assert len(train) + len(held_out) == 120 and len(held_out) == 12
    assert sorted(map(str, train + held_out)) == sorted(map(str, arithmetic + docs))
    assert sum(r in docs for r in held_out) == 3  # a quarter of each split is docstring pairs, like the mixture
    assert [r for r in train if r in docs] == [r for r in docs if r not in held_out]  # each source in its own order
    capped = read_splits(_data(mix="builtin:sft?n=30", max_examples=40), "sft")["train"][1]
    assert len(capped) == 40 and sum(r in docs for r in capped) == 10
    two = read_splits(_data(mix="builtin:sft?n=30, builtin:arithmetic_sft?n=30&seed=9&max=9"), "sft")
    assert len(two["train"][1]) + len(two["eval"][1]) == 150
    given = read_splits(_data(mix="builtin:sft?n=30", eval="builtin:arithmetic_sft?n=5&seed=3&max=9"), "sft")
    assert len(given["train"][1]) == 120 and len(given["eval"][1]) == 5  # an eval spec: the mixture is all train


def test_a_bad_mix_spec_is_named():
    from flaxalign.errors import DataError

    with pytest.raises(DataError, match="builtin:nope"):
        read_splits(_data(mix="builtin:nope"), "sft")

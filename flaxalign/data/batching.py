"""Batches of already-tokenised SFT examples, preference pairs and generation prompts.

Inputs are token id sequences (lists or 1-D integer arrays); tokenizers and
chat templates live elsewhere.

Row convention (the same as `packing.pack_documents`): a row of T positions
holds the (input, target) pairs of a sequence of up to T + 1 tokens, inputs =
ids[:-1] and targets = ids[1:].  So `pack_sft(seq_len)` takes examples of at
most seq_len + 1 tokens and `preference_batch(max_len)` sequences of at most
max_len + 1 tokens; longer ones are refused with a `DataError` that says to
call `truncate_examples(examples, T + 1, policy)` first, which returns counts
of what it truncated or dropped so that stages can report them.

Masks follow the *target*: position t is learned when token t + 1 is a
completion (assistant) token.  A sequence's last token is never an input, so
no (input, target) pair crosses from one packed example into the next.
"""

import itertools

import numpy as np

from flaxalign.data.packing import _exclusive_cumsum, _place_pieces_greedily
from flaxalign.errors import DataError

POLICIES = ("truncate_prompt_left", "drop")
SFT_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PREFERENCE_KEYS = (
    "inputs", "targets", "positions", "segment_ids", "completion_mask", "attention_mask",
)
_INT32_MAX = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------
# Over-long examples.


def truncate_examples(examples, max_len: int, policy: str):
    """Makes every example at most `max_len` tokens; returns (kept, stats).

    `examples` are either SFT examples `(ids, loss_mask)` or preference pairs
    `(prompt_ids, chosen_ids, rejected_ids)`, whose length is the longer of
    prompt + chosen and prompt + rejected.  Examples that fit are returned
    unchanged and in order.  Policies for the others:

    - "truncate_prompt_left": drop tokens from the left of the prompt (an SFT
      example's prompt is its leading run of mask-0 tokens), keeping at least
      one prompt token so the first completion token is still predicted; if
      that is not enough, cut the completion's right end.  A pair keeps one
      shared prompt for chosen and rejected.
    - "drop": leave the example out.

    `stats` = {"examples", "kept", "truncated", "dropped", "tokens_removed"}.
    Raises `DataError` when no example is left.
    """
    if policy not in POLICIES:
        raise DataError(f"unknown over-length policy {policy!r}; use one of {', '.join(POLICIES)}.")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 tokens, got {max_len}.")
    examples = list(examples)
    if not examples:
        raise DataError("there are no examples to batch.")
    is_pair = _is_pair(examples[0])
    lengths = _example_lengths(examples, is_pair)
    too_long = np.flatnonzero(lengths > max_len).tolist()
    stats = {"examples": len(examples), "kept": len(examples), "truncated": 0, "dropped": 0,
             "tokens_removed": 0}
    if policy == "drop":
        kept = _drop(examples, too_long)
        stats.update(kept=len(kept), dropped=len(too_long),
                     tokens_removed=int(_token_counts(examples, too_long, is_pair).sum()))
    else:
        kept = list(examples)
        truncate = _truncate_pair if is_pair else _truncate_sft
        for index in too_long:
            kept[index] = truncate(examples[index], max_len)
        stats.update(truncated=len(too_long), tokens_removed=int(
            _token_counts(examples, too_long, is_pair).sum()
            - _token_counts(kept, too_long, is_pair).sum()))
    if not kept:
        raise DataError(
            f"all {len(examples)} examples are longer than {max_len} tokens and policy 'drop' "
            f"removed them; raise the sequence length or use 'truncate_prompt_left'."
        )
    return kept, stats


def _is_pair(example):
    """Tells preference pairs (3 sequences) from SFT examples (ids, mask)."""
    if len(example) == 3:
        return True
    if len(example) == 2:
        return False
    raise DataError(
        f"an example must be (ids, loss_mask) or (prompt, chosen, rejected), got {len(example)} parts."
    )


def _example_lengths(examples, is_pair):
    """Returns each example's longest sequence length in tokens."""
    if is_pair:
        lengths = (len(prompt) + max(len(chosen), len(rejected))
                   for prompt, chosen, rejected in examples)
    else:
        lengths = (len(ids) for ids, _ in examples)
    return np.fromiter(lengths, dtype=np.int64, count=len(examples))


def _token_counts(examples, indices, is_pair):
    """Returns the number of tokens held by each of the examples at `indices`."""
    if is_pair:
        counts = [sum(len(part) for part in examples[index]) for index in indices]
    else:
        counts = [len(examples[index][0]) for index in indices]
    return np.asarray(counts, dtype=np.int64)


def _drop(examples, indices):
    """Returns the examples without those at `indices`, in order."""
    keep = np.ones(len(examples), dtype=bool)
    keep[indices] = False
    return [example for example, kept in zip(examples, keep.tolist()) if kept]


def _truncate_sft(example, max_len):
    """Cuts the prompt's left end, then the completion's right end, to max_len tokens."""
    ids, mask = example
    if len(ids) != len(mask):
        raise DataError(
            f"an example has {len(ids)} token ids but {len(mask)} loss-mask values; "
            f"they must have the same length."
        )
    prompt_len = _leading_zeros(mask)
    cut = min(len(ids) - max_len, max(prompt_len - 1, 0))
    return ids[cut:cut + max_len], mask[cut:cut + max_len]


def _truncate_pair(pair, max_len):
    """Cuts the shared prompt's left end, then both completions' right ends."""
    prompt, chosen, rejected = pair
    excess = len(prompt) + max(len(chosen), len(rejected)) - max_len
    prompt = prompt[min(excess, max(len(prompt) - 1, 0)):]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def _leading_zeros(mask):
    """Returns the length of the mask's leading run of zeros (the prompt)."""
    nonzero = np.flatnonzero(np.asarray(mask))
    return int(nonzero[0]) if len(nonzero) else len(mask)


# ----------------------------------------------------------------------------
# SFT packing.


def pack_sft(examples, seq_len: int, *, pad_id: int) -> dict:
    """Packs (ids, loss_mask) examples into rows of seq_len positions.

    Packing is greedy next-fit in the given order: an example that does not
    fit in what is left of the current row starts a new row, and the rest of
    the old row is padding.  Examples are never split or reordered (shuffling
    is `BatchIterator`'s job), so every example lands whole in one row.

    Returns int32 `inputs`, `targets`, `segment_ids` (1, 2, ... per example in
    its row, 0 = padding), `positions` (restarting at 0 per example) and a
    float32 `loss_mask` (the target token's mask; 0 on padding), each
    [rows, seq_len].  Raises `DataError` for an example of fewer than 2 or
    more than seq_len + 1 tokens, or with a mask of another length.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    examples = list(examples)
    if not examples:
        raise DataError("there are no SFT examples to pack.")
    id_seqs = [example[0] for example in examples]
    mask_seqs = [example[1] for example in examples]
    lengths = _lengths(id_seqs)
    _check_sft_lengths(lengths, _lengths(mask_seqs), seq_len)
    ids = _flat_token_ids(id_seqs, lengths)
    mask = _flat_mask(mask_seqs, lengths)

    pairs = lengths - 1
    rows, _, segments = _place_pieces_greedily(pairs, seq_len)
    # Next-fit packing leaves no gaps inside a row: row r holds its examples'
    # pairs back to back from column 0, then padding.  So every output is the
    # stream of all pairs in order, poured into the first `used` columns of
    # each row (a boolean-mask assignment, no per-token index arrays).
    used = np.bincount(rows, weights=pairs).astype(np.int64)
    real = np.arange(seq_len)[None, :] < used[:, None]
    ends = np.cumsum(lengths)
    is_input = np.ones(len(ids), dtype=bool)
    is_input[ends - 1] = False  # an example's last token is only a target
    is_target = np.ones(len(ids), dtype=bool)
    is_target[ends - lengths] = False  # and its first only an input
    first_pair = np.repeat(_exclusive_cumsum(pairs), pairs)
    return {
        "inputs": _pour(real, ids[is_input], pad_id, np.int32),
        "targets": _pour(real, ids[is_target], pad_id, np.int32),
        "segment_ids": _pour(real, np.repeat(segments, pairs), 0, np.int32),
        "positions": _pour(real, np.arange(len(first_pair)) - first_pair, 0, np.int32),
        "loss_mask": _pour(real, mask[is_target], 0, np.float32),
    }


def _check_sft_lengths(lengths, mask_lengths, seq_len):
    """Raises a DataError naming the first example that cannot be packed."""
    mismatched = np.flatnonzero(lengths != mask_lengths)
    if len(mismatched):
        index = int(mismatched[0])
        raise DataError(
            f"SFT example {index} has {lengths[index]} token ids but {mask_lengths[index]} "
            f"loss-mask values; they must have the same length."
        )
    too_short = np.flatnonzero(lengths < 2)
    if len(too_short):
        index = int(too_short[0])
        raise DataError(
            f"SFT example {index} has {lengths[index]} token(s); an example needs at least 2 "
            f"tokens so that one of them is predicted."
        )
    too_long = np.flatnonzero(lengths > seq_len + 1)
    if len(too_long):
        index = int(too_long[0])
        raise DataError(
            f"SFT example {index} has {lengths[index]} tokens, more than seq_len + 1 = "
            f"{seq_len + 1}; pass the examples through truncate_examples(examples, "
            f"{seq_len + 1}, policy) first."
        )


# ----------------------------------------------------------------------------
# Preference pairs.


def preference_batch(pairs, max_len: int, *, pad_id: int) -> dict:
    """Builds the [chosen; rejected] rows of (prompt_ids, chosen_ids, rejected_ids) pairs.

    For B pairs, rows 0..B-1 hold prompt + chosen and rows B..2B-1 prompt +
    rejected, right-padded to max_len positions (so each sequence may have up
    to max_len + 1 tokens).  Returns int32 `inputs`, `targets`, `positions`,
    `segment_ids` (1 on real positions, 0 on padding), `attention_mask` (the
    same 1/0) and a float32 `completion_mask` (1 where the target is a
    completion token), each [2B, max_len].  Use `split_pair` to get the two
    halves of anything computed per row.

    The prompt must have at least one token (e.g. BOS) so the first completion
    token is scored, and each completion at least one.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    pairs = list(pairs)
    if not pairs:
        raise DataError("there are no preference pairs to batch.")
    prompts, chosen, rejected = ([pair[part] for pair in pairs] for part in range(3))
    prompt_lengths = _lengths(prompts)
    completions = chosen + rejected
    completion_lengths = _lengths(completions)
    _check_pair_lengths(prompt_lengths, completion_lengths, max_len)

    # Row r is prompt[r % B] + completion[r] + padding: pour the prompts (all
    # of them, twice) into each row's first columns and the completions after.
    row_prompt_lengths = np.tile(prompt_lengths, 2)
    row_lengths = row_prompt_lengths + completion_lengths
    token_column = np.arange(max_len + 1, dtype=np.int32)[None, :]
    in_prompt = token_column < row_prompt_lengths[:, None]
    in_completion = ~in_prompt & (token_column < row_lengths[:, None])
    prompt_ids = _flat_token_ids(prompts, prompt_lengths)
    tokens = _pour(in_prompt, np.concatenate([prompt_ids, prompt_ids]), pad_id, np.int32)
    tokens[in_completion] = _flat_token_ids(completions, completion_lengths)

    column = token_column[:, :-1]
    real = column < (row_lengths - 1)[:, None]
    real_int = real.astype(np.int32)
    return {
        "inputs": np.where(real, tokens[:, :-1], np.int32(pad_id)),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "positions": np.where(real, column, np.int32(0)),
        "segment_ids": real_int,
        "completion_mask": (real & (column >= row_prompt_lengths[:, None] - 1)).astype(np.float32),
        "attention_mask": real_int.copy(),
    }


def _check_pair_lengths(prompt_lengths, completion_lengths, max_len):
    """Raises a DataError naming the first pair that cannot be batched."""
    num_pairs = len(prompt_lengths)
    empty_prompt = np.flatnonzero(prompt_lengths < 1)
    if len(empty_prompt):
        raise DataError(
            f"preference pair {int(empty_prompt[0])} has an empty prompt; give it at least one "
            f"token (e.g. BOS) so the first completion token is scored."
        )
    empty_completion = np.flatnonzero(completion_lengths < 1)
    if len(empty_completion):
        index = int(empty_completion[0])
        which = "chosen" if index < num_pairs else "rejected"
        raise DataError(f"preference pair {index % num_pairs} has an empty {which} completion.")
    lengths = np.tile(prompt_lengths, 2) + completion_lengths
    too_long = np.flatnonzero(lengths > max_len + 1)
    if len(too_long):
        index = int(too_long[0])
        raise DataError(
            f"preference pair {index % len(prompt_lengths)} has {lengths[index]} tokens, more than "
            f"max_len + 1 = {max_len + 1}; pass the pairs through truncate_examples(pairs, "
            f"{max_len + 1}, policy) first."
        )


def split_pair(x):
    """Returns (chosen, rejected): the first and second half of a [2B, ...] array."""
    if x.shape[0] % 2:
        raise ValueError(f"a [chosen; rejected] array needs an even leading size, got {x.shape[0]}.")
    half = x.shape[0] // 2
    return x[:half], x[half:]


def stack_pairs(batch: dict) -> dict:
    """Turns [chosen; rejected] rows [2B, ...] into per-pair arrays [B, 2, ...].

    Use this form for `BatchIterator` and `sharding.global_batch`: shuffling
    and per-host slicing then move whole pairs, whereas the [2B] form would
    separate a pair's rows (and with several processes the global array
    would read [c0; r0; c1; r1] instead of [chosen; rejected]).
    """
    return {key: _stack(value) for key, value in batch.items()}


def unstack_pairs(batch: dict) -> dict:
    """Inverse of `stack_pairs`: [B, 2, ...] to [chosen; rejected] rows [2B, ...].

    Uses only array methods, so it works on numpy arrays and inside jit.
    """
    return {key: value.swapaxes(0, 1).reshape((-1,) + value.shape[2:])
            for key, value in batch.items()}


def _stack(x):
    chosen, rejected = split_pair(x)
    return np.stack([chosen, rejected], axis=1)


# ----------------------------------------------------------------------------
# Generation prompts.


def pair_prompts(pairs: dict) -> list[np.ndarray]:
    """The prompt tokens of `[N, 2, T]` preference rows: a chosen row's inputs up to its first completion target."""
    inputs, completion = pairs["inputs"][:, 0], pairs["completion_mask"][:, 0]
    first = np.argmax(completion > 0, axis=1)
    return [inputs[i, : first[i] + 1] for i in range(len(inputs))]


def left_pad_prompts(prompts, *, pad_id: int, length: int | None = None) -> dict:
    """Left-pads prompts into int32 `input_ids`, `attention_mask` and `positions`, each [B, L].

    Left padding puts every prompt's last token in the last column, so
    generation appends to all rows at the same index.  `positions` count from
    0 at each prompt's first real token (0 on padding) so RoPE sees the same
    positions as for an unpadded prompt.  L = `length`, or else the longest
    prompt rounded up to a multiple of 8 (fewer distinct shapes to compile).
    """
    prompts = list(prompts)
    if not prompts:
        raise DataError("there are no prompts to pad.")
    lengths = _lengths(prompts)
    empty = np.flatnonzero(lengths < 1)
    if len(empty):
        raise DataError(f"prompt {int(empty[0])} is empty; generation needs at least one token.")
    longest = int(lengths.max())
    width = -(-longest // 8) * 8 if length is None else int(length)
    if width < longest:
        raise DataError(f"a prompt has {longest} tokens, more than the padded length {width}.")

    offset = np.arange(width)[None, :] - (width - lengths)[:, None]
    real = offset >= 0
    return {
        "input_ids": _pour(real, _flat_token_ids(prompts, lengths), pad_id, np.int32),
        "attention_mask": real.astype(np.int32),
        "positions": np.maximum(offset, 0).astype(np.int32),
    }


# ----------------------------------------------------------------------------
# Vectorised helpers.


def _lengths(sequences):
    return np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))


def _flatten(sequences, lengths, dtype):
    """Returns the sequences laid end to end as one array (numpy inputs keep their dtype)."""
    if all(isinstance(sequence, np.ndarray) for sequence in sequences):
        return np.concatenate(sequences) if int(lengths.sum()) else np.zeros(0, dtype=dtype)
    # One fromiter over a chained iterator allocates once and beats converting
    # each list with np.asarray and concatenating.
    try:
        return np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype,
                           count=int(lengths.sum()))
    except (TypeError, ValueError) as error:
        raise DataError(f"token ids and masks must be numbers ({error}).") from None


def _flat_mask(sequences, lengths):
    """Returns the flattened masks as booleans (any nonzero value means learn)."""
    if not any(isinstance(sequence, np.ndarray) for sequence in sequences):
        try:
            # bytes() reads a list of small ints in C: twice as fast as fromiter.
            flat = b"".join(map(bytes, sequences))
            if len(flat) == int(lengths.sum()):
                return np.frombuffer(flat, dtype=np.uint8) != 0
        except (TypeError, ValueError):
            pass  # floats or large values: the general path below
    return _flatten(sequences, lengths, np.float64) != 0


def _flat_token_ids(sequences, lengths):
    """Returns the flattened token ids after checking that they are integers that fit int32."""
    ids = _flatten(sequences, lengths, np.int64)
    if ids.dtype.kind not in "iu":
        raise DataError(f"token ids must be integers, got an array of {ids.dtype}.")
    if len(ids) and (ids.min() < 0 or ids.max() > _INT32_MAX):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise DataError(f"token ids must be in [0, 2**31 - 1], found {bad}.")
    return ids


def _pour(real, stream, fill, dtype):
    """Returns an array shaped like `real`, `stream` in order where it is True, else `fill`."""
    out = np.full(real.shape, fill, dtype=dtype)
    out[real] = stream
    return out

"""Packing tokenised documents into fixed-length rows for causal LM training.

Each document becomes [bos] + tokens + [eos]; a sequence of L tokens gives
L - 1 (input, target) pairs.  A sequence longer than seq_len + 1 tokens is cut
into pieces of at most seq_len + 1 tokens that overlap by one token, so each
token after bos is a target exactly once and no piece needs more than seq_len
positions.  Pieces are placed greedily, in order, into rows of seq_len
positions; a piece that does not fit in the current row starts a new one and
the rest of the old row is padding.

Per row, `segment_ids` number the pieces 1, 2, 3... (0 = padding) so attention
can be kept inside a piece, and `positions` restart at 0 for each piece.
"""

import numpy as np

PACKED_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def pack_documents(token_docs, seq_len: int, *, bos_id: int | None, eos_id: int, pad_id: int) -> dict:
    """Packs token documents into rows; see the module docstring.

    Returns int32 arrays `inputs`, `targets`, `segment_ids`, `positions` and a
    float32 `loss_mask` (1 on real targets, 0 on padding), each [rows, seq_len].
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    sequences, sequence_starts, sequence_lengths = _concatenate_with_bos_eos(
        token_docs, bos_id, eos_id
    )
    piece_sources, piece_lengths = _cut_into_pieces(sequence_starts, sequence_lengths, seq_len)
    piece_rows, piece_columns, piece_segments = _place_pieces_greedily(piece_lengths, seq_len)
    num_rows = int(piece_rows[-1]) + 1 if len(piece_rows) else 0
    return _fill_rows(
        sequences, piece_sources, piece_lengths, piece_rows, piece_columns, piece_segments,
        num_rows, seq_len, pad_id,
    )


def _concatenate_with_bos_eos(token_docs, bos_id, eos_id):
    """Returns all [bos] + doc + [eos] sequences back to back, their starts and lengths (no bos when the
    tokenizer has none, as some HF tokenizers do)."""
    lead = 0 if bos_id is None else 1
    doc_lengths = np.array([len(doc) for doc in token_docs], dtype=np.int64)
    sequence_lengths = doc_lengths + 1 + lead
    sequence_starts = _exclusive_cumsum(sequence_lengths)
    sequences = np.empty(int(sequence_lengths.sum()), dtype=np.int32)
    if lead:
        sequences[sequence_starts] = bos_id
    sequences[sequence_starts + sequence_lengths - 1] = eos_id
    if doc_lengths.sum() > 0:
        tokens = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in token_docs])
        if tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max:
            raise ValueError("token ids must fit in int32 and be >= 0.")
        # Token j of document d sits after the d (bos, eos) pairs before it and its own bos.
        document_of_token = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
        sequences[np.arange(len(tokens)) + (1 + lead) * document_of_token + lead] = tokens
    return sequences, sequence_starts, sequence_lengths


def _cut_into_pieces(sequence_starts, sequence_lengths, seq_len):
    """Returns each piece's start in the concatenation and its number of pairs.

    A sequence with P = L - 1 pairs gives ceil(P / seq_len) pieces; piece i
    covers tokens [i * seq_len, i * seq_len + pairs + 1), sharing its first
    token with the previous piece's last.
    """
    pairs = sequence_lengths - 1
    pieces_per_sequence = -(-pairs // seq_len)
    sequence_of_piece = np.repeat(np.arange(len(pairs)), pieces_per_sequence)
    first_piece = _exclusive_cumsum(pieces_per_sequence)
    index_in_sequence = np.arange(len(sequence_of_piece)) - first_piece[sequence_of_piece]
    piece_sources = sequence_starts[sequence_of_piece] + index_in_sequence * seq_len
    piece_lengths = np.minimum(seq_len, pairs[sequence_of_piece] - index_in_sequence * seq_len)
    return piece_sources, piece_lengths


def _place_pieces_greedily(piece_lengths, seq_len):
    """Returns each piece's row, first column and segment id (1-based in its row).

    Greedy first-fit in order is inherently sequential; it is one cheap step
    per piece (not per token), so a plain loop is fast enough.
    """
    rows = np.empty(len(piece_lengths), dtype=np.int64)
    columns = np.empty(len(piece_lengths), dtype=np.int64)
    segments = np.empty(len(piece_lengths), dtype=np.int64)
    row, column, segment = 0, 0, 0
    for index, length in enumerate(piece_lengths.tolist()):
        if column + length > seq_len:
            row, column, segment = row + 1, 0, 0
        segment += 1
        rows[index], columns[index], segments[index] = row, column, segment
        column += length
    return rows, columns, segments


def _fill_rows(sequences, piece_sources, piece_lengths, piece_rows, piece_columns,
               piece_segments, num_rows, seq_len, pad_id):
    """Scatters every piece's (input, target) pairs into padded rows."""
    inputs = np.full((num_rows, seq_len), pad_id, dtype=np.int32)
    targets = np.full((num_rows, seq_len), pad_id, dtype=np.int32)
    segment_ids = np.zeros((num_rows, seq_len), dtype=np.int32)
    positions = np.zeros((num_rows, seq_len), dtype=np.int32)
    loss_mask = np.zeros((num_rows, seq_len), dtype=np.float32)

    piece_of_pair = np.repeat(np.arange(len(piece_lengths)), piece_lengths)
    first_pair = _exclusive_cumsum(piece_lengths)
    position = np.arange(len(piece_of_pair)) - first_pair[piece_of_pair]
    source = piece_sources[piece_of_pair] + position
    destination = (piece_rows * seq_len + piece_columns)[piece_of_pair] + position

    inputs.reshape(-1)[destination] = sequences[source]
    targets.reshape(-1)[destination] = sequences[source + 1]
    segment_ids.reshape(-1)[destination] = piece_segments[piece_of_pair]
    positions.reshape(-1)[destination] = position
    loss_mask.reshape(-1)[destination] = 1.0
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": loss_mask,
    }


def _exclusive_cumsum(counts):
    """Returns where each run starts when runs of these lengths are laid end to end."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.cumsum(counts) - counts

"""Deterministic, resumable batches, and the causal-LM data pipeline.

`BatchIterator` reads rows in a fixed order that depends only on the seed, so
a run restarted from `get_state()` sees exactly the batches it would have seen
without the restart, whatever the number of processes.

`build_clm_datasets` turns a data config into packed train/eval arrays and a
tokenizer, caching the arrays in the work folder.
"""

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np

from flaxalign.data import formats
from flaxalign.data.atomic import write_atomically
from flaxalign.data.corpus import truncate_documents
from flaxalign.data.packing import PACKED_KEYS, pack_documents
from flaxalign.data.sources import read_records
from flaxalign.data.tokenizer import Tokenizer, load_tokenizer
from flaxalign.errors import DataError

# Bump when the cached arrays would change for the same inputs.
CACHE_FORMAT_VERSION = 1


class BatchIterator:
    """Endless iterator over local batches of a dict of equal-length arrays.

    Epoch e reads rows in the order `np.random.default_rng([seed, e])
    .permutation(num_rows)` (row order when shuffle is False).  The epoch
    orders are laid end to end and global batch k is positions
    [k * B, (k + 1) * B) of that stream, so a batch may straddle two epochs
    and every row is read once per epoch.  Process p of P gets the contiguous
    slice [p * B / P, (p + 1) * B / P) of each global batch.
    """

    def __init__(self, arrays, global_batch_size: int, *, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        self._arrays = dict(arrays)
        self._num_rows = _common_num_rows(self._arrays)
        _check_batch_split(global_batch_size, process_index, process_count)
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._local_offset = process_index * self._local_batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._batches_consumed = 0
        self._epoch_orders = {}

    @property
    def epoch(self) -> int:
        """The epoch of the first row of the next batch."""
        return self._batches_consumed * self._global_batch_size // self._num_rows

    @property
    def batches_consumed(self) -> int:
        return self._batches_consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """Returns this process's slice of the next global batch."""
        first = self._batches_consumed * self._global_batch_size + self._local_offset
        rows = self._rows_at(np.arange(first, first + self._local_batch_size, dtype=np.int64))
        self._batches_consumed += 1
        return {name: array[rows] for name, array in self._arrays.items()}

    def get_state(self) -> dict:
        """Returns a JSON-serialisable position to resume from with `set_state`."""
        return {
            "batches_consumed": self._batches_consumed,
            "seed": self._seed,
            "num_rows": self._num_rows,
            "global_batch_size": self._global_batch_size,
        }

    def set_state(self, state: dict) -> None:
        """Resumes at a position from `get_state`, after checking it fits this data."""
        if state["num_rows"] != self._num_rows or state["seed"] != self._seed:
            raise DataError(
                f"the training data changed since the checkpoint: it had {state['num_rows']} rows "
                f"and seed {state['seed']}, now {self._num_rows} rows and seed {self._seed}."
            )
        saved_batch_size = state.get("global_batch_size", self._global_batch_size)
        if saved_batch_size != self._global_batch_size:
            raise DataError(
                f"the global batch size changed since the checkpoint, from {saved_batch_size} "
                f"to {self._global_batch_size}, so the data position cannot be resumed."
            )
        self._batches_consumed = int(state["batches_consumed"])

    def _rows_at(self, stream_positions):
        """Maps positions in the endless stream of epoch orders to row indices."""
        epochs = stream_positions // self._num_rows
        rows = np.empty_like(stream_positions)
        for epoch in np.unique(epochs).tolist():
            in_epoch = epochs == epoch
            rows[in_epoch] = self._epoch_order(epoch)[stream_positions[in_epoch] % self._num_rows]
        return rows

    def _epoch_order(self, epoch):
        """Returns the row order of an epoch, keeping only recent ones cached."""
        if epoch not in self._epoch_orders:
            if self._shuffle:
                order = np.random.default_rng([self._seed, epoch]).permutation(self._num_rows)
            else:
                order = np.arange(self._num_rows)
            # Batches move forward, so older epochs are never needed again.
            self._epoch_orders = {
                cached: value for cached, value in self._epoch_orders.items() if cached > epoch - 2
            }
            self._epoch_orders[epoch] = order
        return self._epoch_orders[epoch]


def _common_num_rows(arrays):
    """Returns the shared first dimension of the arrays."""
    if not arrays:
        raise ValueError("BatchIterator needs at least one array.")
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"BatchIterator arrays differ in length: {lengths}.")
    num_rows = next(iter(lengths.values()))
    if num_rows == 0:
        raise DataError("the dataset has no rows; give a larger corpus or a smaller seq_len.")
    return num_rows


def _check_batch_split(global_batch_size, process_index, process_count):
    """Checks that the global batch splits evenly over the processes."""
    if global_batch_size < 1:
        raise DataError(f"the global batch size must be >= 1, got {global_batch_size}.")
    if global_batch_size % process_count:
        raise DataError(
            f"the global batch size {global_batch_size} is not divisible by the "
            f"process count {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")


@dataclasses.dataclass
class ClmData:
    """Packed causal-LM arrays (see `packing.pack_documents`) and their tokenizer."""

    train: dict
    eval: dict
    tokenizer: Tokenizer
    stats: dict


def build_clm_datasets(data_cfg, workdir: str, *, log=print) -> ClmData:
    """Loads the corpora, gets a tokenizer, and returns packed train/eval rows.

    `data_cfg` attributes: `train` and `eval` (corpus specs; an empty `eval`
    holds out every k-th training document, k = round(1 / eval_fraction)),
    `eval_fraction`, `max_chars` (0 = no limit, applied to each corpus),
    `tokenizer` (a .model path; empty = `workdir/tokenizer.model`, trained on
    the training documents if missing), `vocab_size` (used only for training)
    and `seq_len`.  The packed arrays are cached in
    `workdir/data_cache_<hash>.npz`, keyed by the documents' text, the settings
    and the tokenizer file's bytes, so a resumed run skips tokenisation.
    """
    max_chars = getattr(data_cfg, "max_chars", 0) or None
    seq_len = int(data_cfg.seq_len)
    train_docs, eval_docs = _train_and_eval_documents(data_cfg, max_chars)
    tokenizer = _get_tokenizer(data_cfg, workdir, train_docs, log)

    cache_path = os.path.join(
        workdir, f"data_cache_{_cache_key(train_docs, eval_docs, tokenizer, seq_len)}.npz"
    )
    cached = _read_cache(cache_path, log)
    if cached is None:
        train = _tokenize_and_pack(tokenizer, train_docs, seq_len)
        evaluation = _tokenize_and_pack(tokenizer, eval_docs, seq_len)
        _write_cache(cache_path, train, evaluation)
        log(f"data: tokenised and packed; cached in {cache_path}")
    else:
        train, evaluation = cached
        log(f"data: loaded packed arrays from {cache_path}")
    if len(train["inputs"]) == 0:
        raise DataError(f"training corpus '{data_cfg.train}' gives no rows of seq_len {seq_len}.")

    stats = _stats(train_docs, eval_docs, train, evaluation, tokenizer, seq_len, cached is not None)
    log("data: " + ", ".join(f"{key}={value}" for key, value in stats.items()))
    return ClmData(train=train, eval=evaluation, tokenizer=tokenizer, stats=stats)


def _train_and_eval_documents(data_cfg, max_chars):
    """Returns the training and evaluation documents for the config."""
    record_format = formats.from_config(data_cfg)
    train_docs = _text_documents(data_cfg.train, max_chars, record_format)
    eval_spec = getattr(data_cfg, "eval", "") or ""
    if eval_spec:
        return train_docs, _text_documents(eval_spec, max_chars, record_format)
    return split_every_kth(train_docs, float(getattr(data_cfg, "eval_fraction", 0.02)), data_cfg.train)


def _text_documents(spec, max_chars, record_format=formats.TRL):
    """Documents of a `text` source: text files/folders, JSONL(.gz), Parquet or Arrow with a `text` column (or
    the one `data.columns.text` names), `tfds:NAME[:split]`, or `builtin:stdlib`."""
    records = read_records(spec, "text", record_format=record_format)
    return truncate_documents([record["text"] for record in records], max_chars)


def split_every_kth(documents, eval_fraction: float, corpus_name: str = "corpus"):
    """Splits documents into (train, eval): every k-th one, k = round(1 / eval_fraction), is eval.

    Spreading eval over the whole corpus keeps it representative when the
    corpus is ordered by topic; at least one document goes to eval.
    """
    if not 0 < eval_fraction <= 0.5:
        raise DataError(
            f"eval_fraction must be in (0, 0.5] to hold out eval documents from "
            f"'{corpus_name}', got {eval_fraction}; or set a separate eval corpus."
        )
    if len(documents) < 2:
        raise DataError(
            f"corpus '{corpus_name}' has {len(documents)} document(s), too few to hold out "
            f"an eval set; add text or set a separate eval corpus."
        )
    k = max(2, round(1 / eval_fraction))
    is_eval = np.zeros(len(documents), dtype=bool)
    is_eval[k - 1::k] = True
    if not is_eval.any():
        is_eval[-1] = True
    train = [doc for doc, held_out in zip(documents, is_eval) if not held_out]
    evaluation = [doc for doc, held_out in zip(documents, is_eval) if held_out]
    return train, evaluation


def _get_tokenizer(data_cfg, workdir, train_docs, log):
    """Loads the configured tokenizer, or the work folder's, training it if needed."""
    configured = getattr(data_cfg, "tokenizer", "") or ""
    if configured:
        log(f"data: using tokenizer {configured}")
        return load_tokenizer(configured)
    model_path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(model_path):
        log(f"data: using tokenizer {model_path}")
        return Tokenizer.load(model_path)
    log(f"data: training a {data_cfg.vocab_size}-piece tokenizer into {model_path}")
    return Tokenizer.train(train_docs, model_path, int(data_cfg.vocab_size))


def _cache_key(train_docs, eval_docs, tokenizer, seq_len):
    """Returns a hash of everything the packed arrays depend on."""
    digest = hashlib.sha256()
    settings = {"format": CACHE_FORMAT_VERSION, "seq_len": seq_len}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    with open(tokenizer.model_path, "rb") as model_file:
        digest.update(hashlib.sha256(model_file.read()).digest())
    for name, documents in (("train", train_docs), ("eval", eval_docs)):
        digest.update(f"{name}:{len(documents)}".encode())
        for document in documents:
            # Length-prefixed so document boundaries are part of the hash.
            data = document.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _tokenize_and_pack(tokenizer, documents, seq_len):
    """Tokenises documents and packs them into rows."""
    token_docs = tokenizer.encode_batch(documents)
    return pack_documents(
        token_docs, seq_len,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
    )


def _read_cache(cache_path, log):
    """Returns (train, eval) arrays from the cache, or None if absent or unreadable."""
    if not os.path.exists(cache_path):
        return None
    try:
        with np.load(cache_path) as cache:
            train = {key: cache[f"train_{key}"] for key in PACKED_KEYS}
            evaluation = {key: cache[f"eval_{key}"] for key in PACKED_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        # A damaged cache only costs a re-tokenisation; it is rewritten below.
        log(f"data: ignoring unreadable cache {cache_path} ({error})")
        return None
    return train, evaluation


def _write_cache(cache_path, train, evaluation):
    """Saves the packed arrays atomically, so a crash never leaves half a cache."""
    arrays = {f"train_{key}": value for key, value in train.items()}
    arrays.update({f"eval_{key}": value for key, value in evaluation.items()})
    write_atomically(cache_path, lambda cache_file: np.savez(cache_file, **arrays))


def _stats(train_docs, eval_docs, train, evaluation, tokenizer, seq_len, cache_hit):
    """Returns counts that describe the datasets (all plain Python numbers)."""
    return {
        "train_documents": len(train_docs),
        "eval_documents": len(eval_docs),
        "train_chars": sum(len(doc) for doc in train_docs),
        "train_tokens": int(train["loss_mask"].sum()),
        "eval_tokens": int(evaluation["loss_mask"].sum()),
        "train_rows": len(train["inputs"]),
        "eval_rows": len(evaluation["inputs"]),
        "train_fill": round(float(train["loss_mask"].mean()), 4) if len(train["inputs"]) else 0.0,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "cache_hit": cache_hit,
    }

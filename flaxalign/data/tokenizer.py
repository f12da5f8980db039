"""Tokenizers behind one small interface: SentencePiece models and HF tokenizer.json files.

Both classes have `encode(text)` (no bos/eos added), `encode_batch(texts)`,
`decode(ids)`, `token_to_id(token)`, `vocab_size`, `model_path` and the
special ids `pad_id`, `eos_id`, `bos_id`, `unk_id`.  `load_tokenizer(path)`
picks the class from the path.

`Tokenizer` wraps a SentencePiece model trained in-process (or loaded).
Settings that matter (see `Tokenizer.train`):

* ids: pad=0, unk=1, bos=2, eos=3; pad differs from eos so padding is never
  mistaken for an end of document;
* byte fallback, identity normalisation, no dummy prefix and no whitespace
  clean-up, so `decode(encode(text)) == text` for any text (the one exception
  is SentencePiece's own space marker U+2581, which decodes as a space);
* deterministic training: one thread, input in order, no sampling;
* `user_defined_symbols` (e.g. the chat tokens "<|im_start|>", "<|im_end|>")
  are single pieces, also when they appear inside text.

`HFTokenizer` (`flaxalign.data.hf_tokenizer`, re-exported here) wraps a Hugging
Face `tokenizer.json` (the format Llama-3, Qwen2 and SmolLM ship); a `.gguf`
file's tokenizer is `flaxalign.data.gguf_tokenizer.GGUFTokenizer`, an
`HFTokenizer` built from the file's metadata.
"""

import io
import os
import re
from typing import Protocol

import sentencepiece as spm

from flaxalign.data.atomic import write_atomically
from flaxalign.data.hf_tokenizer import HFTokenizer  # also re-exported: flaxalign.data.tokenizer.HFTokenizer
from flaxalign.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Byte fallback needs the 256 byte pieces plus the four special ids.
MIN_VOCAB_SIZE = 256 + 4

# Caps that keep training memory bounded on big corpora.  Lines over
# MAX_LINE_BYTES are skipped by SentencePiece (they are rare in prose).
MAX_TRAINING_LINES = 2_000_000
MAX_LINE_BYTES = 1 << 16

# More threads than this give no speed-up on batched encoding.
MAX_ENCODE_THREADS = 16


class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (`Tokenizer`, `HFTokenizer`).

    Read-only: model_path (str), vocab_size, pad_id, eos_id (int), bos_id and
    unk_id (int, or None for HF tokenizers that have none).
    """

    @property
    def model_path(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def unk_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    def decode_batch(self, rows) -> list[str]: ...

    def token_to_id(self, token: str) -> int | None: ...


def load_tokenizer(path: str, **special_tokens) -> "Tokenizer | HFTokenizer":
    """Loads a SentencePiece `.model` file, a `tokenizer.json`, a folder with a tokenizer.json, or a llama.cpp
    `.gguf` file (the tokenizer in its metadata, `flaxalign.data.gguf_tokenizer.GGUFTokenizer`).

    `special_tokens` (bos_token=..., eos_token=..., pad_token=..., unk_token=...)
    are passed to `HFTokenizer`; SentencePiece models and GGUF files carry their own ids.
    """
    if os.path.isdir(path):
        json_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(json_path):
            raise DataError(f"tokenizer folder '{path}' has no tokenizer.json file.")
        return HFTokenizer(json_path, **special_tokens)
    if not os.path.exists(path):
        raise DataError(f"tokenizer '{path}' does not exist.")
    if path.endswith(".model"):
        return Tokenizer.load(path)
    if path.endswith(".json"):
        return HFTokenizer(path, **special_tokens)
    if path.endswith(".gguf"):
        # imported here: the gguf package is needed only for GGUF files
        from flaxalign.data.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    raise DataError(
        f"tokenizer '{path}' is neither a SentencePiece .model file, "
        "a tokenizer.json file, a .gguf file nor a folder holding a tokenizer.json."
    )


class Tokenizer:
    """Wraps a SentencePiece model file; create with `train` or `load`."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: str):
        self._processor = processor
        self._model_path = model_path

    @classmethod
    def train(
        cls,
        documents,
        model_path: str,
        vocab_size: int,
        model_type: str = "bpe",
        user_defined_symbols=(),
    ) -> "Tokenizer":
        """Trains a model on the documents' non-blank lines and saves it.

        The model file is written atomically, so a crash never leaves a
        half-written `model_path`.  The same documents and settings always
        give the same model bytes.
        """
        if vocab_size < MIN_VOCAB_SIZE + len(user_defined_symbols):
            raise DataError(
                f"vocab_size {vocab_size} is too small for tokenizer '{model_path}': "
                f"byte fallback needs at least {MIN_VOCAB_SIZE + len(user_defined_symbols)}."
            )
        model_bytes = _train_model_bytes(
            documents, model_path, vocab_size, model_type, list(user_defined_symbols)
        )
        write_atomically(model_path, lambda model_file: model_file.write(model_bytes))
        return cls(_processor_from_bytes(model_bytes, model_path), model_path)

    @classmethod
    def load(cls, model_path: str) -> "Tokenizer":
        """Loads a model file written by `train` (or any SentencePiece model)."""
        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer model '{model_path}' does not exist.")
        with open(model_path, "rb") as handle:
            model_bytes = handle.read()
        processor = _processor_from_bytes(model_bytes, model_path)
        # Models trained elsewhere (e.g. Llama-2's) may have pad_id=-1, which
        # would silently index outside the embedding table.
        if processor.eos_id() < 0 or processor.pad_id() < 0 or processor.pad_id() == processor.eos_id():
            raise DataError(
                f"tokenizer model '{model_path}' needs an EOS id and a different pad id "
                f"(it has eos_id={processor.eos_id()}, pad_id={processor.pad_id()}); "
                "train one with flaxalign or use a tokenizer.json."
            )
        return cls(processor, model_path)

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of text, without bos or eos."""
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts) -> list[list[int]]:
        """Encodes many texts at once, in parallel threads."""
        num_threads = min(os.cpu_count() or 1, MAX_ENCODE_THREADS)
        return self._processor.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids) -> str:
        """Returns the text of token ids (numpy arrays are accepted).

        Control pieces (pad, bos, eos) decode to nothing; user-defined symbols
        such as "<|im_end|>" decode to their text.
        """
        return self._processor.decode([int(token) for token in ids])

    def decode_batch(self, rows) -> list[str]:
        """`decode` of each row (lists of ints) in one call into SentencePiece, without a Python loop per token."""
        rows = [list(row) for row in rows]
        return self._processor.decode(rows) if rows else []  # SentencePiece decodes an empty batch to ""

    def token_to_id(self, token: str) -> int | None:
        """Returns the id of a piece (e.g. "<|im_start|>", "</s>"), or None if there is none."""
        token_id = self._processor.piece_to_id(token)
        # SentencePiece maps unknown pieces to the unk id instead of failing.
        if token_id == self._processor.unk_id() and token != self._processor.id_to_piece(token_id):
            return None
        return token_id


def _train_model_bytes(documents, model_path, vocab_size, model_type, user_defined_symbols):
    """Runs SentencePiece training in memory and returns the model bytes."""
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=user_defined_symbols,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            byte_fallback=True,
            # Exact round trips: no normalisation, no added or removed spaces;
            # runs of spaces may become pieces (code indentation).
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_LINE_BYTES,
            input_sentence_size=MAX_TRAINING_LINES,
            shuffle_input_sentence=False,
            train_extremely_large_corpus=False,
            # One thread keeps the result independent of thread scheduling;
            # BPE training is fast anyway (well under a second for 2 MB).
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise DataError(_training_error_sentence(str(error), model_path, vocab_size)) from None
    return writer.getvalue()


def _training_error_sentence(message, model_path, vocab_size):
    """Rewrites a SentencePiece training error as one sentence about our settings."""
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        # SentencePiece suggests --character_coverage, which we do not expose.
        return (
            f"vocab_size {vocab_size} is too small for tokenizer '{model_path}': this corpus "
            f"needs at least {needed.group(1)} (byte pieces, special ids and its common characters)."
        )
    detail = message.split("] ", 1)[-1].strip()
    return (
        f"cannot train tokenizer '{model_path}' with vocab_size {vocab_size}: "
        f"SentencePiece says \"{detail}\""
    )


def _training_lines(documents):
    """Yields the non-blank lines of the documents, at most MAX_TRAINING_LINES."""
    count = 0
    for document in documents:
        for line in document.split("\n"):
            if not line.strip():
                continue
            if count == MAX_TRAINING_LINES:
                return
            count += 1
            yield line


def _processor_from_bytes(model_bytes, model_path):
    """Returns a SentencePieceProcessor, or a DataError for a bad file."""
    processor = spm.SentencePieceProcessor()
    try:
        processor.load_from_serialized_proto(model_bytes)
    except (RuntimeError, OSError):
        raise DataError(
            f"tokenizer model '{model_path}' is not a valid SentencePiece model file."
        ) from None
    return processor

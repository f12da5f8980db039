"""The tokenizer in a llama.cpp GGUF file's metadata (`GGUFTokenizer`, `load_gguf_tokenizer`), and the small GGUF
file readers it shares with `flaxalign.interop.gguf` (`open_reader`, `metadata_value`, `tensor_shape`).

Tokenizers built: byte-level BPE (`tokenizer.ggml.model` "gpt2", the pre-tokenizer `tokenizer.ggml.pre` names:
`PRE_TOKENIZERS`), and SentencePiece BPE ("llama") for gemma2 / gemma3 files only (`_build_sentencepiece`).
`flaxalign.data.load_tokenizer(path)` reads a `.gguf` path here; `flaxalign.interop.gguf.load_gguf` attaches the
tokenizer to the model it loads.
"""

import dataclasses
import functools
import os
from typing import Any

import gguf
import tokenizers

from flaxalign import errors
from flaxalign.data.hf_tokenizer import HFTokenizer

# ---------------------------------------------------------------------------------------------------------------
# Files


def open_reader(path: str):
    """The `gguf.GGUFReader` of a file (memory-mapped), or `CheckpointError` naming the file. The last two readers
    are kept (by path, size and modification time): parsing the metadata of a 262k-token vocabulary takes seconds,
    and loading a model reads it for its config, weights and tokenizer."""
    if not os.path.isfile(path):
        raise errors.CheckpointError(f"GGUF file {path!r} does not exist{_fetch_hint(path)}.")
    stat = os.stat(path)
    return _open_cached(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, path)


@functools.lru_cache(maxsize=2)
def _open_cached(real_path: str, size: int, mtime_ns: int, path: str):
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise errors.CheckpointError(f"GGUF file {path!r} is truncated or not a GGUF file ({e}).") from e
    if reader.byte_order != "I":
        raise errors.CheckpointError(f"GGUF file {path!r} is big-endian; flaxalign reads little-endian GGUF files.")
    size = reader.data.size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise errors.CheckpointError(
                f"GGUF file {path!r} is truncated: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, but the file has {size} bytes.")
    return reader


MISSING = object()


def metadata_value(reader, key: str, default: Any = MISSING) -> Any:
    """The value of a metadata key (strings, numbers, lists); `default` when absent, else `CheckpointError`."""
    field = reader.get_field(key)
    if field is None:
        if default is MISSING:
            raise errors.CheckpointError(
                f"GGUF file {reader.data.filename!r} has no metadata key {key!r}, which flaxalign needs.")
        return default
    return field.contents()


def _fetch_hint(path: str) -> str:
    """For a missing file where presets look for fetched weights: how to fetch it and where they look."""
    from flaxalign import config_blocks

    models = os.path.realpath(config_blocks.models_dir())
    if not os.path.realpath(path).startswith(models + os.sep):
        return ""
    scripts = {config_blocks.SMOLLM2_FILE: "launch/fetch_smollm2.sh",
               config_blocks.GEMMA3_FILE: "launch/fetch_gemma3.sh"}
    script = next((script for file, script in scripts.items() if path.endswith(file)), None)
    fetch = f" ({script} fetches it" if script else " (fetch it first"
    return f"{fetch}; presets read fetched weights from ${config_blocks.MODELS_ENV}, now {models})"


def tensor_shape(tensor) -> tuple[int, ...]:
    """numpy shape (rows first) of a GGUF tensor; GGUF lists dims innermost first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE; SentencePiece BPE (Gemma 2 / 3 files only, see below)
# whose "llama" (SentencePiece) vocabularies are built: Gemma's (no prefix space, merges implied by the vocabulary)
SENTENCEPIECE_ARCHITECTURES = ("gemma2", "gemma3")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> how text is split before BPE, as llama.cpp's llama-vocab.cpp does for that type:
# "gpt2": GPT-2's regex (the ByteLevel pre-tokenizer's own); "digits+gpt2": every digit on its own first, then
# GPT-2's regex (what SmolLM's tokenizer.json spells Digits(individual_digits) + ByteLevel); else a Split regex.
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2", "command-r": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map (`bytes_to_unicode`): byte-level BPE vocabularies spell every byte
    as one of these 256 characters (a space is "Ġ")."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _pre_tokenizer(pre: str, path: str):
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise errors.DataError(f"GGUF file {path!r} has tokenizer.ggml.pre {pre!r}; flaxalign knows "
                               f"{sorted(PRE_TOKENIZERS)}.")
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        return byte_level
    if kind == "digits+gpt2":
        return tokenizers.pre_tokenizers.Sequence(
            [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level])
    return tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(kind), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclasses.dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[tuple[str, str]]
    special: dict[str, int | None]  # bos/eos/unk/pad ids
    pre: str
    chat_template: str | None
    model: str = "gpt2"  # tokenizer.ggml.model
    add_bos: bool = False  # tokenizer.ggml.add_bos_token, read for SentencePiece vocabularies


def _read_vocab(reader, path: str) -> _Vocab:
    model = metadata_value(reader, "tokenizer.ggml.model", None)
    if model is None:
        raise errors.DataError(f"GGUF file {path!r} has no tokenizer metadata (tokenizer.ggml.model).")
    if model not in TOKENIZER_MODELS:
        raise errors.DataError(f"GGUF file {path!r} has a {model!r} tokenizer; flaxalign builds "
                               f"{list(TOKENIZER_MODELS)} (byte-level BPE) tokenizers from GGUF metadata.")
    if model == "llama":
        arch = metadata_value(reader, "general.architecture", None)
        if arch not in SENTENCEPIECE_ARCHITECTURES:
            raise errors.DataError(f"GGUF file {path!r} has a SentencePiece ('llama') tokenizer for architecture "
                                   f"{arch!r}; flaxalign builds those for {list(SENTENCEPIECE_ARCHITECTURES)} only.")
    tokens = metadata_value(reader, "tokenizer.ggml.tokens")
    merges = []
    for merge in metadata_value(reader, "tokenizer.ggml.merges", []):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise errors.DataError(f"GGUF file {path!r} has a malformed BPE merge {merge!r}.")
        merges.append((parts[0], parts[1]))
    types = metadata_value(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
    special = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        special[name] = metadata_value(reader, f"tokenizer.ggml.{key}", None)
        if special[name] is not None and not 0 <= special[name] < len(tokens):
            raise errors.DataError(f"GGUF file {path!r} has tokenizer.ggml.{key}={special[name]}, which is not "
                                   f"a token id (the vocabulary has {len(tokens)}).")
    return _Vocab(tokens=tokens, types=types, merges=merges, special=special,
                  pre=metadata_value(reader, "tokenizer.ggml.pre", "default"),
                  chat_template=metadata_value(reader, "tokenizer.chat_template", None), model=model,
                  # llama.cpp (and transformers) add BOS to a SentencePiece vocabulary that does not say otherwise
                  add_bos=model == "llama" and bool(metadata_value(reader, "tokenizer.ggml.add_bos_token", True)))


def _sentencepiece_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """The BPE merges a Gemma vocabulary implies (its GGUF file lists none), as transformers' GGUF reader derives
    them (`generate_merges` with each token's position as its score, Gemma's scores not following merge order): every
    split of a token into two tokens, the token earliest in the file first, ties by the lengths of the halves."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, index in vocab.items():
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, -index) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable, as transformers' sort
    return [(left, right) for left, right, _ in merges]


def _build_sentencepiece(vocab: _Vocab) -> tokenizers.Tokenizer:
    """Gemma's tokenizer from a GGUF vocabulary, as transformers' GGUF reader builds it (`GemmaTokenizer`): BPE with
    byte fallback (the <0xNN> tokens) over merges derived from the vocabulary (`_sentencepiece_merges`), spaces
    written "▁" (no prefix space), whitespace-only tokens with a space respelled as that many "▁" (the file stores
    "  " where the model spells "▁▁"); control tokens (type 3) special and user-defined ones (type 4) plain added
    tokens, both matched whole in text."""
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in vocab.tokens]
    ids = {token: index for index, token in enumerate(tokens)}
    unk = tokens[vocab.special["unk"]] if vocab.special["unk"] is not None else "<unk>"
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=ids, merges=_sentencepiece_merges(tokens), dropout=None, fuse_unk=True, unk_token=unk,
        byte_fallback=True))
    tokenizer.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, vocab.types) if kind == CONTROL])
    tokenizer.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, vocab.types) if kind == USER_DEFINED])
    if vocab.add_bos and vocab.special["bos"] is not None:
        # flaxalign's encode adds no special tokens; an HF export's tokenizer.json then adds <bos> in transformers,
        # as Gemma's own tokenizer and transformers' GGUF one do
        bos = tokens[vocab.special["bos"]]
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab.special["bos"])])
    return tokenizer


def _build_tokenizer(vocab: _Vocab, path: str) -> tokenizers.Tokenizer:
    """Byte-level BPE over the file's vocabulary and merges, the pre-tokenizer its `pre` names, control tokens
    (type 3) as special tokens and user-defined ones (type 4) as plain added tokens, both matched whole in text.

    As in transformers' GGUF reader, a token spelled outside the byte alphabet is respelled byte by byte (it could
    never be produced otherwise), and a control token spelled outside it is not added (llama.cpp mislabels some).
    A SentencePiece ("llama") vocabulary is built by `_build_sentencepiece`."""
    if vocab.model == "llama":
        return _build_sentencepiece(vocab)
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    ids = {}
    for index, token in enumerate(vocab.tokens):
        key = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        ids.setdefault(key, index)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=ids, merges=vocab.merges, dropout=None,
                                                           continuing_subword_prefix="", end_of_word_suffix="",
                                                           fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(vocab.pre, path)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    added = [(token, kind) for token, kind in zip(vocab.tokens, vocab.types)
             if kind in (CONTROL, USER_DEFINED) and set(token) <= alphabet]
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t, kind in added if kind == CONTROL])
    tokenizer.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                          for t, kind in added if kind == USER_DEFINED])
    return tokenizer


class GGUFTokenizer(HFTokenizer):
    """The tokenizer stored in a GGUF file's metadata, with `HFTokenizer`'s interface (`flaxalign.data`'s
    `TextTokenizer` protocol): `encode` adds no bos/eos and turns special-token text into its id, `decode` keeps
    special tokens.

    `model_path` is the .gguf path, so `load_tokenizer(model_path)` builds it again. Special ids are the file's
    bos/eos/unk/padding ids. A pad that is missing or equal to EOS becomes EOS when the file's embedding has no spare
    row (the usual case: a pretrained vocabulary cannot grow, and flaxalign marks padding with masks), else (an
    embedding with spare rows, or a vocabulary-only file) a new "<|pad|>" token, as `HFTokenizer` does.
    `chat_template` is the file's Jinja chat template (None when absent); `chat_template_name` is the flaxalign
    template (`flaxalign.data.chat`) it writes, "chatml", "llama3" or "gemma", or None when it is none of them.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, model_path: str, *, bos_id: int | None, eos_id: int | None,
                 unk_id: int | None, pad_id: int | None, embedding_rows: int | None = None,
                 chat_template: str | None = None):
        # HFTokenizer.__init__ reads a tokenizer.json file; this sets the same state from memory.
        self._model_path = model_path
        self._tokenizer = tokenizer
        if eos_id is None:
            raise errors.DataError(f"GGUF file {model_path!r} has no tokenizer.ggml.eos_token_id.")
        self._eos_id, self._bos_id, self._unk_id, self._pad_id = eos_id, bos_id, unk_id, pad_id
        if pad_id is None or pad_id == eos_id:
            size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
            self._pad_id = self._add_pad_token() if embedding_rows is None or embedding_rows > size else eos_id
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self._chat_template = chat_template

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def chat_template_name(self) -> str | None:
        from flaxalign.data.chat import TEMPLATE_TOKENS

        for name in ("chatml", "llama3", "gemma"):
            needed = TEMPLATE_TOKENS[name]
            if self._chat_template and needed[-1] in self._chat_template and \
                    all(self.token_to_id(t) is not None for t in needed):
                return name
        return None


def tokenizer_of(reader, path: str) -> GGUFTokenizer:
    """The tokenizer of an open GGUF file (`open_reader`), as `load_gguf_tokenizer` builds it."""
    vocab = _read_vocab(reader, path)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    return GGUFTokenizer(
        _build_tokenizer(vocab, path), path, bos_id=vocab.special["bos"], eos_id=vocab.special["eos"],
        unk_id=vocab.special["unk"], pad_id=vocab.special["pad"],
        embedding_rows=tensor_shape(embedding)[0] if embedding is not None else None,
        chat_template=vocab.chat_template)


def load_gguf_tokenizer(path: str) -> GGUFTokenizer:
    """The tokenizer in a GGUF file's metadata (see `GGUFTokenizer`). Raises `DataError` for a file without
    tokenizer metadata or with an unsupported tokenizer, `CheckpointError` for a missing or unreadable file."""
    return tokenizer_of(open_reader(path), path)

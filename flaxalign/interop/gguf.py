"""llama.cpp GGUF files → flaxalign: weights (dequantised to float32), model config and tokenizer.

`load_gguf(path)` reads a GGUF file of the `llama` architecture (Llama 1/2/3 without rope scaling, SmolLM,
TinyLlama, ...) into the same `hf.Pretrained` that `hf.load_pretrained` returns for an HF directory;
`flaxalign.interop.load_pretrained(path)` dispatches here for a path ending in `.gguf`, and
`flaxalign.data.load_tokenizer(path)` builds the tokenizer from the file's metadata.

How: the file is parsed with the `gguf` package (`GGUFReader`, memory-mapped). Each GGUF tensor is renamed to its HF
name (`GGUF_TO_HF` below), dequantised by the package (`gguf.quants.dequantize`, ggml's block decoders in NumPy),
and its q/k rows are put back into HF order (`unpermute_rope_rows`); that lazy HF-named mapping then goes through
hf.py's own checks and placement (`hf.check_tensors`, `hf.place_params`), so with a `mesh` every param is created
directly in its sharding, tensor by tensor (each tensor is dequantised whole: blocks do not follow shard bounds).

Tensor types: every type `gguf.quants.dequantize` decodes (`supported_types()`: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, the k-quants Q2_K..Q6_K, the IQ* and TQ* types, MXFP4, NVFP4 with gguf 0.19); others (F64, integer
types) raise `CheckpointError` naming the tensor and its type. Quantised weights are dequantised exactly: the model
computes with them in float32 (no re-quantisation error, but the quantisation error of the file stays).

Config keys: `llama.embedding_length`, `block_count`, `feed_forward_length`, `context_length`,
`attention.head_count`, `attention.head_count_kv`, `attention.key_length` (head_dim), `rope.freq_base`,
`attention.layer_norm_rms_epsilon`; vocab size = the length of `tokenizer.ggml.tokens` (else `llama.vocab_size`, else
the embedding rows); embeddings are tied when there is no `output.weight`; q/k/v biases when `blk.0.attn_q.bias`
exists. Not supported (`ConfigError`): other architectures, rope scaling (`llama.rope.scaling.type`, Llama-3.1's
`rope_freqs.weight`), partial rotary (`rope.dimension_count` != head_dim), mixture of experts, per-layer head counts.

Tokenizer: byte-level BPE (`tokenizer.ggml.model` "gpt2") only; see `GGUFTokenizer`.
"""

import dataclasses
import functools
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import jax
import numpy as np
import tokenizers

from flaxalign import errors
from flaxalign.data.tokenizer import HFTokenizer
from flaxalign.interop import hf
from flaxalign.models.config import ModelConfig

_LOG = logging.getLogger(__name__)

ARCHITECTURES = ("llama",)

# GGUF tensor name -> HF name; `{i}` is the layer index (`blk.{i}.` in GGUF, `model.layers.{i}.` in HF).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a llama GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"), or
    None for a tensor flaxalign's Llama has no place for."""
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match:
        pattern = GGUF_TO_HF.get(f"blk.{{i}}.{match.group(2)}")
        if pattern:
            return pattern.format(i=int(match.group(1)))
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of an HF tensor name of a Llama (the inverse of `hf_tensor_name`)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    key = f"model.layers.{{i}}.{match.group(2)}" if match else hf_name
    name = _HF_TO_GGUF[key]
    return name.format(i=int(match.group(1))) if match else name


_HF_TO_GGUF = {hf_name: gguf_name for gguf_name, hf_name in GGUF_TO_HF.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tensor types: decoded by the gguf package


@functools.cache
def supported_types() -> tuple[str, ...]:
    """The ggml type names ("Q4_K", ...) that the installed gguf package's `gguf.quants.dequantize` decodes, in
    ggml's type order. The package lists no such set publicly, so each type is tried on one block of zero bytes
    (about 5 ms, once); the types it has no decoder for raise NotImplementedError there."""
    names = []
    for qtype in gguf.GGMLQuantizationType:
        if qtype not in gguf.GGML_QUANT_SIZES:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            continue
        names.append(qtype.name)
    return tuple(names)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array of `shape` (numpy order: rows first) stored as ggml type `type_name` ("Q4_1", ...) in
    `raw` (the tensor's bytes, any shape), decoded by `gguf.quants.dequantize` a row at a time. Raises ValueError
    for a type the package cannot decode and for bytes that do not hold `shape` in that type (one line each)."""
    if type_name not in supported_types():
        raise ValueError(f"ggml type {type_name} is not supported; flaxalign reads {list(supported_types())}")
    qtype = gguf.GGMLQuantizationType[type_name]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_values:
        raise ValueError(f"shape {shape} does not have rows of whole {block_values}-value {type_name} blocks")
    row_bytes = shape[-1] // block_values * block_bytes
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size != math.prod(shape[:-1]) * row_bytes:
        raise ValueError(f"{raw.size} bytes do not hold shape {shape} as {type_name} ({row_bytes} bytes a row)")
    values = gguf.quants.dequantize(raw.reshape(-1, row_bytes), qtype).reshape(shape)
    # F32 comes back as a view of the (read-only, memory-mapped) bytes: the caller gets an array of its own
    return values.astype(np.float32, copy=not values.flags.writeable)


# ---------------------------------------------------------------------------------------------------------------
# RoPE row order


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k projection rows (`LlamaModel.permute` in convert_hf_to_gguf.py).

    HF rotates pairs (j, j + head_dim/2) of each head (rotate_half); llama.cpp rotates neighbours (2j, 2j + 1). The
    converter therefore interleaves the two halves of every head's rows: row h·Dh + s·Dh/2 + j -> h·Dh + 2j + s.
    `w` is [n_heads · Dh, ...] (a weight [out, in] or a bias [out])."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_rope_rows`: GGUF q/k rows back into HF (rotate_half) order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# Files


def _open(path: str):
    """The `gguf.GGUFReader` of a file (memory-mapped), or `CheckpointError` naming the file."""
    if not os.path.isfile(path):
        raise errors.CheckpointError(f"GGUF file {path!r} does not exist{_fetch_hint(path)}.")
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


_MISSING = object()


def _value(reader, key: str, default: Any = _MISSING) -> Any:
    """The value of a metadata key (strings, numbers, lists); `default` when absent, else `CheckpointError`."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
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
    fetch = " (launch/fetch_smollm2.sh fetches it" if path.endswith(config_blocks.SMOLLM2_FILE) else " (fetch it first"
    return f"{fetch}; presets read fetched weights from ${config_blocks.MODELS_ENV}, now {models})"


def _scalar(value: Any, key: str) -> Any:
    if isinstance(value, list):
        raise errors.ConfigError(f"GGUF key {key!r} varies per layer ({value[:4]}...); flaxalign needs one value.")
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _shape(tensor) -> tuple[int, ...]:
    """numpy shape (rows first) of a GGUF tensor; GGUF lists dims innermost first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _config(reader, path: str, dtype: str) -> ModelConfig:
    arch = _value(reader, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise errors.ConfigError(
            f"GGUF file {path!r} has architecture {arch!r}; flaxalign loads {list(ARCHITECTURES)} GGUF files.")
    names = {t.name for t in reader.tensors}

    def key(name: str, default: Any = _MISSING) -> Any:
        return _scalar(_value(reader, f"{arch}.{name}", default), f"{arch}.{name}")

    if key("expert_count", 0):
        raise errors.ConfigError(f"GGUF file {path!r} is a mixture of experts; flaxalign's Llama has dense MLPs.")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise errors.ConfigError(f"GGUF file {path!r} uses rope scaling ({scaling}, rope_freqs); flaxalign reads "
                                 "GGUF files without it (use the HF directory for Llama 3.1 style scaling).")
    d_model = key("embedding_length")
    n_heads = key("attention.head_count")
    head_dim = key("attention.key_length", d_model // n_heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise errors.ConfigError(f"GGUF file {path!r} has different key and value head sizes.")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise errors.ConfigError(f"GGUF file {path!r} rotates {key('rope.dimension_count')} of {head_dim} head "
                                 "dims; flaxalign rotates the whole head.")
    if _value(reader, f"{arch}.attention.sliding_window_pattern", None) is not None:
        raise errors.ConfigError(f"GGUF file {path!r} alternates windowed and full attention layers "
                                 "(attention.sliding_window_pattern); flaxalign reads GGUF windows on every layer.")
    tokens = _value(reader, "tokenizer.ggml.tokens", None)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = len(tokens) if tokens else key("vocab_size", _shape(embedding)[0] if embedding is not None else None)
    if vocab is None:
        raise errors.CheckpointError(f"GGUF file {path!r} has neither a token list nor token_embd.weight.")
    return ModelConfig(
        vocab_size=int(vocab), d_model=int(d_model), n_layers=int(key("block_count")), n_heads=int(n_heads),
        n_kv_heads=int(key("attention.head_count_kv", n_heads)), d_ff=int(key("feed_forward_length")),
        head_dim=int(head_dim), max_seq_len=int(key("context_length", ModelConfig.max_seq_len)),
        rope_theta=_f32(key("rope.freq_base", ModelConfig.rope_theta)),
        rms_eps=_f32(key("attention.layer_norm_rms_epsilon", ModelConfig.rms_eps)),
        qkv_bias="blk.0.attn_q.bias" in names, tie_embeddings="output.weight" not in names, dtype=dtype,
        sliding_window=int(key("attention.sliding_window", 0)),
    )


def read_model_config(path: str, *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata (no tensor data read)."""
    return _config(_open(path), path, dtype)


class _GGUFTensors(Mapping):
    """The tensors of a GGUF file under their HF names, as float32 numpy arrays in HF layout, decoded on access,
    with `shape(name)` and `read(name, index)` as `hf.check_tensors` / `hf.place_params` read a
    `safetensors_io.SafetensorsFiles` (a region is cut from the whole dequantised tensor)."""

    def __init__(self, reader, path: str, config: ModelConfig):
        self._path = path
        self._where: dict[str, Any] = {}
        self._heads: dict[str, int] = {}
        unknown = []
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is None:
                unknown.append(tensor.name)
                continue
            type_name = tensor.tensor_type.name
            if type_name not in supported_types():
                raise errors.CheckpointError(
                    f"GGUF tensor {tensor.name!r} of {path!r} has type {type_name}; flaxalign reads "
                    f"{list(supported_types())} (requantise the file, e.g. llama-quantize ... Q8_0).")
            self._where[name] = tensor
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                self._heads[name] = config.n_heads
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                self._heads[name] = config.n_kv_heads
        if unknown:
            raise errors.CheckpointError(f"GGUF file {path!r} has {len(unknown)} tensor(s) that flaxalign's Llama "
                                         f"has no place for, e.g. {unknown[:3]}.")

    def shape(self, name: str) -> tuple[int, ...]:
        return _shape(self._where[name])

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._where[name]
        try:
            value = dequantize(tensor.data, tensor.tensor_type.name, self.shape(name))
        except ValueError as e:
            raise errors.CheckpointError(f"GGUF tensor {tensor.name!r} of {self._path!r} is corrupt ({e}).") from e
        if name in self._heads:
            value = unpermute_rope_rows(value, self._heads[name])
        return value

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        value = self[name]
        return value if index is None else value[index]

    def __contains__(self, name: object) -> bool:  # Mapping's default would dequantise the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _check_present(config: ModelConfig, tensors: _GGUFTensors, path: str) -> None:
    """Every tensor the config needs is in the file with the right shape (in GGUF names; hf.py says it in HF's)."""
    expected = {spec.hf_name: spec.hf_shape for spec in hf.global_tensors(config)}
    for spec in hf.layer_tensors(config):
        expected.update({spec.hf_name.format(i=i): spec.hf_shape for i in range(config.n_layers)})
    for name, shape in expected.items():
        if name not in tensors:
            raise errors.CheckpointError(
                f"GGUF file {path!r} has no tensor {gguf_tensor_name(name)!r}, which its llama metadata needs.")
        if tensors.shape(name) != shape:
            raise errors.CheckpointError(
                f"GGUF tensor {gguf_tensor_name(name)!r} of {path!r} has shape {tensors.shape(name)} (rows first), "
                f"but its llama metadata needs {shape}.")


def load_gguf(path: str, *, dtype: str = "auto", mesh: jax.sharding.Mesh | None = None,
              quantizer=None) -> hf.Pretrained:
    """Loads a llama-architecture GGUF file: config, float32 params and tokenizer (None when the file has no
    tokenizer metadata or one of a kind other than byte-level BPE, with a logged notice for the latter).

    `dtype` is the compute dtype of the returned config ("auto", "float32", "bfloat16"). With `mesh`, every param
    is created directly in its sharding, decoded from the memory-mapped file, and a `quantizer` quantizes the layer
    weights as they are decoded (see `hf.load_pretrained`). Raises
    `CheckpointError` for a missing, truncated or corrupt file, an unsupported tensor type, and missing, misshapen
    or unknown tensors; `ConfigError` for other architectures and unsupported model features.
    """
    reader = _open(path)
    config = _config(reader, path, dtype)
    tensors = _GGUFTensors(reader, path, config)
    _check_present(config, tensors, path)
    hf.check_tensors(config, tensors)  # also refuses tensors left over (none, after the checks above)
    params = hf.place_params(config, tensors, mesh, quantizer=quantizer)
    tokenizer = None
    if reader.get_field("tokenizer.ggml.model") is not None:
        try:
            tokenizer = _tokenizer(reader, path)
        except errors.DataError as e:
            _LOG.warning("GGUF file %s: no tokenizer loaded: %s", path, e)
    return hf.Pretrained(config=config, params=params, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

TOKENIZER_MODELS = ("gpt2",)
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


def _byte_alphabet() -> dict[int, str]:
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


def _read_vocab(reader, path: str) -> _Vocab:
    model = _value(reader, "tokenizer.ggml.model", None)
    if model is None:
        raise errors.DataError(f"GGUF file {path!r} has no tokenizer metadata (tokenizer.ggml.model).")
    if model not in TOKENIZER_MODELS:
        raise errors.DataError(f"GGUF file {path!r} has a {model!r} tokenizer; flaxalign builds "
                               f"{list(TOKENIZER_MODELS)} (byte-level BPE) tokenizers from GGUF metadata.")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    merges = []
    for merge in _value(reader, "tokenizer.ggml.merges"):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise errors.DataError(f"GGUF file {path!r} has a malformed BPE merge {merge!r}.")
        merges.append((parts[0], parts[1]))
    types = _value(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
    special = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        special[name] = _value(reader, f"tokenizer.ggml.{key}", None)
        if special[name] is not None and not 0 <= special[name] < len(tokens):
            raise errors.DataError(f"GGUF file {path!r} has tokenizer.ggml.{key}={special[name]}, which is not "
                                   f"a token id (the vocabulary has {len(tokens)}).")
    return _Vocab(tokens=tokens, types=types, merges=merges, special=special,
                  pre=_value(reader, "tokenizer.ggml.pre", "default"),
                  chat_template=_value(reader, "tokenizer.chat_template", None))


def _build_tokenizer(vocab: _Vocab, path: str) -> tokenizers.Tokenizer:
    """Byte-level BPE over the file's vocabulary and merges, the pre-tokenizer its `pre` names, control tokens
    (type 3) as special tokens and user-defined ones (type 4) as plain added tokens, both matched whole in text.

    As in transformers' GGUF reader, a token spelled outside the byte alphabet is respelled byte by byte (it could
    never be produced otherwise), and a control token spelled outside it is not added (llama.cpp mislabels some)."""
    spelling = _byte_alphabet()
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


def _tokenizer(reader, path: str) -> GGUFTokenizer:
    vocab = _read_vocab(reader, path)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    return GGUFTokenizer(
        _build_tokenizer(vocab, path), path, bos_id=vocab.special["bos"], eos_id=vocab.special["eos"],
        unk_id=vocab.special["unk"], pad_id=vocab.special["pad"],
        embedding_rows=_shape(embedding)[0] if embedding is not None else None, chat_template=vocab.chat_template)


def load_gguf_tokenizer(path: str) -> GGUFTokenizer:
    """The tokenizer in a GGUF file's metadata (see `GGUFTokenizer`). Raises `DataError` for a file without
    tokenizer metadata or with an unsupported tokenizer, `CheckpointError` for a missing or unreadable file."""
    return _tokenizer(_open(path), path)

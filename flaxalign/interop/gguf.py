"""llama.cpp GGUF files → flaxalign: weights (dequantised to float32), model config and tokenizer.

`load_gguf(path)` reads a GGUF file of architecture (`general.architecture`) `llama` (Llama 1/2/3 without rope
scaling, SmolLM, TinyLlama, ...), `qwen2`, `qwen3` or `gemma3` (Gemma 3 text models) into the same `hf.Pretrained`
that `hf.load_pretrained` returns for an HF directory; `flaxalign.interop.load_pretrained(path)` dispatches here for
a path ending in `.gguf`, and `flaxalign.data.load_tokenizer(path)` builds the tokenizer from the file's metadata.
Another architecture stops with one line naming `general.architecture` and the supported values.

How: the file is parsed with the `gguf` package (`GGUFReader`, memory-mapped). Each GGUF tensor is renamed to its HF
name (`TENSOR_NAMES[arch]` below), dequantised by the package (`gguf.quants.dequantize`, ggml's block decoders in
NumPy), and, for `llama` files only, its q/k rows are put back into HF order (`unpermute_rope_rows`; llama.cpp
permutes no other architecture: Qwen2/3 and Gemma 3 rotate halves, as HF does); Gemma 3 files store every norm
weight as 1 + w (llama.cpp's convert adds 1), read back as w. That lazy HF-named mapping then goes through hf.py's own
checks and placement (`hf.check_tensors`, `hf.place_params`), so with a `mesh` every param is created directly in
its sharding, tensor by tensor (each tensor is dequantised whole: blocks do not follow shard bounds).

Tensor types: every type `gguf.quants.dequantize` decodes (`supported_types()`: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, the k-quants Q2_K..Q6_K, the IQ* and TQ* types, MXFP4, NVFP4 with gguf 0.19); others (F64, integer
types) raise `CheckpointError` naming the tensor and its type. Quantised weights are dequantised exactly: the model
computes with them in float32 (no re-quantisation error, but the quantisation error of the file stays).

Config keys (`{arch}.` prefix): `embedding_length`, `block_count`, `feed_forward_length`, `context_length`,
`attention.head_count`, `attention.head_count_kv`, `attention.key_length` (head_dim), `rope.freq_base`,
`attention.layer_norm_rms_epsilon`, `attention.sliding_window`; vocab size = the length of `tokenizer.ggml.tokens`
(else `vocab_size`, else the embedding rows); embeddings are tied when there is no `output.weight`; q/k/v biases when
`blk.0.attn_q.bias` exists, q/k norms when `blk.0.attn_q_norm.weight` does. Gemma 3 (`_gemma3_fields`): as llama.cpp
computes such a file, every 6th layer global, the others windowed, local RoPE base 10000, scores by 1/√head_dim.
Not supported (`ConfigError`): rope scaling (`rope.scaling.type`, Llama-3.1's `rope_freqs.weight`; so Gemma 3 4B+,
whose files state linear scaling), partial rotary (`rope.dimension_count` != head_dim), mixture of experts, per-layer
head counts, logit soft caps.

Tokenizer: byte-level BPE (`tokenizer.ggml.model` "gpt2"), and SentencePiece BPE ("llama") for gemma3 files only;
see `GGUFTokenizer`, `_build_sentencepiece`.
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

# `general.architecture` values read, and what each implies: llama.cpp permutes the q/k rows of "llama" files only
# (`LlamaModel.permute`; Qwen2/3 and Gemma 3 use NEOX RoPE, already HF's rotate_half order); Gemma 3 files store
# every norm weight as 1 + w (llama.cpp's convert adds 1; Gemma's RMSNorm multiplies by 1 + w).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
ROPE_PERMUTED = ("llama",)
NORMS_PLUS_ONE = ("gemma3",)

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
# Qwen3 and Gemma 3: a [head_dim] RMSNorm on every query / key head
_QK_NORMS = {
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Gemma 3's four layer norms (llama.cpp's names): ffn_norm is the pre-MLP norm there, not Llama's second norm
_GEMMA3_NORMS = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
TENSOR_NAMES = {  # general.architecture -> its GGUF -> HF table
    "llama": GGUF_TO_HF,
    "qwen2": GGUF_TO_HF,
    "qwen3": {**GGUF_TO_HF, **_QK_NORMS},
    "gemma3": {**GGUF_TO_HF, **_QK_NORMS, **_GEMMA3_NORMS},
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor of architecture `arch` ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"), or None for a tensor flaxalign's model has no place for."""
    table = TENSOR_NAMES[arch]
    if gguf_name in table:
        return table[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match:
        pattern = table.get(f"blk.{{i}}.{match.group(2)}")
        if pattern:
            return pattern.format(i=int(match.group(1)))
    return None


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """The GGUF name of an HF tensor name (the inverse of `hf_tensor_name`)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    key = f"model.layers.{{i}}.{match.group(2)}" if match else hf_name
    name = _HF_TO_GGUF[arch][key]
    return name.format(i=int(match.group(1))) if match else name


_HF_TO_GGUF = {arch: {hf_name: gguf_name for gguf_name, hf_name in table.items()}
               for arch, table in TENSOR_NAMES.items()}


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
    scripts = {config_blocks.SMOLLM2_FILE: "launch/fetch_smollm2.sh",
               config_blocks.GEMMA3_FILE: "launch/fetch_gemma3.sh"}
    script = next((script for file, script in scripts.items() if path.endswith(file)), None)
    fetch = f" ({script} fetches it" if script else " (fetch it first"
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
    arch = architecture(reader, path)
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
    n_layers = int(key("block_count"))
    family = {}
    if arch == "gemma3":
        family = _gemma3_fields(reader, path, n_layers, int(d_model), int(n_heads), int(head_dim))
    elif _value(reader, f"{arch}.attention.sliding_window_pattern", None) is not None:
        raise errors.ConfigError(f"GGUF file {path!r} alternates windowed and full attention layers "
                                 "(attention.sliding_window_pattern); flaxalign reads GGUF windows on every layer.")
    else:
        family = {"sliding_window": int(key("attention.sliding_window", 0)),
                  "qk_norm": arch == "qwen3" and "blk.0.attn_q_norm.weight" in names}
    tokens = _value(reader, "tokenizer.ggml.tokens", None)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = len(tokens) if tokens else key("vocab_size", _shape(embedding)[0] if embedding is not None else None)
    if vocab is None:
        raise errors.CheckpointError(f"GGUF file {path!r} has neither a token list nor token_embd.weight.")
    return ModelConfig(
        vocab_size=int(vocab), d_model=int(d_model), n_layers=n_layers, n_heads=int(n_heads),
        n_kv_heads=int(key("attention.head_count_kv", n_heads)), d_ff=int(key("feed_forward_length")),
        head_dim=int(head_dim), max_seq_len=int(key("context_length", ModelConfig.max_seq_len)),
        rope_theta=_f32(key("rope.freq_base", ModelConfig.rope_theta)),
        rms_eps=_f32(key("attention.layer_norm_rms_epsilon", ModelConfig.rms_eps)),
        qkv_bias="blk.0.attn_q.bias" in names, tie_embeddings="output.weight" not in names, dtype=dtype,
        **family,
    )


def architecture(reader, path: str) -> str:
    """The file's `general.architecture`, or a one-line `ConfigError` naming the field and the supported values."""
    arch = _value(reader, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise errors.ConfigError(f"GGUF file {path!r} has general.architecture={arch!r}; flaxalign reads "
                                 f"{', '.join(ARCHITECTURES)}.")
    return arch


GEMMA3_PATTERN = 6  # llama.cpp (`LLM_ARCH_GEMMA3`, set_swa_pattern(6)) and transformers: every 6th layer is global
GEMMA3_LOCAL_THETA = 10_000.0  # llama.cpp's rope_freq_base_train_swa and Gemma3TextConfig's rope_local_base_freq


def _gemma3_fields(reader, path: str, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """The Gemma 3 fields a gemma3 GGUF file implies, chosen as llama.cpp computes such a file: windows of
    `attention.sliding_window` tokens on every layer but each 6th (the pattern is fixed in llama.cpp; a scalar
    `attention.sliding_window_pattern` overrides it), RoPE base `rope.freq_base` on the global layers and 10000 on the
    windowed ones, scores scaled by 1/√head_dim (1/√(d_model / n_heads) for the 62-layer 27B, as llama.cpp does;
    transformers' GGUF reader leaves query_pre_attn_scalar at 256, the same for every size but the 27B).
    `ConfigError` for logit soft caps (Gemma 2 style), which a Gemma 3 file does not have."""
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if _value(reader, f"gemma3.{cap}", None) is not None:
            raise errors.ConfigError(f"GGUF file {path!r} has gemma3.{cap}; flaxalign's Gemma 3 has no soft caps.")
    pattern = _scalar(_value(reader, "gemma3.attention.sliding_window_pattern", GEMMA3_PATTERN),
                      "gemma3.attention.sliding_window_pattern")
    window = int(_scalar(_value(reader, "gemma3.attention.sliding_window", 0), "gemma3.attention.sliding_window"))
    full = tuple(i for i in range(n_layers) if (i + 1) % int(pattern) == 0)
    windows = {"sliding_window": window, "full_attention_layers": full} if window and len(full) < n_layers else {}
    return dict(family="gemma", qk_norm=True, rope_local_theta=GEMMA3_LOCAL_THETA,
                query_pre_attn_scalar=float(d_model // n_heads if n_layers == 62 else head_dim), **windows)


def read_model_config(path: str, *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata (no tensor data read)."""
    return _config(_open(path), path, dtype)


class _GGUFTensors(Mapping):
    """The tensors of a GGUF file under their HF names, as float32 numpy arrays in HF layout, decoded on access,
    with `shape(name)` and `read(name, index)` as `hf.check_tensors` / `hf.place_params` read a
    `safetensors_io.SafetensorsFiles` (a region is cut from the whole dequantised tensor)."""

    def __init__(self, reader, path: str, config: ModelConfig, arch: str = "llama"):
        self._path = path
        self._arch = arch
        self._where: dict[str, Any] = {}
        self._heads: dict[str, int] = {}
        unknown = []
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name, arch)
            if name is None:
                unknown.append(tensor.name)
                continue
            type_name = tensor.tensor_type.name
            if type_name not in supported_types():
                raise errors.CheckpointError(
                    f"GGUF tensor {tensor.name!r} of {path!r} has type {type_name}; flaxalign reads "
                    f"{list(supported_types())} (requantise the file, e.g. llama-quantize ... Q8_0).")
            self._where[name] = tensor
            if arch not in ROPE_PERMUTED:
                continue
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                self._heads[name] = config.n_heads
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                self._heads[name] = config.n_kv_heads
        if unknown:
            raise errors.CheckpointError(f"GGUF file {path!r} has {len(unknown)} tensor(s) that flaxalign's {arch} "
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
        if self._arch in NORMS_PLUS_ONE and name.endswith("norm.weight"):
            value = value - np.float32(1.0)  # stored 1 + w; flaxalign's Gemma keeps w (as HF does)
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


def _check_present(config: ModelConfig, tensors: _GGUFTensors, path: str, arch: str = "llama") -> None:
    """Every tensor the config needs is in the file with the right shape (in GGUF names; hf.py says it in HF's)."""
    expected = {spec.hf_name: spec.hf_shape for spec in hf.global_tensors(config)}
    for spec in hf.layer_tensors(config):
        expected.update({spec.hf_name.format(i=i): spec.hf_shape for i in range(config.n_layers)})
    for name, shape in expected.items():
        if name not in tensors:
            raise errors.CheckpointError(
                f"GGUF file {path!r} has no tensor {gguf_tensor_name(name, arch)!r}, which its {arch} metadata needs.")
        if tensors.shape(name) != shape:
            raise errors.CheckpointError(
                f"GGUF tensor {gguf_tensor_name(name, arch)!r} of {path!r} has shape {tensors.shape(name)} (rows "
                f"first), but its {arch} metadata needs {shape}.")


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
    arch = _value(reader, "general.architecture")
    tensors = _GGUFTensors(reader, path, config, arch)
    _check_present(config, tensors, path, arch)
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

TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE; SentencePiece BPE (Gemma 3 files only, see below)
SENTENCEPIECE_ARCHITECTURES = ("gemma3",)  # whose "llama" (SentencePiece) vocabularies are built
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
    model: str = "gpt2"  # tokenizer.ggml.model
    add_bos: bool = False  # tokenizer.ggml.add_bos_token, read for SentencePiece vocabularies


def _read_vocab(reader, path: str) -> _Vocab:
    model = _value(reader, "tokenizer.ggml.model", None)
    if model is None:
        raise errors.DataError(f"GGUF file {path!r} has no tokenizer metadata (tokenizer.ggml.model).")
    if model not in TOKENIZER_MODELS:
        raise errors.DataError(f"GGUF file {path!r} has a {model!r} tokenizer; flaxalign builds "
                               f"{list(TOKENIZER_MODELS)} (byte-level BPE) tokenizers from GGUF metadata.")
    if model == "llama":
        arch = _value(reader, "general.architecture", None)
        if arch not in SENTENCEPIECE_ARCHITECTURES:
            raise errors.DataError(f"GGUF file {path!r} has a SentencePiece ('llama') tokenizer for architecture "
                                   f"{arch!r}; flaxalign builds those for {list(SENTENCEPIECE_ARCHITECTURES)} only.")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    merges = []
    for merge in _value(reader, "tokenizer.ggml.merges", []):
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
                  chat_template=_value(reader, "tokenizer.chat_template", None), model=model,
                  # llama.cpp (and transformers) add BOS to a SentencePiece vocabulary that does not say otherwise
                  add_bos=model == "llama" and bool(_value(reader, "tokenizer.ggml.add_bos_token", True)))


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

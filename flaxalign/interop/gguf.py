"""llama.cpp GGUF files → flaxalign: weights (dequantised to float32), model config and tokenizer.

`load_gguf(path)` reads a GGUF file of architecture (`general.architecture`) `llama` (Llama 1/2/3 without rope
scaling, SmolLM, TinyLlama, ...), `qwen2`, `qwen3`, `gemma2`, `gemma3` (Gemma 3 text models) or `phi3` (Phi-3 and
Phi-3.5 mini / medium without LongRoPE, Phi-4) into the same `hf.Pretrained`
that `hf.load_pretrained` returns for an HF directory; `flaxalign.interop.load_pretrained(path)` dispatches here for
a path ending in `.gguf`, and `flaxalign.data.load_tokenizer(path)` builds the tokenizer from the file's metadata.
Another architecture stops with one line naming `general.architecture` and the supported values.

How: the file is parsed with the `gguf` package (`GGUFReader`, memory-mapped). Each GGUF tensor is renamed to its HF
name (`TENSOR_NAMES[arch]` below), dequantised by the package (`gguf.quants.dequantize`, ggml's block decoders in
NumPy), and, for `llama` files only, its q/k rows are put back into HF order (`unpermute_rope_rows`; llama.cpp
permutes no other architecture: Qwen2/3, Gemma and Phi-3 rotate halves, as HF does); Gemma 2 / 3 files store every
norm weight as 1 + w (llama.cpp's convert adds 1), read back as w; Phi-3's fused `attn_qkv` / `ffn_up` are HF's
`qkv_proj` / `gate_up_proj` (`models.phi3` splits them). That lazy HF-named mapping then goes through hf.py's own
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
Gemma 2 (`_gemma2_fields`): windowed even layers, full odd ones, the file's attention / final logit soft caps.
Phi-3 (`_phi3_fields`): one window on every layer. Not supported (`ConfigError`): rope scaling (`rope.scaling.type`,
Llama-3.1's `rope_freqs.weight`, Phi-3's LongRoPE `rope_factors_long`; so Gemma 3 4B+, whose files state linear
scaling), partial rotary (`rope.dimension_count` != head_dim), mixture of experts, per-layer head counts, soft caps
in a gemma3 file.

Tokenizer: byte-level BPE (`tokenizer.ggml.model` "gpt2"), and SentencePiece BPE ("llama") for Gemma 2 / 3 files
(Phi-3's Llama-2-style SentencePiece vocabulary is not built: its weights load, with a logged notice);
built by `flaxalign.data.gguf_tokenizer` (`GGUFTokenizer`, `load_gguf_tokenizer`), which also opens and reads the
file's metadata for this module.
"""

import functools
import logging
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import jax
import numpy as np

from flaxalign import errors
from flaxalign.data.gguf_tokenizer import MISSING, metadata_value, open_reader, tensor_shape, tokenizer_of
from flaxalign.interop import hf
from flaxalign.models import gemma
from flaxalign.models.config import ModelConfig
from flaxalign.models.tensors import whole_shapes

_LOG = logging.getLogger(__name__)

# `general.architecture` values read, and what each implies: llama.cpp permutes the q/k rows of "llama" files only
# (`LlamaModel.permute`; Qwen2/3 and Gemma 3 use NEOX RoPE, already HF's rotate_half order); Gemma 3 files store
# every norm weight as 1 + w (llama.cpp's convert adds 1; Gemma's RMSNorm multiplies by 1 + w).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
ROPE_PERMUTED = ("llama",)
NORMS_PLUS_ONE = ("gemma2", "gemma3")

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
# Gemma 2 and 3's four layer norms (llama.cpp's names): ffn_norm is the pre-MLP norm there, not Llama's second norm
_GEMMA_NORMS = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# Phi-3 fuses q/k/v and gate/up in one tensor each, in HF's row order (`models.phi3`), which llama.cpp keeps
_PHI3_FUSED = {
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
}
_PHI3_UNFUSED = ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight", "blk.{i}.ffn_gate.weight",
                 "blk.{i}.ffn_up.weight", "blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias")
TENSOR_NAMES = {  # general.architecture -> its GGUF -> HF table
    "llama": GGUF_TO_HF,
    "qwen2": GGUF_TO_HF,
    "qwen3": {**GGUF_TO_HF, **_QK_NORMS},
    "gemma2": {**GGUF_TO_HF, **_GEMMA_NORMS},
    "gemma3": {**GGUF_TO_HF, **_QK_NORMS, **_GEMMA_NORMS},
    "phi3": {**{k: v for k, v in GGUF_TO_HF.items() if k not in _PHI3_UNFUSED}, **_PHI3_FUSED},
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
# Files (opened and read by `flaxalign.data.gguf_tokenizer`'s `open_reader` / `metadata_value`)


def _scalar(value: Any, key: str) -> Any:
    if isinstance(value, list):
        raise errors.ConfigError(f"GGUF key {key!r} varies per layer ({value[:4]}...); flaxalign needs one value.")
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _config(reader, path: str, dtype: str) -> ModelConfig:
    arch = architecture(reader, path)
    names = {t.name for t in reader.tensors}

    def key(name: str, default: Any = MISSING) -> Any:
        return _scalar(metadata_value(reader, f"{arch}.{name}", default), f"{arch}.{name}")

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
    elif arch == "gemma2":
        family = _gemma2_fields(reader, n_layers, int(d_model), int(n_heads), int(head_dim))
    elif arch == "phi3":
        family = _phi3_fields(reader, path, names, n_layers)
    elif metadata_value(reader, f"{arch}.attention.sliding_window_pattern", None) is not None:
        raise errors.ConfigError(f"GGUF file {path!r} alternates windowed and full attention layers "
                                 "(attention.sliding_window_pattern); flaxalign reads GGUF windows on every layer.")
    else:
        family = {"sliding_window": int(key("attention.sliding_window", 0)),
                  "qk_norm": arch == "qwen3" and "blk.0.attn_q_norm.weight" in names}
    tokens = metadata_value(reader, "tokenizer.ggml.tokens", None)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = len(tokens) if tokens else key("vocab_size", tensor_shape(embedding)[0] if embedding is not None else None)
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
    arch = metadata_value(reader, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise errors.ConfigError(f"GGUF file {path!r} has general.architecture={arch!r}; flaxalign reads "
                                 f"{', '.join(ARCHITECTURES)}.")
    return arch


# llama.cpp's fixed Gemma layouts (`interop.gguf_export` writes only models that follow them): every Nth layer is
# global, the others windowed (Gemma 2: set_swa_pattern(2), the odd layers; Gemma 3: 6), and q·k is scaled by
# 1/√head_dim except in the 27B models (46 / 62 layers), where it is 1/√(d_model / n_heads).
GEMMA_PATTERNS = {"gemma2": 2, "gemma3": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_LOCAL_THETA = 10_000.0  # llama.cpp's rope_freq_base_train_swa and Gemma3TextConfig's rope_local_base_freq


def gemma_full_layers(arch: str, n_layers: int, pattern: int | None = None) -> tuple[int, ...]:
    """The global (full attention) layers of a Gemma file of `arch`: every `pattern`-th (default llama.cpp's)."""
    pattern = pattern or GEMMA_PATTERNS[arch]
    return tuple(i for i in range(n_layers) if (i + 1) % pattern == 0)


def gemma_query_scalar(arch: str, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> float:
    """The q·k scale divisor (`query_pre_attn_scalar`) llama.cpp fixes for a Gemma file of `arch`."""
    return float(d_model // n_heads if n_layers == GEMMA_27B_LAYERS[arch] else head_dim)


def _gemma3_fields(reader, path: str, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """The Gemma 3 fields a gemma3 GGUF file implies, chosen as llama.cpp computes such a file: windows of
    `attention.sliding_window` tokens on every layer but each 6th (the pattern is fixed in llama.cpp; a scalar
    `attention.sliding_window_pattern` overrides it), RoPE base `rope.freq_base` on the global layers and 10000 on the
    windowed ones, scores scaled by 1/√head_dim (1/√(d_model / n_heads) for the 62-layer 27B, as llama.cpp does;
    transformers' GGUF reader leaves query_pre_attn_scalar at 256, the same for every size but the 27B).
    `ConfigError` for logit soft caps (Gemma 2 style), which a Gemma 3 file does not have."""
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if metadata_value(reader, f"gemma3.{cap}", None) is not None:
            raise errors.ConfigError(f"GGUF file {path!r} has gemma3.{cap}; flaxalign's Gemma 3 has no soft caps.")
    pattern = _scalar(metadata_value(reader, "gemma3.attention.sliding_window_pattern", GEMMA_PATTERNS["gemma3"]),
                      "gemma3.attention.sliding_window_pattern")
    window = int(_scalar(metadata_value(reader, "gemma3.attention.sliding_window", 0),
                         "gemma3.attention.sliding_window"))
    full = gemma_full_layers("gemma3", n_layers, int(pattern))
    windows = {"sliding_window": window, "full_attention_layers": full} if window and len(full) < n_layers else {}
    return dict(family="gemma", qk_norm=True, rope_local_theta=GEMMA3_LOCAL_THETA,
                query_pre_attn_scalar=gemma_query_scalar("gemma3", n_layers, d_model, n_heads, head_dim), **windows)


GEMMA2_WINDOW = 4096  # llama.cpp's n_swa for a gemma2 file without attention.sliding_window (Gemma 2's own)


def _gemma2_fields(reader, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """The Gemma 2 fields a gemma2 GGUF file implies, as llama.cpp computes it: windows of `attention.sliding_window`
    (else 4096) tokens on the even layers, full attention on the odd ones (HF's Gemma 2 pattern), one RoPE base, the
    attention and final logit soft caps of the file (else Gemma 2's 50 / 30, llama.cpp's defaults), no q/k norms,
    scores scaled by 1/√head_dim (1/√(d_model / n_heads) for the 46-layer 27B, as llama.cpp does)."""
    caps = {key: float(_scalar(metadata_value(reader, f"gemma2.{key}", default), f"gemma2.{key}"))
            for key, default in gemma.GEMMA2_SOFTCAPS.items()}
    window = int(_scalar(metadata_value(reader, "gemma2.attention.sliding_window", GEMMA2_WINDOW),
                         "gemma2.attention.sliding_window"))
    full = gemma_full_layers("gemma2", n_layers)
    windows = {"sliding_window": window, "full_attention_layers": full} if window and len(full) < n_layers else {}
    return dict(family="gemma", qk_norm=False, attn_softcap=caps["attn_logit_softcapping"],
                final_softcap=caps["final_logit_softcapping"],
                query_pre_attn_scalar=gemma_query_scalar("gemma2", n_layers, d_model, n_heads, head_dim), **windows)


def _phi3_fields(reader, path: str, names: set[str], n_layers: int) -> dict[str, Any]:
    """The Phi-3 fields of a phi3 GGUF file: the window `attention.sliding_window` on every layer (0: none, Phi-4;
    a file without the key gets llama.cpp's 2047 where llama.cpp gives it one: 32 or 40 layers and a 4096-token
    context). `ConfigError` for the 128k models' rope scaling (LongRoPE factor tensors)."""
    if names & {"rope_factors_long.weight", "rope_factors_short.weight"}:
        raise errors.ConfigError(f"GGUF file {path!r} uses LongRoPE scaling (rope_factors_long / _short: a 128k "
                                 "Phi-3); flaxalign's Phi-3 supports rope_type 'default' only.")
    window = _scalar(metadata_value(reader, "phi3.attention.sliding_window", None), "phi3.attention.sliding_window")
    if window is None:
        context = metadata_value(reader, "phi3.context_length", None)
        window = 2047 if n_layers in (32, 40) and context == 4096 else 0
    return dict(family="phi3", sliding_window=int(window))


def read_model_config(path: str, *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata (no tensor data read)."""
    return _config(open_reader(path), path, dtype)


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
        return tensor_shape(self._where[name])

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
    expected = whole_shapes(hf.global_tensors(config))
    for name, shape in whole_shapes(hf.layer_tensors(config)).items():
        expected.update({name.format(i=i): shape for i in range(config.n_layers)})
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
    """Loads a GGUF file of one of `ARCHITECTURES`: config, float32 params and tokenizer (None when the file has no
    tokenizer metadata or one flaxalign does not build, with a logged notice for the latter).

    `dtype` is the compute dtype of the returned config ("auto", "float32", "bfloat16"). With `mesh`, every param
    is created directly in its sharding, decoded from the memory-mapped file, and a `quantizer` quantizes the layer
    weights as they are decoded (see `hf.load_pretrained`). Raises
    `CheckpointError` for a missing, truncated or corrupt file, an unsupported tensor type, and missing, misshapen
    or unknown tensors; `ConfigError` for other architectures and unsupported model features.
    """
    reader = open_reader(path)
    config = _config(reader, path, dtype)
    arch = metadata_value(reader, "general.architecture")
    tensors = _GGUFTensors(reader, path, config, arch)
    _check_present(config, tensors, path, arch)
    hf.check_tensors(config, tensors)  # also refuses tensors left over (none, after the checks above)
    params = hf.place_params(config, tensors, mesh, quantizer=quantizer)
    tokenizer = None
    if reader.get_field("tokenizer.ggml.model") is not None:
        try:
            tokenizer = tokenizer_of(reader, path)
        except errors.DataError as e:
            _LOG.warning("GGUF file %s: no tokenizer loaded: %s", path, e)
    return hf.Pretrained(config=config, params=params, tokenizer=tokenizer)

"""flaxalign → llama.cpp: a GGUF file from a model config, its params, a tokenizer and a chat template (`flaxalign
convert --format=gguf`; `gguf.py` reads such files back).

`export_gguf(path, config, params, vocab=gguf_vocab(tokenizer, ...), chat_template=..., gguf_type="f16")` writes
what llama.cpp's convert_hf_to_gguf.py writes for the model's HF class, under the architecture `gguf_architecture`
picks (`llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`; what llama.cpp would compute otherwise is refused by
`check_exportable`). For a LlamaForCausalLM:

- metadata: `general.architecture` "llama", `general.name`, `general.file_type`, `general.quantization_version`;
  `llama.vocab_size`, `context_length` (max_seq_len), `embedding_length`, `feed_forward_length`, `block_count`,
  `attention.head_count`, `head_count_kv`, `key_length` / `value_length` (head_dim), `rope.dimension_count`
  (head_dim: the whole head rotates), `rope.freq_base`, `attention.layer_norm_rms_epsilon`, and
  `attention.sliding_window` when the model has one (llama.cpp's llama architecture ignores it; flaxalign reads it).
  Llama-3.1 rope scaling is llama.cpp's `rope_freqs.weight`: one divisor of each rotary frequency, as
  convert_hf_to_gguf.py computes it.
- tensors: the HF tensors renamed by `gguf.GGUF_TO_HF`, q/k rows (and biases) interleaved per head by
  `permute_rope_rows` for llama.cpp's RoPE (with n_kv_heads for k: GQA), no `output.weight` when embeddings are
  tied. Norms and biases (1-D) stay F32 as llama.cpp keeps them; the matrices are `GGUF_TYPES[gguf_type]`. A
  matrix whose rows do not split into whole quantisation blocks falls back to F16, as in convert_hf_to_gguf.py.
- tokenizer (byte-level BPE, see `gguf_vocab`): `tokenizer.ggml.model` "gpt2", `pre`, tokens, token types,
  merges, bos/eos/unk/pad ids, `add_bos_token`, the end-of-turn id, and `tokenizer.chat_template` (Jinja).

The other architectures differ as llama.cpp's converter makes them: no q/k row permutation (they rotate halves, as
HF), Gemma's norm weights stored as 1 + w and Gemma 2's `attn_logit_softcapping` / `final_logit_softcapping`, Phi-3's
`attn_qkv` / `ffn_up` fused from q/k/v and gate/up (HF's row order), the window of Gemma and Phi-3. A Gemma model
whose tokenizer is a GGUF file's SentencePiece vocabulary gets that vocabulary back as the file states it (tokens,
scores, types: llama.cpp merges by score).

The file is written to a temporary file beside `path` and renamed over it at the end, so a failed export leaves
no half file; tensors are converted and written one at a time (the sizes are known from the config up front), so
the host holds the params plus one tensor, not a second copy of the model.
"""

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gguf
import numpy as np

from flaxalign import errors
from flaxalign.data.gguf_tokenizer import PRE_TOKENIZERS, GGUFTokenizer, metadata_value, open_reader
from flaxalign.interop import hf
from flaxalign.interop.gguf import (
    GEMMA3_LOCAL_THETA,
    GEMMA_PATTERNS,
    NORMS_PLUS_ONE,
    ROPE_PERMUTED,
    gemma_full_layers,
    gemma_query_scalar,
    gguf_tensor_name,
    permute_rope_rows,
)
from flaxalign.models.config import ModelConfig
from flaxalign.models.tensors import assemble, whole_shapes

ARCHITECTURE = "llama"
# --gguf_type -> (ggml type of the weight matrices, general.file_type). The types `gguf.quants.quantize` can write
# (gguf 0.19) that llama.cpp runs for any model; its K-quants (Q4_K ... Q6_K) and IQ types are decode-only there
# (llama-quantize makes them from an f16 export). TQ1_0 / TQ2_0 (ternary) and MXFP4 are left out: they are meant
# for models trained for them.
GGUF_TYPES = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "f32": ("F32", "ALL_F32"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
DEFAULT_GGUF_TYPE = "f16"  # why not bf16: BUILD_NOTES ("GGUF export")
ROPE_FREQS = "rope_freqs.weight"
_F16_MAX = float(np.finfo(np.float16).max)
_NUMPY_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}  # ggml types numpy writes itself


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise errors.ConfigError(f"--gguf_type={gguf_type!r} is not one of {list(GGUF_TYPES)}.")


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture (`general.architecture`) a model is written as: `gemma3` / `gemma2` for the gemma
    family with / without q/k norms, `phi3`, and for the llama family `qwen3` with q/k norms, `qwen2` with q/k/v
    biases (llama.cpp's `llama` would run those too, transformers' GGUF reader would drop them), else `llama`."""
    if config.family == "gemma":
        return "gemma3" if config.qk_norm else "gemma2"
    if config.family == "phi3":
        return "phi3"
    return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else ARCHITECTURE


_GEMMA_LAYOUTS = {  # how llama.cpp lays out its layers, and the fields that say ours
    "gemma2": ("windows the even layers and attends in full on the odd ones",
               "model.sliding_window / model.full_attention_layers"),
    "gemma3": (f"makes every {GEMMA_PATTERNS['gemma3']}th layer global and windows the others",
               "model.full_attention_layers"),
}


def check_exportable(config: ModelConfig) -> None:
    """Refuses model features llama.cpp's architecture for the model (`gguf_architecture`) cannot compute, one
    sentence each naming the field; what is written is what `interop.gguf` reads back as the same model."""
    if config.adapter_placement != "none":
        raise errors.ConfigError("a GGUF file holds base weights only, and this model has bottleneck adapters "
                                 "(adapter_placement); export the run it started from instead.")
    arch = gguf_architecture(config)
    if arch not in ("gemma2",):
        for field in ("attn_softcap", "final_softcap"):
            if getattr(config, field):
                raise errors.ConfigError(f"llama.cpp's {arch} architecture has no "
                                         f"{'attention' if field == 'attn_softcap' else 'final logit'} soft cap "
                                         f"(model.{field}); this model cannot be exported as GGUF.")
    windows = config.layer_windows()
    if arch in GEMMA_PATTERNS:
        full = gemma_full_layers(arch, config.n_layers)
        layout = tuple(w == 0 for w in windows) == tuple(i in full for i in range(config.n_layers))
        if not layout and (arch == "gemma2" or config.sliding_window):  # a windowless Gemma 3 is one llama.cpp runs
            rule, fields = _GEMMA_LAYOUTS[arch]
            raise errors.ConfigError(f"llama.cpp's {arch} {rule}; this model's windows per layer are "
                                     f"{list(windows)} ({fields}).")
    elif config.full_attention_layers:
        raise errors.ConfigError(f"llama.cpp's {arch} architecture attends alike on every layer, but this model mixes "
                                 "windowed and full attention layers (model.full_attention_layers).")
    local_theta = config.rope_local_theta or config.rope_theta
    want = {"gemma2": config.rope_theta, "gemma3": GEMMA3_LOCAL_THETA}.get(arch, local_theta)  # Gemma 2: one base
    if local_theta != want:
        raise errors.ConfigError(f"llama.cpp's {arch} uses RoPE base {want:g} on its windowed layers; this model has "
                                 f"model.rope_local_theta={local_theta:g}.")
    if arch in GEMMA_PATTERNS:
        fixed = gemma_query_scalar(arch, config.n_layers, config.d_model, config.n_heads, config.head_dim)
        if (config.query_pre_attn_scalar or config.head_dim) != fixed:
            raise errors.ConfigError(f"llama.cpp's {arch} scales q·k by 1/√{fixed:g} at this size; this model has "
                                     "model.query_pre_attn_scalar="
                                     f"{config.query_pre_attn_scalar or config.head_dim:g}.")
    elif config.query_pre_attn_scalar or config.rope_local_theta:
        raise errors.ConfigError(f"llama.cpp's {arch} architecture scales q·k by 1/√head_dim with one RoPE base; "
                                 f"model.query_pre_attn_scalar={config.query_pre_attn_scalar:g} and "
                                 f"model.rope_local_theta={config.rope_local_theta:g} cannot be written.")
    if arch == "phi3" and config.head_dim * config.n_heads != config.d_model:
        raise errors.ConfigError(f"llama.cpp's phi3 rotates d_model / n_heads dims of each head; this model has "
                                 f"model.head_dim={config.head_dim} ≠ {config.d_model} / {config.n_heads}.")


# ---------------------------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name, numpy shape (rows first), ggml type and float32 values in llama.cpp's
    layout, computed only when the tensor is written."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    values: Callable[[], np.ndarray]
    hf_name: str = ""  # "" for rope_freqs, which HF does not store

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))

    def encoded(self) -> np.ndarray:
        """The tensor's bytes as an array (`qtype`'s encoding of `values()`)."""
        values = np.ascontiguousarray(self.values(), dtype=np.float32)
        if values.shape != self.shape:
            raise errors.CheckpointError(f"tensor {self.name} has shape {values.shape}, but the model config "
                                         f"needs {self.shape}.")
        if self.qtype.name == "F16" and np.abs(values).max(initial=0.0) > _F16_MAX:
            raise errors.ConfigError(f"tensor {self.name} has values beyond float16's range (±{_F16_MAX:g}); "
                                     "export it with --gguf_type=bf16 or f32.")
        if self.qtype.name in _NUMPY_TYPES:
            return values.astype(_NUMPY_TYPES[self.qtype.name])
        return gguf.quants.quantize(values, self.qtype)


def gguf_tensors(config: ModelConfig, params: Mapping[str, Any], matrix_type: str = "F16") -> list[GGUFTensor]:
    """The tensors of `params` (flaxalign's layout: numpy or jax arrays, layers stacked) as llama.cpp wants them for
    the model's architecture (`gguf_architecture`), in the order embedding, rope factors, blocks, output norm,
    output, the matrices as ggml type `matrix_type` ("Q8_0", ...: any type `gguf.quants.quantize` writes) and 1-D
    tensors as F32: q/k rows interleaved for llama.cpp's RoPE in `llama` files only, Gemma's norms stored as 1 + w,
    Phi-3's q/k/v and gate/up parts fused in HF's row order. Nothing is read yet: each tensor's `values()` slices its
    one layer out of the params when it is written."""
    arch = gguf_architecture(config)
    matrix_type = gguf.GGMLQuantizationType[matrix_type]
    heads = {"q": config.n_heads, "q_bias": config.n_heads, "k": config.n_kv_heads, "k_bias": config.n_kv_heads}

    def part(spec, layer: int | None) -> np.ndarray:
        leaf = params
        for key in (spec.path if layer is None else ("layers",) + spec.path):
            leaf = leaf[key]
        value = spec.to_hf(np.asarray(leaf if layer is None else leaf[layer], dtype=np.float32))
        if arch in ROPE_PERMUTED and spec.path[-1] in heads:
            value = permute_rope_rows(value, heads[spec.path[-1]])
        if arch in NORMS_PLUS_ONE and spec.hf_name.endswith("norm.weight"):
            value = value + np.float32(1.0)  # llama.cpp's Gemma multiplies by the stored weight
        return value

    def planned(specs, shape, layer: int | None) -> GGUFTensor:
        hf_name = specs[0].hf_name if layer is None else specs[0].hf_name.format(i=layer)

        def values() -> np.ndarray:  # a fused tensor: its parts in row order
            return assemble([(hf_name, spec, part(spec, layer)) for spec in specs])[hf_name]

        return GGUFTensor(gguf_tensor_name(hf_name, arch), shape, _storage_type(shape, matrix_type), values, hf_name)

    def by_name(specs) -> list[tuple[list, tuple[int, ...]]]:
        grouped: dict[str, list] = {}
        for spec in specs:
            grouped.setdefault(spec.hf_name, []).append(spec)
        shapes = whole_shapes(specs)
        return [(group, shapes[name]) for name, group in grouped.items()]

    globals_ = {group[0].hf_name: (group, shape) for group, shape in by_name(hf.global_tensors(config))}
    out = [planned(*globals_.pop("model.embed_tokens.weight"), None)]
    if config.rope_scaling_factor:
        out.append(GGUFTensor(ROPE_FREQS, (config.head_dim // 2,), gguf.GGMLQuantizationType.F32,
                              lambda: rope_frequency_factors(config)))
    layer_groups = by_name(hf.layer_tensors(config))
    out += [planned(group, shape, i) for i in range(config.n_layers) for group, shape in layer_groups]
    out += [planned(group, shape, None) for group, shape in globals_.values()]  # output norm, then output
    return out


def _storage_type(shape: tuple[int, ...], matrix_type) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block_size = gguf.GGML_QUANT_SIZES[matrix_type][0]
    return matrix_type if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def rope_frequency_factors(config: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama-3.1 scaling: per rotary pair, the number its frequency θ^(-2i/d) is
    divided by (1 for short wavelengths, the scaling factor for long ones, smoothly in between), as
    convert_hf_to_gguf.py's LlamaModel computes it; `models.llama.rope_frequencies` applies the same scaling."""
    dim, factor = config.head_dim, config.rope_scaling_factor
    freqs = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    smooth = (config.rope_original_max_len / wavelen - low) / (high - low)
    factors = np.where(wavelen < config.rope_original_max_len / high, 1.0,
                       np.where(wavelen > config.rope_original_max_len / low, factor,
                                1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

NORMAL, CONTROL, USER_DEFINED, UNUSED = (int(gguf.TokenType[t]) for t in ("NORMAL", "CONTROL", "USER_DEFINED",
                                                                          "UNUSED"))
# The `tokenizer.ggml.pre` written for each split of `PRE_TOKENIZERS`: names llama.cpp's llama-vocab.cpp knows
# (it has no "gpt2", only "gpt-2"), for which our reader and transformers' build the same split.
LLAMA_CPP_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_PRE_NAME_OF_SPLIT = {PRE_TOKENIZERS[name]: name for name in LLAMA_CPP_PRE_NAMES}
SUPPORTED_TOKENIZERS = ("byte-level BPE tokenizers (a tokenizer.json or GGUF file) whose pre-tokenizer is GPT-2's, "
                        "SmolLM's, Llama-3's or Qwen2's")


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE vocabulary as GGUF metadata: `tokens[i]` is id i (in the byte alphabet, special tokens as
    their text), `types` llama.cpp's token types, `merges` "a b" strings, `pre` the `tokenizer.ggml.pre` name."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    pad: int | None = None
    eot: int | None = None  # the end-of-turn token of the chat template, when it is not EOS
    add_bos: bool = False
    model: str = "gpt2"  # tokenizer.ggml.model: "llama" is a SentencePiece vocabulary (`scores`, no merges)
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def gguf_vocab(tokenizer, model_vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of an `HFTokenizer` (a tokenizer.json) or `GGUFTokenizer`, padded with unused
    "[PAD{i}]" tokens to the model's `model_vocab_size` rows, as llama.cpp needs one token per embedding row.

    `add_bos` is true exactly when the tokenizer has a BOS, because flaxalign's stages and `generate` put one
    before every sequence; the end-of-turn id is that of the chat format the vocabulary has (`chat.end_of_turn_ids`).
    A GGUF file's SentencePiece vocabulary (Gemma's) is copied as the file states it (`_sentencepiece_vocab`).
    Raises `ConfigError` for anything else (other SentencePiece, WordPiece, a normaliser other than NFC, a
    pre-tokenizer outside `LLAMA_CPP_PRE_NAMES`, more tokens than embedding rows). NFC (Qwen2's) passes: llama.cpp
    skips it, which changes the ids of text that is not NFC already."""
    from flaxalign.data.chat import end_of_turn_ids
    from flaxalign.data.tokenizer import HFTokenizer

    where = f"tokenizer {tokenizer.model_path}"
    if isinstance(tokenizer, GGUFTokenizer) and \
            metadata_value(open_reader(tokenizer.model_path), "tokenizer.ggml.model", None) == "llama":
        return _sentencepiece_vocab(tokenizer, model_vocab_size)
    if not isinstance(tokenizer, HFTokenizer):
        raise errors.ConfigError(f"{where} is a SentencePiece model, which GGUF export cannot write; it writes "
                                 f"{SUPPORTED_TOKENIZERS}.")
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer.json as `tokenizers` writes it, in-memory pad too
        with open(tokenizer.save_pretrained(scratch)[0], encoding="utf-8") as f:
            spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix"):
        raise errors.ConfigError(f"{where} is a {model.get('type')} model of a kind GGUF export cannot write; it "
                                 f"writes {SUPPORTED_TOKENIZERS}.")
    normalizer = spec.get("normalizer") or {"type": "Sequence", "normalizers": []}
    if normalizer != {"type": "Sequence", "normalizers": []} and normalizer.get("type") != "NFC":
        raise errors.ConfigError(f"{where} normalises text ({normalizer.get('type')}), which llama.cpp would not "
                                 f"do; GGUF export writes {SUPPORTED_TOKENIZERS}.")
    pre = _PRE_NAME_OF_SPLIT.get(_split_of(spec.get("pre_tokenizer")))
    if pre is None:
        raise errors.ConfigError(f"{where} has a pre-tokenizer that matches none llama.cpp knows "
                                 f"({json.dumps(spec.get('pre_tokenizer'))[:120]}); GGUF export writes "
                                 f"{SUPPORTED_TOKENIZERS}.")
    ids = dict(model.get("vocab") or {})
    kinds = {}
    for added in spec.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(ids.values()) + 1
    if size > model_vocab_size:
        raise errors.ConfigError(f"{where} has {size} tokens, but the model's embedding has {model_vocab_size} "
                                 "rows; GGUF needs one token per row.")
    tokens = [f"[PAD{i}]" for i in range(model_vocab_size)]
    types = [UNUSED] * model_vocab_size
    for token, index in ids.items():
        tokens[index], types[index] = token, kinds.get(index, NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    stops = [i for i in end_of_turn_ids(tokenizer) if i != tokenizer.eos_id]
    return GGUFVocab(tokens=tokens, types=types, merges=merges, pre=pre, bos=tokenizer.bos_id,
                     eos=tokenizer.eos_id, unk=tokenizer.unk_id, pad=tokenizer.pad_id,
                     eot=stops[0] if stops else None, add_bos=tokenizer.bos_id is not None)


def _sentencepiece_vocab(tokenizer, model_vocab_size: int) -> GGUFVocab:
    """A GGUF file's SentencePiece vocabulary (Gemma's, the only kind flaxalign builds) as that file states it:
    tokens, scores and types copied, so llama.cpp tokenizes as with the source; unused "[PAD{i}]" tokens for any
    embedding rows beyond it."""
    from flaxalign.data.chat import end_of_turn_ids

    reader = open_reader(tokenizer.model_path)
    tokens = list(metadata_value(reader, "tokenizer.ggml.tokens"))
    if len(tokens) > model_vocab_size:
        raise errors.ConfigError(f"tokenizer {tokenizer.model_path} has {len(tokens)} tokens, but the model's "
                                 f"embedding has {model_vocab_size} rows; GGUF needs one token per row.")
    spare = model_vocab_size - len(tokens)
    scores = list(metadata_value(reader, "tokenizer.ggml.scores", None) or [0.0] * len(tokens))
    types = list(metadata_value(reader, "tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens))
    stops = [i for i in end_of_turn_ids(tokenizer) if i != tokenizer.eos_id]
    return GGUFVocab(
        tokens=tokens + [f"[PAD{i}]" for i in range(len(tokens), model_vocab_size)], types=types + [UNUSED] * spare,
        merges=[], pre=metadata_value(reader, "tokenizer.ggml.pre", "default"), bos=tokenizer.bos_id,
        eos=tokenizer.eos_id, unk=tokenizer.unk_id, pad=tokenizer.pad_id, eot=stops[0] if stops else None,
        add_bos=bool(metadata_value(reader, "tokenizer.ggml.add_bos_token", True)), model="llama",
        scores=scores + [0.0] * spare, add_space_prefix=metadata_value(reader, "tokenizer.ggml.add_space_prefix", None))


def _split_of(pre_tokenizer: dict | None) -> str | None:
    """The `PRE_TOKENIZERS` value a tokenizer.json pre-tokenizer is: "gpt2" (ByteLevel with GPT-2's regex),
    "digits+gpt2" (every digit alone, then that), a Split regex followed by a plain byte map, or None."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]

    def byte_level(step: dict, with_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and bool(step.get("use_regex", True)) == with_regex)

    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt2"
    if len(steps) != 2:
        return None
    first, second = steps
    if first == {"type": "Digits", "individual_digits": True} and byte_level(second, True):
        return "digits+gpt2"
    if first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert") and \
            byte_level(second, False):
        regex = (first.get("pattern") or {}).get("Regex") or ""
        return regex.replace(_LLAMA_CPP_CONTRACTIONS, _HF_CONTRACTIONS)
    return None


# The case-insensitive contractions of the Llama-3 / Qwen2 splits as tokenizer.json spells them, and as llama.cpp
# spells them (its regex engine has no inline flags): the same split, either spelling is recognised.
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA_CPP_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"


def own_chat_template(tokenizer) -> str | None:
    """The Jinja chat template a tokenizer comes with: a GGUF file's, or the `chat_template` of the
    tokenizer_config.json beside a tokenizer.json (its default one when it lists several), else None."""
    if tokenizer is None or hasattr(tokenizer, "chat_template"):  # a GGUFTokenizer knows its file's
        return getattr(tokenizer, "chat_template", None)
    try:
        with open(os.path.join(os.path.dirname(tokenizer.model_path), "tokenizer_config.json"), encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


# ---------------------------------------------------------------------------------------------------------------
# Metadata and files


def add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """The `{arch}.*` keys of `config` (the writer's architecture names the prefix): the shapes, and the keys of its
    architecture (`gguf_architecture`): Gemma 2's soft caps, the window of Gemma and Phi-3 (0 for none)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    arch = gguf_architecture(config)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_softcap)
        writer.add_final_logit_softcapping(config.final_softcap)
    if config.sliding_window or arch == "phi3":  # phi3: 0 says "no window" (Phi-4) rather than llama.cpp's default
        writer.add_sliding_window(config.sliding_window)


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab, chat_template: str | None = None) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for add, value in ((writer.add_bos_token_id, vocab.bos), (writer.add_eos_token_id, vocab.eos),
                       (writer.add_unk_token_id, vocab.unk), (writer.add_pad_token_id, vocab.pad),
                       (writer.add_eot_token_id, vocab.eot)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_file(path: str, add_metadata: Callable[[gguf.GGUFWriter], None], tensors: Sequence[GGUFTensor], *,
               arch: str = ARCHITECTURE) -> int:
    """Writes a GGUF file atomically: `add_metadata(writer)` sets its keys, then the tensors are encoded and
    written one by one (their table first, from shapes alone). Returns the file's size in bytes. On any failure
    the temporary file is removed and an existing `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(partial, arch)
        try:
            add_metadata(writer)
            for tensor in tensors:
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                                       raw_dtype=tensor.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in tensors:
                writer.write_tensor_data(tensor.encoded())
        finally:
            writer.close()
        os.chmod(partial, 0o644)  # mkstemp makes the file private; the result is an ordinary file
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    return os.path.getsize(path)


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export_gguf` wrote."""

    path: str
    size: int  # bytes
    tensors: int
    fallbacks: tuple[str, ...]  # matrices stored as F16 because their rows are not whole quantisation blocks


def export_gguf(path: str, config: ModelConfig, params: Mapping[str, Any], *, vocab: GGUFVocab | None = None,
                chat_template: str | None = None, gguf_type: str = DEFAULT_GGUF_TYPE, name: str = "") -> Exported:
    """Writes `params` (a causal LM of `config`) with `vocab` (`gguf_vocab`; None: no tokenizer metadata, which
    llama.cpp needs to run the file) and `chat_template` (Jinja, written with the vocabulary) as a GGUF file at
    `path` (architecture: `gguf_architecture(config)`); see the module docstring. Raises `ConfigError` for a model
    GGUF cannot express before anything is written."""
    check_gguf_type(gguf_type)
    check_exportable(config)
    if vocab is not None and len(vocab.tokens) != config.vocab_size:
        raise errors.ConfigError(f"the vocabulary has {len(vocab.tokens)} tokens, but the model's embedding has "
                                 f"{config.vocab_size} rows; GGUF needs one token per row.")
    matrix_type, file_type = GGUF_TYPES[gguf_type]
    tensors = gguf_tensors(config, params, matrix_type)

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        if name:
            writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config)
        if vocab is not None:
            add_vocab(writer, vocab, chat_template)

    size = write_file(path, add_metadata, tensors, arch=gguf_architecture(config))
    fallbacks = tuple(t.name for t in tensors if len(t.shape) > 1 and t.qtype.name != matrix_type)
    return Exported(path=path, size=size, tensors=len(tensors), fallbacks=fallbacks)

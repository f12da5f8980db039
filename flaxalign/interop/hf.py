"""Hugging Face transformers ↔ flaxalign: config mapping and tensor-layout conversion as pure functions.

Supported architectures: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (SmolLM is a Llama). Both
directions work on in-memory arrays only: numpy in, numpy out, no torch. Reading and writing safetensors files,
sharded placement of the converted params and the `hf_export` / `hf_import` commands are left to the full interop
that a later issue builds on top of this module.

Layout (HF `nn.Linear.weight` is [out, in]; flaxalign kernels are [in, ...out] and stacked over a leading layer
axis):

    model.embed_tokens.weight                      [V, D]       -> embed                 [V, D]
    model.layers.{i}.self_attn.q_proj.weight       [H·Dh, D]    -> layers.attn.q         [L, D, H, Dh]
    model.layers.{i}.self_attn.{k,v}_proj.weight   [K·Dh, D]    -> layers.attn.{k,v}     [L, D, K, Dh]
    model.layers.{i}.self_attn.o_proj.weight       [D, H·Dh]    -> layers.attn.o         [L, H, Dh, D]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias   [H·Dh]/[K·Dh]-> layers.attn.{q,k,v}_bias [L, H|K, Dh]
    model.layers.{i}.mlp.{gate,up}_proj.weight     [F, D]       -> layers.mlp.{gate,up}  [L, D, F]
    model.layers.{i}.mlp.down_proj.weight          [D, F]       -> layers.mlp.down       [L, F, D]
    model.layers.{i}.input_layernorm.weight        [D]          -> layers.attn_norm.scale [L, D]
    model.layers.{i}.post_attention_layernorm.weight [D]        -> layers.mlp_norm.scale  [L, D]
    model.norm.weight                              [D]          -> final_norm.scale      [D]
    lm_head.weight                                 [V, D]       -> lm_head               [D, V] (absent when tied)

HF splits the q/k/v output features head-major (`view(B, T, heads, head_dim)`), which is exactly a reshape of the
transposed kernel to [D, heads, head_dim]; RoPE uses the same rotate_half layout on both sides, so no permutation
of head_dim is needed (unlike Meta's original checkpoints).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flaxalign import errors
from flaxalign.models.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# Buffers that some transformers versions put into state dicts; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of an HF `config.json` dict (transformers 4.x or 5.x spelling).

    Maps hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    max_position_embeddings, rms_norm_eps, tie_word_embeddings, vocab_size, initializer_range, rope_theta (top
    level in 4.x, `rope_parameters["rope_theta"]` in 5.x) and "llama3" rope scaling. Qwen2 always has q/k/v
    biases; Llama's `attention_bias` turns them on too (its o_proj bias must then be zero, see
    `params_from_hf_state_dict`).

    Not supported, and not checked here: sliding-window attention. Mistral configs carry `sliding_window` (4096
    for Mistral-7B-v0.1), and Qwen2 has `use_sliding_window`; flaxalign attention is always full causal, which
    equals the HF model only for sequences no longer than the window. Keep `max_seq_len` within it.

    Raises `ConfigError` for other architectures and for settings that would change the math silently (an
    activation other than silu, MLP biases, partial rotary, rope scaling other than "llama3").
    """
    arch = _architecture(hf_config)
    if hf_config.get("hidden_act", "silu") != "silu":
        raise errors.ConfigError(
            f"HF config has hidden_act={hf_config['hidden_act']!r}; flaxalign's MLP is SwiGLU (silu) only.")
    if hf_config.get("mlp_bias", False):
        raise errors.ConfigError("HF config has mlp_bias=True; flaxalign's MLP has no biases.")
    d_model = _require(hf_config, "hidden_size")
    n_heads = _require(hf_config, "num_attention_heads")
    return ModelConfig(
        vocab_size=_require(hf_config, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf_config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,  # absent in old configs = multi-head
        d_ff=_require(hf_config, "intermediate_size"),
        head_dim=hf_config.get("head_dim") or d_model // n_heads,
        max_seq_len=hf_config.get("max_position_embeddings", ModelConfig.max_seq_len),
        rms_eps=hf_config.get("rms_norm_eps", 1e-6),  # the transformers default for all three
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf_config.get("attention_bias", False)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=hf_config.get("initializer_range", ModelConfig.init_std),
        **_rope_fields(hf_config),
    )


def _architecture(hf_config: Mapping[str, Any]) -> str:
    """The architecture name, from `architectures` (saved checkpoints) or `model_type` (configs built in code)."""
    names = hf_config.get("architectures") or []
    by_type = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
    arch = names[0] if names else by_type.get(hf_config.get("model_type", ""), hf_config.get("model_type"))
    if arch not in ARCHITECTURES:
        raise errors.ConfigError(
            f"HF architecture {arch!r} is not supported; flaxalign converts {sorted(ARCHITECTURES)}.")
    return arch


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise errors.ConfigError(f"HF config has no {key!r}; is this a decoder config.json?")
    return hf_config[key]


def _rope_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """rope_theta and Llama-3.1 scaling fields; transformers 5 moved both into `rope_parameters`."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf_config.get("rope_theta", ModelConfig.rope_theta))
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise errors.ConfigError(f"HF config has partial_rotary_factor={partial}; flaxalign rotates the whole head.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return dict(rope_theta=float(theta))
    if rope_type != "llama3":
        raise errors.ConfigError(
            f"HF rope scaling type {rope_type!r} is not supported; flaxalign implements 'default' and 'llama3'.")
    return dict(
        rope_theta=float(theta),
        rope_scaling_factor=float(rope["factor"]),
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        # transformers falls back to max_position_embeddings when the original length is not given
        rope_original_max_len=int(rope.get("original_max_position_embeddings",
                                           hf_config.get("max_position_embeddings", 8192))),
    )


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and where it lives in flaxalign's params; `hf_name` holds `{i}` for per-layer tensors."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _global_tensors(config: ModelConfig) -> list[_Tensor]:
    d, v = config.d_model, config.vocab_size
    specs = [
        _Tensor("model.embed_tokens.weight", ("embed",), (v, d), _identity, _identity),
        _Tensor("model.norm.weight", ("final_norm", "scale"), (d,), _identity, _identity),
    ]
    if not config.tie_embeddings:
        specs.append(_Tensor("lm_head.weight", ("lm_head",), (v, d), _transpose, _transpose))
    return specs


def _layer_tensors(config: ModelConfig) -> list[_Tensor]:
    d, f, hd = config.d_model, config.d_ff, config.head_dim
    h, k = config.n_heads, config.n_kv_heads

    def in_proj(name: str, heads: int) -> _Tensor:
        return _Tensor(f"model.layers.{{i}}.self_attn.{name}_proj.weight", ("attn", name), (heads * hd, d),
                       lambda w: w.T.reshape(d, heads, hd), lambda p: p.reshape(d, heads * hd).T)

    def bias(name: str, heads: int) -> _Tensor:
        return _Tensor(f"model.layers.{{i}}.self_attn.{name}_proj.bias", ("attn", f"{name}_bias"), (heads * hd,),
                       lambda b: b.reshape(heads, hd), lambda p: p.reshape(heads * hd))

    def mlp(name: str, hf_shape: tuple[int, int]) -> _Tensor:
        return _Tensor(f"model.layers.{{i}}.mlp.{name}_proj.weight", ("mlp", name), hf_shape, _transpose, _transpose)

    def norm(hf_norm: str, flax_norm: str) -> _Tensor:
        return _Tensor(f"model.layers.{{i}}.{hf_norm}.weight", (flax_norm, "scale"), (d,), _identity, _identity)

    specs = [
        in_proj("q", h), in_proj("k", k), in_proj("v", k),
        _Tensor("model.layers.{i}.self_attn.o_proj.weight", ("attn", "o"), (d, h * hd),
                lambda w: w.T.reshape(h, hd, d), lambda p: p.reshape(h * hd, d).T),
        mlp("gate", (f, d)), mlp("up", (f, d)), mlp("down", (d, f)),
        norm("input_layernorm", "attn_norm"), norm("post_attention_layernorm", "mlp_norm"),
    ]
    if config.qkv_bias:
        specs += [bias("q", h), bias("k", k), bias("v", k)]
    return specs


def params_from_hf_state_dict(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """flaxalign's nested float32 param dict (numpy, layers stacked) from an HF state dict of numpy arrays.

    Raises `CheckpointError` naming the first missing tensor, a tensor whose shape does not fit `config`, or
    tensors the model has no place for. Tolerated and dropped: rotary `inv_freq` buffers, an `lm_head.weight`
    equal to the embedding when embeddings are tied, and all-zero `o_proj.bias` (Llama `attention_bias=True`).
    """
    params: dict[str, Any] = {}
    used: set[str] = set()
    for spec in _global_tensors(config):
        _set(params, spec.path, spec.to_flax(_take(tensors, spec.hf_name, spec.hf_shape, used)))
    for spec in _layer_tensors(config):
        per_layer = [spec.to_flax(_take(tensors, spec.hf_name.format(i=i), spec.hf_shape, used))
                     for i in range(config.n_layers)]
        _set(params, ("layers",) + spec.path, np.stack(per_layer))
    _check_leftovers(config, tensors, used, params["embed"])
    return params


def params_to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The HF state dict (float32 numpy, HF names and layouts) of flaxalign params; the inverse of
    `params_from_hf_state_dict`. Tied models get no `lm_head.weight`, as in HF's own safetensors files."""
    out: dict[str, np.ndarray] = {}
    for spec in _global_tensors(config):
        out[spec.hf_name] = _contiguous(spec.to_hf(_get(params, spec.path)))
    for spec in _layer_tensors(config):
        stacked = _get(params, ("layers",) + spec.path)
        for i in range(config.n_layers):
            out[spec.hf_name.format(i=i)] = _contiguous(spec.to_hf(stacked[i]))
    return out


def _take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], used: set[str]) -> np.ndarray:
    if name not in tensors:
        raise errors.CheckpointError(f"HF checkpoint has no tensor {name!r}, which this model config needs.")
    value = np.asarray(tensors[name]).astype(np.float32)
    if value.shape != shape:
        raise errors.CheckpointError(
            f"HF tensor {name!r} has shape {value.shape}, but the model config needs {shape}.")
    used.add(name)
    return value


def _check_leftovers(config: ModelConfig, tensors: Mapping[str, np.ndarray], used: set[str],
                     embed: np.ndarray) -> None:
    """Refuses tensors that conversion would drop while they change the function the model computes."""
    unexpected = []
    for name in sorted(set(tensors) - used):
        value = np.asarray(tensors[name])
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            if not np.array_equal(value.astype(np.float32), embed):
                raise errors.CheckpointError(
                    "HF checkpoint has an lm_head.weight that differs from the embedding, but the model config "
                    "ties embeddings; set model.tie_embeddings=False.")
            continue
        if name.endswith("self_attn.o_proj.bias") and not np.any(value):
            continue  # Llama attention_bias=True; flaxalign has no o_proj bias, but a zero one is harmless
        unexpected.append(name)
    if unexpected:
        raise errors.CheckpointError(
            f"HF checkpoint has {len(unexpected)} tensor(s) that flaxalign's model has no place for, "
            f"e.g. {unexpected[:3]}.")


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            raise errors.CheckpointError(f"flaxalign params have no {'/'.join(path)!r}; does the config match?")
        tree = tree[key]
    return tree


def _contiguous(x: Any) -> np.ndarray:
    # safetensors refuses non-contiguous arrays, and transposes are views
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))

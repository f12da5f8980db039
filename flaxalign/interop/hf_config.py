"""Hugging Face `config.json` ↔ `ModelConfig`: which architectures map, how their fields (rope scaling, sliding
windows per layer, reward-model heads) read and write, and which settings are refused because they would change
the math silently. Pure functions on dicts; `hf.py` reads and writes the files and tensors."""

from collections.abc import Mapping
from typing import Any

from flaxalign import errors
from flaxalign.models.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# Reward models: the same decoder with a bias-free `score` Linear(d, 1) instead of the LM head.
SCORE_ARCHITECTURES = {"LlamaForSequenceClassification": "llama", "MistralForSequenceClassification": "mistral",
                       "Qwen2ForSequenceClassification": "qwen2"}
HF_DEFAULT_WINDOW = 4096  # MistralConfig / Qwen2Config's sliding_window when config.json has none
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2Config's default
SCORE_BIAS_FIELD = "flaxalign_score_bias"  # HF's score layer has no bias; ours is kept in config.json under this key


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of an HF `config.json` dict (transformers 4.x or 5.x spelling).

    Maps hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    max_position_embeddings, rms_norm_eps, tie_word_embeddings, vocab_size, initializer_range, rope_theta (top
    level in 4.x, `rope_parameters["rope_theta"]` in 5.x) and "llama3" rope scaling. Qwen2 always has q/k/v
    biases; Llama's `attention_bias` turns them on too (its o_proj bias must then be zero, see
    `params_from_hf_state_dict`).

    Sliding windows as transformers applies them: Mistral's `sliding_window` on every layer; Qwen2's when
    `use_sliding_window` is set, on the layers from `max_window_layers` on (or as its `layer_types` list says),
    the others attending in full.

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
        qkv_bias=_model_type(arch) == "qwen2" or bool(hf_config.get("attention_bias", False)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=hf_config.get("initializer_range", ModelConfig.init_std),
        **_rope_fields(hf_config),
        **_window_fields(hf_config, _model_type(arch)),
    )


def _window_fields(hf_config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`sliding_window` / `full_attention_layers` of an HF config, with transformers' defaults (see
    `model_config_from_hf`). Mistral ignores `layer_types` (transformers warns and windows every layer)."""
    if model_type == "llama":
        return {}
    window = hf_config.get("sliding_window", HF_DEFAULT_WINDOW)
    n_layers = hf_config["num_hidden_layers"]
    if not window or (model_type == "qwen2" and not hf_config.get("use_sliding_window", False)):
        return {}
    if model_type == "mistral":
        return {"sliding_window": int(window)}
    kinds = hf_config.get("layer_types")
    if kinds is None:
        first = hf_config.get("max_window_layers", QWEN2_DEFAULT_MAX_WINDOW_LAYERS)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != n_layers:
        raise errors.ConfigError(f"HF config has layer_types {unknown or kinds}; flaxalign's layers attend in full or "
                                 "in a sliding window ('full_attention', 'sliding_attention'), one per layer.")
    full = tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
    if len(full) == n_layers:
        return {}
    return {"sliding_window": int(window), "full_attention_layers": full}


def _architecture(hf_config: Mapping[str, Any]) -> str:
    """The architecture name, from `architectures` (saved checkpoints) or `model_type` (configs built in code)."""
    names = hf_config.get("architectures") or []
    by_type = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
    arch = names[0] if names else by_type.get(hf_config.get("model_type", ""), hf_config.get("model_type"))
    if arch not in ARCHITECTURES and arch not in SCORE_ARCHITECTURES:
        raise errors.ConfigError(
            f"HF architecture {arch!r} is not supported; flaxalign converts "
            f"{sorted(ARCHITECTURES) + sorted(SCORE_ARCHITECTURES)}.")
    return arch


def _model_type(arch: str) -> str:
    return {**ARCHITECTURES, **SCORE_ARCHITECTURES}[arch]


def is_score_model(hf_config: Mapping[str, Any]) -> bool:
    """Whether an HF config is a `*ForSequenceClassification` model (a reward model: one score per sequence)."""
    arch = _architecture(hf_config)
    if arch in SCORE_ARCHITECTURES and hf_config.get("num_labels", len(hf_config.get("id2label") or [0])) != 1:
        raise errors.ConfigError(f"HF {arch} has {hf_config.get('num_labels')} labels; a reward model has one.")
    return arch in SCORE_ARCHITECTURES


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


def hf_config_dict(config: ModelConfig, *, score: bool = False) -> dict[str, Any]:
    """The transformers config.json dict of `config`: the inverse of `model_config_from_hf`. Models with q/k/v
    biases are written as Qwen2, windowed ones without as Mistral, all others as Llama (`*ForSequenceClassification`
    with one label when `score`). Both rope spellings are written (`rope_theta` / `rope_scaling` for transformers 4,
    `rope_parameters` for 5). Settings these architectures cannot state (an attention soft cap, a window pattern
    other than theirs) are refused in one line rather than dropped."""
    if config.attn_softcap:
        raise errors.ConfigError(f"model.attn_softcap={config.attn_softcap} cannot be written as a Llama, Mistral or "
                                 "Qwen2 HF model (their attention has no soft cap); the exported model would differ.")
    windowed = any(config.layer_windows())
    arch = "Qwen2ForCausalLM" if config.qkv_bias else "MistralForCausalLM" if windowed else "LlamaForCausalLM"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_factor:
        rope.update(rope_type="llama3", factor=config.rope_scaling_factor,
                    low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_len)
    out = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "rope_theta": config.rope_theta, "rope_parameters": rope, "torch_dtype": "float32", "use_cache": True,
    }
    if config.rope_scaling_factor:
        out["rope_scaling"] = dict(rope)
    out.update(_hf_window_fields(config, arch))
    if score:
        out.update(architectures=[arch.replace("ForCausalLM", "ForSequenceClassification")], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


def _hf_window_fields(config: ModelConfig, arch: str) -> dict[str, Any]:
    """The sliding-window fields of an exported config.json; a layer pattern the architecture cannot state is
    refused in one line."""
    windows = config.layer_windows()
    if not any(windows):  # no window, or every layer listed in full_attention_layers
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layers} if (
            arch == "Qwen2ForCausalLM") else {}
    if arch == "MistralForCausalLM":
        if config.full_attention_layers:
            raise errors.ConfigError(f"a model whose layers {list(config.full_attention_layers)} attend in full and "
                                     "the others in a window cannot be written as a Mistral (Llama) HF model.")
        return {"sliding_window": config.sliding_window}
    first = windows.index(config.sliding_window)
    if any(w != (config.sliding_window if i >= first else 0) for i, w in enumerate(windows)):
        raise errors.ConfigError(f"Qwen2 HF models window the layers from max_window_layers on; layers "
                                 f"{list(config.full_attention_layers)} attending in full cannot be written so.")
    kinds = ["full_attention" if w == 0 else "sliding_attention" for w in windows]
    return {"use_sliding_window": True, "sliding_window": config.sliding_window, "max_window_layers": first,
            "layer_types": kinds}

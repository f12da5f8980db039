"""Hugging Face `config.json` ↔ `ModelConfig`: which architectures map, how their fields (rope scaling, sliding
windows per layer, reward-model heads) read and write, and which settings are refused because they would change
the math silently. Pure functions on dicts; `hf.py` reads and writes the files and tensors.

Families (`models.families`) other than Llama bring their own mapping (`config_from_hf` / `config_to_hf`, e.g.
`models/gemma.py`); this module maps the fields every family shares and dispatches by `model_type` and
`model.family`. One `ModelConfig` stands for Llama, Mistral, Qwen2 and Qwen3 alike, so what an export needs beyond
it — the family the model came from, its bos / eos / pad ids, how the family spells its windows — is taken from the
source's config.json (`source_fields`, or `gguf_source_fields` for a GGUF file), kept in run metadata under
`SOURCE_FIELD` and given back to `hf_config_dict`, which alone decides the class written."""

from collections.abc import Mapping, Sequence
from typing import Any

from flaxalign import errors
from flaxalign.models import families
from flaxalign.models.config import ADAPTER_FIELDS, ModelConfig

# HF class -> model_type, from each family's `hf_classes` (`models.families`): causal LMs, and reward models (the
# same decoder with a bias-free `score` Linear(d, 1) instead of the LM head).
ARCHITECTURES = {classes[0]: model_type for f in families.FAMILIES.values()
                 for model_type, classes in f.hf_classes.items()}
SCORE_ARCHITECTURES = {classes[1]: model_type for f in families.FAMILIES.values()
                       for model_type, classes in f.hf_classes.items()}
HF_DEFAULT_WINDOW = 4096  # MistralConfig / Qwen2Config's sliding_window when config.json has none
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2Config's default
SCORE_BIAS_FIELD = "flaxalign_score_bias"  # HF's score layer has no bias; ours is kept in config.json under this key
QWEN_TYPES = ("qwen2", "qwen3")  # the families that spell windows with use_sliding_window / max_window_layers
MODEL_TYPES = {model_type: arch for arch, model_type in ARCHITECTURES.items()}  # "mistral" -> "MistralForCausalLM"
SCORE_CLASSES = {model_type: arch for arch, model_type in SCORE_ARCHITECTURES.items()}
QWEN_ARCHITECTURES = tuple(MODEL_TYPES[t] for t in QWEN_TYPES)
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",  # GGUF general.architecture -> HF
                      "gemma2": "gemma2", "gemma3": "gemma3_text",  # model_type (interop.gguf.ARCHITECTURES reads
                      "phi3": "phi3"}  # these)
# What run metadata keeps of the HF config.json (or GGUF file) a model came from (`source_fields`), under this key:
SOURCE_FIELD = "hf_source"
ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # no effect on the forward pass
# How a family spells its windows; written back from the source only where they state the same windows
SPELLING_FIELDS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of an HF `config.json` dict (transformers 4.x or 5.x spelling).

    Maps hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    max_position_embeddings, rms_norm_eps, tie_word_embeddings, vocab_size, initializer_range, rope_theta (top
    level in 4.x, `rope_parameters["rope_theta"]` in 5.x) and "llama3" rope scaling. Qwen2 always has q/k/v
    biases; Llama's and Qwen3's `attention_bias` turns them on too (Llama's o_proj bias must then be zero, see
    `params_from_hf_state_dict`). Qwen3 normalises each query and key head (`qk_norm`).

    Sliding windows as transformers applies them: Mistral's `sliding_window` on every layer; Qwen2's and Qwen3's when
    `use_sliding_window` is set, on the layers from `max_window_layers` on (or as its `layer_types` list says),
    the others attending in full.

    Raises `ConfigError` for other architectures and for settings that would change the math silently (an
    activation other than silu, MLP biases, partial rotary, rope scaling other than "llama3"). Another family's
    config.json (Gemma 3: `gemma3_text`) is mapped by that family's `config_from_hf`, given the shared fields.
    """
    arch = _architecture(hf_config)
    model_type = _model_type(arch)
    family = families.FAMILIES[families.of_hf_type(model_type)]
    shared = _shared_fields(hf_config)
    if family.config_from_hf is not None:
        return ModelConfig(**family.config_from_hf(hf_config, shared))
    if hf_config.get("hidden_act", "silu") != "silu":
        raise errors.ConfigError(
            f"HF config has hidden_act={hf_config['hidden_act']!r}; flaxalign's MLP is SwiGLU (silu) only.")
    if hf_config.get("mlp_bias", False):
        raise errors.ConfigError("HF config has mlp_bias=True; flaxalign's MLP has no biases.")
    return ModelConfig(
        **shared,
        qkv_bias=model_type == "qwen2" or bool(hf_config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        **_rope_fields(hf_config),
        **_window_fields(hf_config, model_type),
    )


def _shared_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields every family's config.json states alike: shapes, eps, tying, init scale."""
    d_model = _require(hf_config, "hidden_size")
    n_heads = _require(hf_config, "num_attention_heads")
    return dict(
        vocab_size=_require(hf_config, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf_config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,  # absent in old configs = multi-head
        d_ff=_require(hf_config, "intermediate_size"),
        head_dim=hf_config.get("head_dim") or d_model // n_heads,
        max_seq_len=hf_config.get("max_position_embeddings", ModelConfig.max_seq_len),
        rms_eps=hf_config.get("rms_norm_eps", 1e-6),  # the transformers default of all these families
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=hf_config.get("initializer_range", ModelConfig.init_std),
    )


def _window_fields(hf_config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`sliding_window` / `full_attention_layers` of an HF config, with transformers' defaults (see
    `model_config_from_hf`). Mistral ignores `layer_types` (transformers warns and windows every layer)."""
    if model_type == "llama":
        return {}
    window = hf_config.get("sliding_window", HF_DEFAULT_WINDOW)
    n_layers = hf_config["num_hidden_layers"]
    if not window or (model_type in QWEN_TYPES and not hf_config.get("use_sliding_window", False)):
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
    arch = names[0] if names else MODEL_TYPES.get(hf_config.get("model_type", ""), hf_config.get("model_type"))
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


def source_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """What an HF export needs from the config.json a model came from that `ModelConfig` does not state: its family
    (`model_type`, and the `architecture` class it was saved as), its bos / eos / pad ids and the family's spelling of
    its windows (`SPELLING_FIELDS`). Runs keep it in their metadata under `SOURCE_FIELD`, from the pretrained source
    on (`interop.pretrained.metadata`), and `hf_config_dict(source=...)` writes it back."""
    arch = _architecture(hf_config)
    kept = {key: hf_config[key] for key in ID_FIELDS + SPELLING_FIELDS if key in hf_config}
    return {"architecture": arch, "model_type": _model_type(arch), **kept}


def gguf_source_fields(gguf_architecture: str) -> dict[str, Any]:
    """`source_fields` of a GGUF file whose `general.architecture` is `gguf_architecture` ("llama", "qwen2"): the HF
    family of that name (its ids are its tokenizer's, which an export writes)."""
    model_type = GGUF_ARCHITECTURES.get(gguf_architecture)
    if model_type is None:
        raise errors.ConfigError(f"GGUF architecture {gguf_architecture!r} has no HF class flaxalign writes; known: "
                                 f"{sorted(GGUF_ARCHITECTURES)}.")
    return {"architecture": MODEL_TYPES[model_type], "model_type": model_type}


def hf_config_dict(config: ModelConfig, *, score: bool = False, source: Mapping[str, Any] | None = None,
                   ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The transformers config.json dict of `config`: the inverse of `model_config_from_hf`, and the one place that
    decides the architecture written.

    With `source` (`source_fields` of the HF config.json or GGUF file the model came from, as run metadata keeps it)
    the model is written as that family whenever the family can state it — a Mistral stays `MistralForCausalLM`, a
    Llama with q/k/v biases stays a Llama (`attention_bias`) — with the source's bos / eos / pad ids and its spelling
    of the windows (`SPELLING_FIELDS`, taken only where they state the same windows). Without one, or for a model
    its family cannot state, models with q/k/v biases are written as Qwen2, windowed ones without as Mistral, all
    others as Llama; a model of another family (`model.family`) as that family's class (Gemma: Gemma3ForCausalLM
    with q/k norms, Gemma2ForCausalLM without).
    `ids` ({"bos_token_id": ..., ...}, e.g. the tokenizer's) fill in the ids the source does not
    state. `*ForSequenceClassification` with one label when `score`. Both rope spellings are written (`rope_theta`
    / `rope_scaling` for transformers 4, `rope_parameters` for 5). Settings these architectures cannot state (an
    attention or final logit soft cap outside Gemma 2, a window pattern other than theirs) are refused in one line
    rather than dropped; whatever is written is read back with `model_config_from_hf` and must give the same
    model."""
    source = dict(source or {})
    model_types = families.family(config).hf_classes
    family = source.get("model_type") if source.get("model_type") in model_types else None
    if config.family == "llama":
        inferred = ("qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else
                    "mistral" if any(config.layer_windows()) else "llama")
    else:
        inferred = next(iter(model_types))
    try:
        out = _family_config(config, family, source) if family else None
    except errors.ConfigError:
        out = None  # the source's family cannot state this model (its fields were changed): the inferred one
    if out is None:
        out = _family_config(config, inferred, source if inferred == family else {})
    out.update({key: source[key] for key in ID_FIELDS if source.get(key) is not None})
    out.update({key: int(value) for key, value in (ids or {}).items()
                if key in ID_FIELDS and value is not None and out.get(key) is None})
    if score:
        out.update(architectures=[SCORE_CLASSES[out["model_type"]]], num_labels=1, id2label={"0": "LABEL_0"},
                   label2id={"LABEL_0": 0})
    return out


def _family_config(config: ModelConfig, model_type: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of `config` as a `model_type` causal LM, the windows spelled as `source` spells them where that
    states the same windows; `ConfigError` when the family cannot state the model."""
    arch = MODEL_TYPES[model_type]
    family = families.FAMILIES[families.of_hf_type(model_type)]
    shared = {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "attention_dropout": 0.0, "torch_dtype": "float32", "use_cache": True,
    }
    if family.config_to_hf is not None:
        written, refusal = family.config_to_hf(config, shared), None
    else:
        written, refusal = _llama_family_config(config, model_type, shared)
    spelled = {**written, **{key: source[key] for key in SPELLING_FIELDS if key in source}}
    if spelled != written and _states(spelled, config):
        return spelled
    if refusal is not None:
        raise refusal
    if not _states(written, config):
        differ = _differing(written, config)
        raise errors.ConfigError(f"this model cannot be written as an HF {arch} (read back, it would differ"
                                 f"{' in model.' + ', model.'.join(differ) if differ else ''}).")
    return written


def _llama_family_config(config: ModelConfig, model_type: str, shared: dict[str, Any]
                         ) -> tuple[dict[str, Any], errors.ConfigError | None]:
    """(config.json of a Llama-family `model_type`, the refusal of its window fields or None)."""
    arch = MODEL_TYPES[model_type]
    for name in ("attn_softcap", "final_softcap"):
        if getattr(config, name):
            raise errors.ConfigError(f"model.{name}={getattr(config, name)} cannot be written as a Llama, Mistral, "
                                     "Qwen2 or Qwen3 HF model (they have no logit soft caps); the exported model "
                                     "would differ.")
    if (model_type == "qwen2" and not config.qkv_bias) or (model_type == "mistral" and config.qkv_bias):
        raise errors.ConfigError(f"{arch} {'always has' if model_type == 'qwen2' else 'has no'} q/k/v biases; "
                                 f"model.qkv_bias={config.qkv_bias}.")
    if config.qk_norm != (model_type == "qwen3"):
        raise errors.ConfigError(f"{arch} {'always has' if model_type == 'qwen3' else 'has no'} q/k norms; "
                                 f"model.qk_norm={config.qk_norm}.")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_factor:
        rope.update(rope_type="llama3", factor=config.rope_scaling_factor,
                    low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_len)
    out = {"architectures": [arch], "model_type": model_type, **shared, "hidden_act": "silu",
           "rope_theta": config.rope_theta, "rope_parameters": rope}
    if model_type == "llama":  # its q/k/v biases come with an o_proj bias (written as zeros by `hf.save_hf`)
        out.update(attention_bias=config.qkv_bias, mlp_bias=False)
    if model_type == "qwen3":
        out.update(attention_bias=config.qkv_bias)
    if config.rope_scaling_factor:
        out["rope_scaling"] = dict(rope)
    try:
        return {**out, **_hf_window_fields(config, arch)}, None
    except errors.ConfigError as e:
        return out, e


def _states(hf_config: Mapping[str, Any], config: ModelConfig) -> bool:
    """Whether `hf_config` reads back (`model_config_from_hf`) as a model computing what `config` computes."""
    try:
        return _forward_fields(model_config_from_hf(hf_config)) == _forward_fields(config)
    except errors.ConfigError:
        return False


def _differing(hf_config: Mapping[str, Any], config: ModelConfig) -> list[str]:
    """The forward fields (`_forward_fields`) in which `hf_config`, read back, differs from `config`."""
    try:
        back = _forward_fields(model_config_from_hf(hf_config))
    except errors.ConfigError:
        return []
    ours = _forward_fields(config)
    return sorted(key for key in ours.keys() | back.keys() if ours.get(key) != back.get(key))


def _forward_fields(config: ModelConfig) -> dict[str, Any]:
    """The `ModelConfig` fields an HF config.json states, windows as each layer's (`layer_windows`), rope scaling
    only when on."""
    out = {key: value for key, value in config.checkpoint_identity().items()
           if key not in ("sliding_window", "full_attention_layers") and key not in ADAPTER_FIELDS}
    if not config.rope_scaling_factor:
        for key in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
            out.pop(key)
    return {**out, "layer_windows": config.layer_windows()}


def generation_config_dict(hf_config: Mapping[str, Any], stop_ids: Sequence[int] = ()) -> dict[str, Any]:
    """generation_config.json of an exported causal LM: the bos / pad ids of its config.json (`hf_config`) and an eos
    list that holds its eos id(s), then `stop_ids` (end-of-turn tokens, e.g. `chat.end_of_turn_ids`), so that
    transformers' `generate()` stops at any of them (one id is written as an int)."""
    eos = hf_config.get("eos_token_id")
    stops = list(dict.fromkeys([*(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                                *(int(i) for i in stop_ids)]))
    return {"bos_token_id": hf_config.get("bos_token_id"),
            "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
            "pad_token_id": hf_config.get("pad_token_id"), "_from_model_config": False}


def _hf_window_fields(config: ModelConfig, arch: str) -> dict[str, Any]:
    """The sliding-window fields of an exported config.json; a layer pattern the architecture cannot state is
    refused in one line."""
    windows = config.layer_windows()
    if not any(windows):  # no window, or every layer listed in full_attention_layers
        if arch in QWEN_ARCHITECTURES:
            return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layers}
        return {"sliding_window": None} if arch == "MistralForCausalLM" else {}
    if arch == "LlamaForCausalLM":
        raise errors.ConfigError("a model with sliding windows cannot be written as a Llama HF model.")
    if arch == "MistralForCausalLM":
        if config.full_attention_layers:
            raise errors.ConfigError(f"a model whose layers {list(config.full_attention_layers)} attend in full and "
                                     "the others in a window cannot be written as a Mistral (Llama) HF model.")
        return {"sliding_window": config.sliding_window}
    first = windows.index(config.sliding_window)
    if any(w != (config.sliding_window if i >= first else 0) for i, w in enumerate(windows)):
        raise errors.ConfigError(f"Qwen2 / Qwen3 HF models window the layers from max_window_layers on; layers "
                                 f"{list(config.full_attention_layers)} attending in full cannot be written so.")
    kinds = ["full_attention" if w == 0 else "sliding_attention" for w in windows]
    return {"use_sliding_window": True, "sliding_window": config.sliding_window, "max_window_layers": first,
            "layer_types": kinds}

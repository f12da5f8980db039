"""Gemma 2 and Gemma 3 (text) in Flax NNX: the Llama decoder (`models/llama.py`) with Gemma's pieces, its HF tensor
table and its config.json mapping — everything the family states (`models.families`).

What differs from Llama, all implied by `model.family = "gemma"`:
- RMSNorm y = x / rms(x) · (1 + w) in float32, w initialised to 0 (on the layer norms, the final norm and the q/k
  norms);
- four norms per layer: x ← x + post_attn_norm(attn(attn_norm(x))); x ← x + post_mlp_norm(mlp(mlp_norm(x)));
- GeGLU: down(gelu_tanh(gate·x) ⊙ up·x);
- token embeddings scaled by √d_model, the factor cast to the compute dtype first (HF's
  `Gemma3TextScaledWordEmbedding`).
Numeric fields of `ModelConfig` that Gemma sets and any family may use: `query_pre_attn_scalar` (scores
q·k/√scalar), `rope_local_theta` (the RoPE base of windowed layers), `qk_norm` (always on in Gemma 3), the windows
(`sliding_window`, `full_attention_layers`: the global layers).

Gemma 2 is the same module with other flags: no q/k norms, one RoPE base, every other layer windowed (layers 1, 3,
… global), attention logits soft-capped (`attn_softcap`, 50) and the output logits too (`final_softcap`, 30: the
LM-head object, `models.lm_head`). Its config.json (`gemma2`) is told from Gemma 3's (`gemma3_text`) by the class
named; a model is written as Gemma 2 when it has no q/k norms (Gemma 3 always has them).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flaxalign import errors
from flaxalign.models import llama, remat
from flaxalign.models.config import ModelConfig
from flaxalign.models.tensors import HFTensor


class RMSNorm(llama.RMSNorm):
    """y = x / sqrt(mean(x²) + eps) · (1 + scale), in float32; scale starts at 0."""

    initial_scale = 0.0

    def weight(self):
        return 1.0 + self.scale[...]


class Attention(llama.Attention):
    norm = RMSNorm


class MLP(llama.MLP):
    """GeGLU: down(gelu_tanh(gate·x) ⊙ up·x)."""

    act = staticmethod(lambda x: jax.nn.gelu(x, approximate=True))


class DecoderLayer(llama.DecoderLayer):
    """Llama's layer with Gemma's norms, GeGLU, and a norm on each sub-layer's output before the residual add."""

    norm = RMSNorm
    attention = Attention
    mlp_class = MLP

    def __init__(self, config: ModelConfig, rngs, *, stack=()):
        super().__init__(config, rngs, stack=stack)
        self.post_attn_norm = RMSNorm(config.d_model, config.rms_eps, stack=stack)
        self.post_mlp_norm = RMSNorm(config.d_model, config.rms_eps, stack=stack)

    def post_attn(self, x):
        return self.post_attn_norm(remat.keep("sublayer_out", x))

    def post_mlp(self, x):
        return self.post_mlp_norm(remat.keep("sublayer_out", x))


class CausalLM(llama.CausalLM):
    """Gemma 3's decoder: the `llama.CausalLM` interface, with Gemma's layers, final norm and embedding scale."""

    layer = DecoderLayer
    norm = RMSNorm

    def embed_tokens(self, tokens_BxT):
        dtype = self.config.dtype
        return super().embed_tokens(tokens_BxT) * jnp.asarray(self.config.d_model ** 0.5, dtype)


# --- the HF tensor table ----------------------------------------------------------------------------------------

# (HF name, flax name) of the four layer norms, in HF order
LAYER_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attn_norm"),
               ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "post_mlp_norm"))


def global_tensors(config: ModelConfig, score: bool = False) -> list[HFTensor]:
    """As Llama's: embedding, final norm, the LM head when untied or a reward model's score row."""
    return llama.global_tensors(config, score)


def layer_tensors(config: ModelConfig) -> list[HFTensor]:
    """Llama's layer table with the four Gemma norms (q/k norms when `qk_norm`, as Gemma 3 always has)."""
    return llama.layer_tensors(config, norms=LAYER_NORMS)


# --- the HF config.json mapping (`interop.hf_config` calls these with the fields every family shares) -------------

HF_CLASSES = {"gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
              "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification")}
GEMMA2_CLASSES = HF_CLASSES["gemma2"]
KINDS = ("sliding_attention", "full_attention")  # HF layer_types
HF_DEFAULT_WINDOW = 4096  # Gemma3TextConfig's sliding_window default
HF_DEFAULT_PATTERN = 6  # transformers' sliding_window_pattern default: every 6th layer is global
GEMMA2_PATTERN = 2  # Gemma2Config's layer_types default: every 2nd layer (1, 3, …) global
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}  # Gemma2Config's defaults
GEMMA2_DEFAULT_THETA = 10_000.0
HF_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
ACTIVATION = "gelu_pytorch_tanh"


def is_gemma2(hf_config: Mapping[str, Any]) -> bool:
    """Whether a gemma-family config.json is Gemma 2's (its class, else its model_type)."""
    names = hf_config.get("architectures") or []
    return names[0] in GEMMA2_CLASSES if names else hf_config.get("model_type") == "gemma2"


def config_from_hf(hf_config: Mapping[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """`ModelConfig` fields of a `gemma3_text` or `gemma2` config.json, given the `shared` ones (shapes, eps, tying,
    init); `ConfigError` in one line for what flaxalign's Gemma does not compute (Gemma 3 logit soft caps, another
    activation, bidirectional attention, attention biases, rope scaling, a layer kind other than sliding / full)."""
    gemma2 = is_gemma2(hf_config)
    if not gemma2:
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf_config.get(key) is not None:
                raise errors.ConfigError(f"HF Gemma 3 config has {key}={hf_config[key]}; flaxalign's Gemma 3 has no "
                                         "logit soft cap (null is supported; Gemma 2 has them).")
    activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or ACTIVATION
    if activation != ACTIVATION:
        raise errors.ConfigError(f"HF Gemma config has hidden_activation={activation!r}; flaxalign's Gemma MLP is "
                                 f"{ACTIVATION!r} only.")
    for key in ("use_bidirectional_attention", "attention_bias"):
        if hf_config.get(key):
            raise errors.ConfigError(f"HF Gemma config has {key}=true; flaxalign's Gemma supports false only.")
    if gemma2:
        caps = {key: hf_config.get(key, default) or 0.0 for key, default in GEMMA2_SOFTCAPS.items()}
        variant = dict(qk_norm=False, rope_theta=_gemma2_rope_from_hf(hf_config),
                       attn_softcap=float(caps["attn_logit_softcapping"]),
                       final_softcap=float(caps["final_logit_softcapping"]),
                       **_windows_from_hf(hf_config, shared["n_layers"], GEMMA2_PATTERN))
    else:
        variant = dict(qk_norm=True, **_rope_from_hf(hf_config), **_windows_from_hf(hf_config, shared["n_layers"]))
    return dict(shared, family="gemma", **variant,
                tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)),  # both configs' default
                query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar", 256)))


def _gemma2_rope_from_hf(hf_config: Mapping[str, Any]) -> float:
    """Gemma 2's one RoPE base: transformers 5's `rope_parameters`, or 4.x's rope_theta / rope_scaling."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise errors.ConfigError(f"HF Gemma 2 config has rope {params}; flaxalign's Gemma implements rope_type "
                                 "'default' (no scaling, whole head) only.")
    return float(params.get("rope_theta") or hf_config.get("rope_theta") or GEMMA2_DEFAULT_THETA)


def _rope_from_hf(hf_config: Mapping[str, Any]) -> dict[str, float]:
    """rope_theta (global layers) and rope_local_theta (windowed ones): transformers 5's per-kind
    `rope_parameters`, or 4.x's rope_theta / rope_local_base_freq / rope_scaling."""
    rope = hf_config.get("rope_parameters")
    if isinstance(rope, Mapping) and set(rope) & set(KINDS):
        per_kind = {kind: dict(rope.get(kind) or {}) for kind in KINDS}
    else:
        per_kind = {"full_attention": dict(hf_config.get("rope_scaling") or rope or {}),
                    "sliding_attention": {}}
        per_kind["full_attention"].setdefault("rope_theta", hf_config.get("rope_theta"))
        per_kind["sliding_attention"]["rope_theta"] = hf_config.get("rope_local_base_freq")
    for kind, params in per_kind.items():
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise errors.ConfigError(f"HF Gemma config has rope {params} on its {kind} layers; flaxalign's Gemma "
                                     "implements rope_type 'default' (no scaling, whole head) only.")
    theta = {kind: float(per_kind[kind].get("rope_theta") or HF_DEFAULT_THETA[kind]) for kind in KINDS}
    return {"rope_theta": theta["full_attention"], "rope_local_theta": theta["sliding_attention"]}


def _windows_from_hf(hf_config: Mapping[str, Any], n_layers: int, pattern: int = HF_DEFAULT_PATTERN
                     ) -> dict[str, Any]:
    """`sliding_window` / `full_attention_layers` from `layer_types`, else from (`_`)`sliding_window_pattern`, else
    every `pattern`-th layer global."""
    kinds = hf_config.get("layer_types")
    if kinds is None:
        pattern = (hf_config.get("sliding_window_pattern") or hf_config.get("_sliding_window_pattern")
                   or pattern)
        kinds = [KINDS[1] if (i + 1) % pattern == 0 else KINDS[0] for i in range(n_layers)]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or len(kinds) != n_layers:
        raise errors.ConfigError(f"HF Gemma config has layer_types {unknown or kinds}; flaxalign's layers attend in "
                                 f"full or in a sliding window ({list(KINDS)}), one per layer.")
    window = hf_config.get("sliding_window", HF_DEFAULT_WINDOW)
    full = tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
    if not window or len(full) == n_layers:
        return {}
    return {"sliding_window": int(window), "full_attention_layers": full}


def config_to_hf(config: ModelConfig, shared: dict[str, Any]) -> dict[str, Any]:
    """The `Gemma3ForCausalLM` config.json of `config` (q/k norms) or its `Gemma2ForCausalLM` one (none), given the
    `shared` fields; `ConfigError` for what the class cannot state."""
    if config.qkv_bias or config.rope_scaling_factor:
        raise errors.ConfigError("a Gemma HF model has no q/k/v biases and no rope scaling; "
                                 f"model.qkv_bias={config.qkv_bias}, "
                                 f"model.rope_scaling_factor={config.rope_scaling_factor}.")
    kinds = [KINDS[0] if window else KINDS[1] for window in config.layer_windows()]
    scalar = config.query_pre_attn_scalar or config.head_dim
    scalar = int(scalar) if float(scalar).is_integer() else scalar  # Gemma2/3 configs (strict) type it int
    common = {**shared, "hidden_activation": ACTIVATION, "query_pre_attn_scalar": scalar,
              "sliding_window": config.sliding_window or None, "layer_types": kinds, "attention_bias": False,
              "use_bidirectional_attention": False}
    if not config.qk_norm:
        return _gemma2_config(config, common)
    if config.attn_softcap or config.final_softcap:
        raise errors.ConfigError(f"a Gemma 3 HF model (q/k norms) has no logit soft caps; model.attn_softcap="
                                 f"{config.attn_softcap}, model.final_softcap={config.final_softcap}.")
    local_theta = config.rope_local_theta or config.rope_theta
    return {
        **common, "architectures": [HF_CLASSES["gemma3_text"][0]], "model_type": "gemma3_text",
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "rope_theta": config.rope_theta, "rope_local_base_freq": local_theta,  # transformers 4.x
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }


def _gemma2_config(config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """The `Gemma2ForCausalLM` config.json: one RoPE base, the soft caps (null when off)."""
    if config.rope_local_theta:
        raise errors.ConfigError(f"a Gemma 2 HF model has one RoPE base for all layers; model.rope_local_theta="
                                 f"{config.rope_local_theta} ≠ model.rope_theta={config.rope_theta}.")
    return {
        **common, "architectures": [GEMMA2_CLASSES[0]], "model_type": "gemma2",
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # transformers 4.x
        "attn_logit_softcapping": config.attn_softcap or None, "final_logit_softcapping": config.final_softcap or None,
    }

"""Phi-3 (transformers `Phi3ForCausalLM`, model_type `phi3`): the Llama decoder (`models/llama.py`'s `CausalLM`,
unchanged) with Phi-3's HF tensor table and config.json mapping — everything the family states
(`models.families`).

Phi-3 computes what a Llama with a window on every layer computes (RMSNorm, SwiGLU, rotate-half RoPE, no biases;
its `sliding_window` masks keys ≤ q - window on every layer, as Mistral's does). Its checkpoints fuse tensors:

    model.layers.{i}.self_attn.qkv_proj.weight  [(H + 2K)·hd, D]  rows: q (H·hd), k (K·hd), v (K·hd)
    model.layers.{i}.mlp.gate_up_proj.weight    [2F, D]           rows: gate (F), up (F)

each part a slice of the fused tensor's rows (`models.tensors.HFTensor.rows`) laid out as Llama's own q / k / v /
gate / up tensor, so reading (also a shard's region) and writing go through the same table. Refused in one line:
rope scaling (`longrope` / `su` / `yarn`: the 128k models), partial rotary, another activation, attention / MLP
biases. Training dropouts (`resid_pdrop`, `embd_pdrop`, `attention_dropout`) are not read: flaxalign trains
without dropout.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from flaxalign import errors
from flaxalign.models import llama
from flaxalign.models.config import ModelConfig
from flaxalign.models.tensors import HFTensor

CausalLM = llama.CausalLM
HF_CLASSES = {"phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification")}
HF_DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0}  # Phi3Config's
QKV = "model.layers.{i}.self_attn.qkv_proj.weight"
GATE_UP = "model.layers.{i}.mlp.gate_up_proj.weight"
FUSED = {QKV: (("attn", "q"), ("attn", "k"), ("attn", "v")), GATE_UP: (("mlp", "gate"), ("mlp", "up"))}

global_tensors = llama.global_tensors


def layer_tensors(config: ModelConfig) -> list[HFTensor]:
    """Llama's layer table with q / k / v as row parts of `qkv_proj` and gate / up as row parts of `gate_up_proj`,
    in HF order."""
    specs = llama.layer_tensors(config)
    by_path = {spec.path: spec for spec in specs}
    out: list[HFTensor] = []
    for spec in specs:
        fused = next((name for name, parts in FUSED.items() if spec.path in parts), None)
        if fused is None:
            out.append(spec)
        elif spec.path == FUSED[fused][0]:  # the first part: all of them, here
            start = 0
            for path in FUSED[fused]:
                part = by_path[path]
                out.append(dataclasses.replace(part, hf_name=fused, rows=slice(start, start + part.hf_shape[0])))
                start += part.hf_shape[0]
    return out


def config_from_hf(hf_config: Mapping[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """`ModelConfig` fields of a `phi3` config.json, given the `shared` ones (shapes, tying, init); `ConfigError` in
    one line naming the field for what flaxalign's Phi-3 does not compute."""
    if hf_config.get("hidden_act", "silu") != "silu":
        raise errors.ConfigError(f"HF Phi-3 config has hidden_act={hf_config['hidden_act']!r}; flaxalign's Phi-3 MLP "
                                 "is 'silu' (SwiGLU) only.")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise errors.ConfigError(f"HF Phi-3 config has {key}=true; flaxalign's Phi-3 supports false only.")
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    field = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise errors.ConfigError(f"HF Phi-3 config has {field} of type {rope_type!r}; flaxalign's Phi-3 supports "
                                 "rope_type 'default' (rope_scaling null) only.")
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise errors.ConfigError(f"HF Phi-3 config has partial_rotary_factor={partial}; flaxalign's Phi-3 supports "
                                 "1.0 (the whole head rotated) only.")
    theta = rope.get("rope_theta", hf_config.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    window = hf_config.get("sliding_window")  # Phi3Config's default: none
    return dict(shared, family="phi3", rope_theta=float(theta),
                rms_eps=hf_config.get("rms_norm_eps", HF_DEFAULTS["rms_norm_eps"]),
                max_seq_len=hf_config.get("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"]),
                **({"sliding_window": int(window)} if window else {}))


def config_to_hf(config: ModelConfig, shared: dict[str, Any]) -> dict[str, Any]:
    """The `Phi3ForCausalLM` config.json of `config`, given the `shared` fields; `ConfigError` for what Phi-3
    cannot state."""
    if config.qkv_bias or config.qk_norm or config.rope_scaling_factor:
        raise errors.ConfigError("a Phi-3 HF model has no q/k/v biases, no q/k norms and no rope scaling; "
                                 f"model.qkv_bias={config.qkv_bias}, model.qk_norm={config.qk_norm}, "
                                 f"model.rope_scaling_factor={config.rope_scaling_factor}.")
    if config.sliding_window and config.full_attention_layers:
        raise errors.ConfigError(f"a Phi-3 HF model windows every layer or none; model.full_attention_layers="
                                 f"{list(config.full_attention_layers)} cannot be written so.")
    return {
        **shared, "architectures": [HF_CLASSES["phi3"][0]], "model_type": "phi3", "hidden_act": "silu",
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
        "sliding_window": config.sliding_window or None,
        "original_max_position_embeddings": config.max_seq_len, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    }

"""Decoder models (Flax NNX) by family — Llama (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) and Gemma 3 — and their
presets."""

from flaxalign.models.apply import apply_lm, apply_reward
from flaxalign.models.config import PRESETS, ModelConfig, preset
from flaxalign.models.llama import CausalLM
from flaxalign.models.params import abstract_model, init_params, merge

__all__ = ["PRESETS", "CausalLM", "ModelConfig", "abstract_model", "apply_lm", "apply_reward", "init_params", "merge",
           "preset"]

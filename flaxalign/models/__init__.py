"""Llama-family decoder models (Flax NNX) and their presets."""

from flaxalign.models.config import PRESETS, ModelConfig, preset
from flaxalign.models.llama import CausalLM
from flaxalign.models.params import abstract_model, init_params, merge

__all__ = ["PRESETS", "ModelConfig", "preset", "CausalLM", "abstract_model", "init_params", "merge"]

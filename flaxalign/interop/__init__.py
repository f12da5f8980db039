"""Conversion between flaxalign and other libraries' model formats: Hugging Face transformers directories (causal
LMs and `*ForSequenceClassification` reward models), PEFT adapter directories and llama.cpp GGUF files."""

from flaxalign.interop.hf import (
    Pretrained,
    apply_lm,
    apply_reward,
    hf_config_dict,
    model_config_from_hf,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
    save_hf,
)
from flaxalign.interop.peft import load_peft_adapter, save_peft_adapter
from flaxalign.interop.pretrained import load_pretrained

__all__ = ["Pretrained", "apply_lm", "apply_reward", "hf_config_dict", "load_peft_adapter", "load_pretrained",
           "model_config_from_hf", "params_from_hf_state_dict", "params_to_hf_state_dict", "save_hf",
           "save_peft_adapter"]

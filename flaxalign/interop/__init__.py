"""Conversion between flaxalign and other libraries' model formats (Hugging Face transformers)."""

from flaxalign.interop.hf import (
    Pretrained,
    apply_lm,
    hf_config_dict,
    load_pretrained,
    model_config_from_hf,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
    save_hf,
)

__all__ = ["Pretrained", "apply_lm", "hf_config_dict", "load_pretrained", "model_config_from_hf",
           "params_from_hf_state_dict", "params_to_hf_state_dict", "save_hf"]

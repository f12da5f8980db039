"""Conversion between flaxalign and other libraries' model formats (Hugging Face transformers)."""

from flaxalign.interop.hf import model_config_from_hf, params_from_hf_state_dict, params_to_hf_state_dict

__all__ = ["model_config_from_hf", "params_from_hf_state_dict", "params_to_hf_state_dict"]

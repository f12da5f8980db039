"""Parameter-efficient fine-tuning as pure functions over the parameter tree: LoRA, rsLoRA and DoRA."""

from flaxalign.peft.lora import (
    LoraConfig,
    apply_lora,
    count_params,
    init_lora,
    merge,
    modules_to_save_paths,
    reference_params,
    target_paths,
    trainable_mask,
    unmerge,
)

__all__ = ["LoraConfig", "apply_lora", "count_params", "init_lora", "merge", "modules_to_save_paths",
           "reference_params", "target_paths", "trainable_mask", "unmerge"]

"""Parameter-efficient fine-tuning over the parameter tree: LoRA, rsLoRA and DoRA (merged as tree transforms, or in
activation space for training), and a frozen base stored quantized (int8 / NF4, QLoRA)."""

from flaxalign.peft.adapted import LoraWeight, attach_lora
from flaxalign.peft.lora import (
    LoraConfig,
    apply_lora,
    count_params,
    init_lora,
    merge,
    modules_to_save_paths,
    target_paths,
    trainable_mask,
    unmerge,
)
from flaxalign.peft.quant import QuantConfig, QuantizedWeight

__all__ = ["LoraConfig", "LoraWeight", "QuantConfig", "QuantizedWeight", "apply_lora", "attach_lora", "count_params",
           "init_lora", "merge", "modules_to_save_paths", "target_paths", "trainable_mask", "unmerge"]

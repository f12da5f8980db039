"""The model-family seam: `model.family` → what the family states, in one registry entry.

A family states
- `model`: its `CausalLM` class — `llama.CausalLM` or a subclass with its own layer / norm classes and embedding,
  the same interface and param names for the linear weights (so stages, LoRA / QLoRA, the sampler and `plan` need
  nothing per family); `models.params` builds it;
- `global_tensors(config, score)` / `layer_tensors(config)`: its HF tensor table (`models.tensors.HFTensor`), which
  `interop.hf` (safetensors, PEFT directories, GGUF) reads and writes through;
- `hf_classes`: HF `model_type` → (causal-LM class, `*ForSequenceClassification` class);
- `config_from_hf(hf_config, shared)` / `config_to_hf(config, shared)`: its config.json mapping beyond the fields
  every family shares (`interop.hf_config` passes those). None for Llama, whose mapping (Llama, Mistral, Qwen2,
  Qwen3: biases, windows, rope scaling) is `interop.hf_config`'s own.

Adding a family: one module next to `gemma.py` (its classes, table and mapping) and one entry below (its name also
in `config.FAMILIES`, which `ModelConfig` validates against).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flaxalign.models import gemma, llama, phi3
from flaxalign.models.config import FAMILIES as NAMES
from flaxalign.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    model: type
    global_tensors: Callable[..., list]
    layer_tensors: Callable[[ModelConfig], list]
    hf_classes: Mapping[str, tuple[str, str]]
    config_from_hf: Callable[[Mapping[str, Any], dict], dict] | None = None
    config_to_hf: Callable[[ModelConfig, dict], dict] | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family(llama.CausalLM, llama.global_tensors, llama.layer_tensors, {
        "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
        "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")}),
    "gemma": Family(gemma.CausalLM, gemma.global_tensors, gemma.layer_tensors, gemma.HF_CLASSES,
                    gemma.config_from_hf, gemma.config_to_hf),
    "phi3": Family(phi3.CausalLM, phi3.global_tensors, phi3.layer_tensors, phi3.HF_CLASSES, phi3.config_from_hf,
                   phi3.config_to_hf),
}
assert tuple(FAMILIES) == NAMES, "config.FAMILIES names the registry's families"


def family(config: ModelConfig) -> Family:
    """The registry entry of `config.family` (validated by `ModelConfig`)."""
    return FAMILIES[config.family]


def of_hf_type(model_type: str) -> str:
    """The family whose HF classes include `model_type` ("mistral" → "llama")."""
    return next(name for name, f in FAMILIES.items() if model_type in f.hf_classes)

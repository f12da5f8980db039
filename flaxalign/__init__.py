"""flaxalign: a JAX/Flax trainer for the LLM adaptation pipeline (pretraining, SFT, reward model, PPO/DPO), with
LoRA, QLoRA and adapters as parameter-tree transforms, sharded over a `jax.sharding.Mesh`.

Library entry points (documented in README.md): `flaxalign.models` (model configs, presets, init/merge),
`flaxalign.losses` (pure loss functions), `flaxalign.peft` (LoRA/rsLoRA/DoRA transforms, a quantized base),
`flaxalign.policy` (a trainable model: full, LoRA, adapters or QLoRA, its reference and merged weights),
`flaxalign.weights` (reading runs and pretrained weights), `flaxalign.data` (tokenizers, chat templates, sources,
batching). The command line is `flaxalign` (`flaxalign.main`).
"""

__version__ = "0.1.0"

"""Constitutional AI data generation (`flaxalign constitutional`; see flaxalign/constitutional.py): a model drafts
responses, critiques and revises them against sampled principles, and the run writes DPO preference pairs
(chosen = revision, rejected = draft), SFT records and a trace. Presets: `tiny` (give it a model with
--config.checkpoint), `smollm2_135m` (SmolLM2-135M-Instruct from its GGUF file; fetch it with
launch/fetch_smollm2.sh).

    flaxalign constitutional --config=configs/constitutional.py:tiny --workdir=runs/cai \
        --config.checkpoint=checkpoint:runs/sft
    flaxalign constitutional --config=configs/constitutional.py:smollm2_135m --workdir=runs/cai_smollm2
    flaxalign train --config=configs/dpo.py:smollm2_135m --workdir=runs/cai_dpo \
        --config.data.train=runs/cai_smollm2/preferences.jsonl --config.data.chat_template=chatml
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    "tiny": dict(checkpoint="", prompts="builtin:arithmetic_prompts?n=32&seed=3", chat_template="plain",
                 max_new_tokens=24, temperature=0.7, batch_size=16),
    "smollm2_135m": dict(checkpoint=f"gguf:{config_blocks.smollm2_gguf()}",
                         prompts="builtin:arithmetic_prompts?n=4&seed=3",
                         chat_template="chatml", max_new_tokens=48, temperature=0.3, batch_size=4),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/constitutional.py")
    c = ml_collections.ConfigDict()
    c.stage = "constitutional"  # run with `flaxalign constitutional`, not `flaxalign train`
    # the model that drafts, critiques and revises: a run directory, checkpoint:DIR, hf:DIR or gguf:FILE
    c.checkpoint = p["checkpoint"]
    # a text file with one principle per line (# comments), or builtin:default (flaxalign.constitutional)
    c.constitution = "builtin:default"
    # `prompt` records (JSONL, builtin:..., tfds:...); a message-list prompt contributes its last user message
    c.prompts = p["prompts"]
    c.num_prompts = 0  # 0 = every prompt record
    c.rounds = 1  # critique → revision rounds per prompt, each with its own principle
    # the template the model was tuned with (auto = the one its run recorded); a request is its user message. With
    # a template the records are written as message lists (train DPO/SFT on them with the same data.chat_template);
    # "" or none = raw text and string records
    c.chat_template = p["chat_template"]
    c.max_new_tokens = p["max_new_tokens"]  # per draft, critique and revision
    c.temperature = p["temperature"]
    c.top_k = 0
    c.top_p = 1.0
    c.batch_size = p["batch_size"]  # prompts per sampler call
    c.seed = 0  # sampling and principle choice
    return c

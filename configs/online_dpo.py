"""Online DPO: DPO on two responses per prompt sampled from the current policy and ranked by a reward model and/or
Python reward functions at every step (TRL's OnlineDPOTrainer). Presets: `tiny` (CPU tests; ranked by the exact-answer
checker on single-digit arithmetic), `smollm2_135m` (LoRA online DPO of SmolLM2-135M-Instruct from its GGUF file,
fetched by launch/fetch_smollm2.sh; ranked by the same checker unless reward_from is set).

    flaxalign train --config=configs/online_dpo.py:tiny --workdir=runs/online_dpo --config.init_from=checkpoint:runs/sft
    flaxalign train --config=configs/online_dpo.py:tiny --workdir=runs/online_dpo_rm \
        --config.init_from=checkpoint:runs/sft --config.reward_from=checkpoint:runs/rm --config.rewards=
"""

import ml_collections

from flaxalign import config_blocks
from flaxalign.losses import preference

PRESETS = {
    "tiny": dict(steps=300, lr=5e-4, batch_size=16, max_prompt_len=24, max_new_tokens=12, beta=0.1),
    "smollm2_135m": dict(steps=100, lr=5e-5, batch_size=8, max_prompt_len=64, max_new_tokens=32, beta=0.1,
                         lora_rank=8, eval_every=25, eval_prompts=32,
                         init_from=f"gguf:{config_blocks.smollm2_gguf()}"),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/online_dpo.py")
    c = ml_collections.ConfigDict()
    c.stage = "online_dpo"
    c.seed = 0
    c.steps = p["steps"]  # iterations: two samples of each of data.batch_size prompts, one update
    # checkpoint:DIR of an SFT run, hf:DIR or gguf:FILE: the starting policy (and reference) and its tokenizer
    c.init_from = p.get("init_from", "")
    c.model = config_blocks.model(arg, remat=p.get("remat", "minimal"))

    # reward functions, comma-separated: built-ins (exact_answer, answer_format, answer_closeness) or
    # "package.module:function", called as fn(prompts, completions, answer=[...]) -> floats; summed with
    # reward_weights (comma-separated numbers, one per function; "" = all 1)
    c.rewards = p.get("rewards", "exact_answer")
    c.reward_weights = ""
    c.reward_from = p.get("reward_from", "")  # checkpoint:DIR of a configs/reward.py run, added with its weight
    c.reward_model_weight = 1.0

    # single-digit arithmetic with answers; batch_size prompts per rollout (× 2 responses)
    c.data = config_blocks.prompt_data("builtin:arithmetic_prompts?max=9", max_prompt_len=p["max_prompt_len"],
                                       batch_size=p["batch_size"])

    c.rollout = config_blocks.rollout(p["max_new_tokens"], temperature=1.0)
    # a DPO-family loss (the `DPO_LOSSES` registry) and its own hyper-parameters; the reference is the starting policy
    c.loss = ml_collections.ConfigDict(dict(loss_type="sigmoid", beta=p["beta"], **preference.DPO_HYPER_DEFAULTS))
    c.missing_eos_penalty = 0.0  # subtracted from the reward of a response without EOS (TRL's missing_eos_penalty)
    c.skip_ties = True  # pairs with equal rewards are left out; False = TRL (a tie trains the first sample as chosen)

    c.lora = config_blocks.lora()
    c.lora.rank = p.get("lora_rank", 0)
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=0, schedule="constant", final_lr_fraction=1.0, b1=0.9, b2=0.99, eps=1e-8,
        weight_decay=0.0, clip_norm=1.0, total_steps=0))

    c.mesh = config_blocks.mesh()
    c.mesh.data, c.mesh.fsdp = p.get("mesh_data", -1), p.get("mesh_fsdp", 1)
    c.grad_accum = p.get("grad_accum", 1)
    c.loss_chunk = 256
    c.log_every = 5
    c.eval_every = p.get("eval_every", 100)
    c.eval_at_start = True
    # held-out prompts answered (greedy and sampled) at every evaluation (0 = off)
    c.eval_prompts = p.get("eval_prompts", 128)
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

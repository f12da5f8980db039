"""GRPO and RLOO with verifiable rewards (Python functions over the decoded text) and/or a reward model. Presets:
`tiny` (CPU tests, the demo).

    flaxalign train --config=configs/grpo.py:tiny --workdir=runs/grpo --config.init_from=checkpoint:runs/sft
    flaxalign train --config=configs/grpo.py:tiny --workdir=runs/rloo --config.init_from=checkpoint:runs/sft \
        --config.grpo.algorithm=rloo
    flaxalign train --config=configs/grpo.py:tiny --workdir=runs/grpo_rm --config.init_from=checkpoint:runs/sft \
        --config.reward_from=checkpoint:runs/reward --config.rewards=answer_format
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    "tiny": dict(steps=1200, lr=3e-4, batch_size=16, group_size=16, max_prompt_len=24, max_new_tokens=12),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/grpo.py")
    c = ml_collections.ConfigDict()
    c.stage = "grpo"
    c.seed = 0
    c.steps = p["steps"]  # iterations: one rollout of data.batch_size prompts × group_size samples each
    c.init_from = ""  # checkpoint:DIR of an SFT run: the starting policy (and reference) and its tokenizer
    c.model = config_blocks.model(arg)

    # reward functions, comma-separated: built-ins (exact_answer, answer_format, answer_closeness) or
    # "package.module:function", called as fn(prompts, completions, answer=[...]) -> floats; summed with
    # reward_weights (comma-separated numbers, one per function; "" = all 1)
    c.rewards = "exact_answer"
    c.reward_weights = ""
    c.reward_from = ""  # optional checkpoint:DIR of a configs/reward.py run, added with reward_model_weight
    c.reward_model_weight = 1.0

    # single-digit arithmetic with answers; batch_size prompts per rollout (× group_size responses)
    c.data = config_blocks.prompt_data("builtin:arithmetic_prompts?max=9", max_prompt_len=p["max_prompt_len"],
                                       batch_size=p["batch_size"])

    c.rollout = ml_collections.ConfigDict(dict(max_new_tokens=p["max_new_tokens"], temperature=1.0, top_k=0,
                                               top_p=1.0))
    c.grpo = ml_collections.ConfigDict(dict(
        algorithm="grpo", group_size=p["group_size"], epochs=1, num_minibatches=2, clip_eps=0.2, clip_eps_high=0.0,
        beta=0.0, loss_type="dapo", scale_rewards="group", rloo_normalize=False, missing_eos_penalty=0.0))

    c.lora = config_blocks.lora()
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=0, schedule="constant", final_lr_fraction=1.0, b1=0.9, b2=0.99, eps=1e-8,
        weight_decay=0.0, clip_norm=1.0, total_steps=0))

    c.mesh = config_blocks.mesh()
    c.grad_accum = 1
    c.loss_chunk = 256
    c.log_every = 5
    c.eval_every = 100
    c.eval_at_start = True
    c.eval_prompts = 128  # held-out prompts answered (greedy and sampled) at every evaluation (0 = off)
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

"""PPO-RLHF: the SFT policy, a reward model, a value model, per-token KL to the reference. Presets: `tiny` (CPU
tests, the demo).

    flaxalign train --config=configs/ppo.py:tiny --workdir=runs/ppo --config.init_from=checkpoint:runs/sft \
        --config.reward_from=checkpoint:runs/reward
    flaxalign train --config=configs/ppo.py:tiny --workdir=runs/ppo_lora --config.init_from=checkpoint:runs/sft \
        --config.reward_from=checkpoint:runs/reward --config.lora.rank=8   # reference = base, value = base + own LoRA
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    "tiny": dict(steps=250, lr=3e-4, batch_size=64, max_prompt_len=24, max_new_tokens=16),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/ppo.py")
    c = ml_collections.ConfigDict()
    c.stage = "ppo"
    c.seed = 0
    c.steps = p["steps"]  # PPO iterations: one rollout of data.batch_size prompts each
    c.init_from = ""  # checkpoint:DIR of an SFT run: the starting policy (and reference) and its tokenizer
    c.reward_from = ""  # checkpoint:DIR of a configs/reward.py run (its reward_normalization.json is applied)
    c.value_from = "auto"  # auto | reward (full fine-tuning: TRL's choice) | policy (required with LoRA)
    c.model = config_blocks.model(arg)

    # batch_size prompts per rollout; longer prompts than max_prompt_len are left-truncated (counted)
    c.data = config_blocks.prompt_data("builtin:arithmetic_prompts", max_prompt_len=p["max_prompt_len"],
                                       batch_size=p["batch_size"])

    c.rollout = config_blocks.rollout(p["max_new_tokens"], temperature=0.7)
    # TRL PPOConfig defaults, but for minibatches (4 per rollout here) and a missing-EOS penalty
    c.ppo = ml_collections.ConfigDict(dict(
        epochs=4, num_minibatches=4, clip_eps=0.2, vf_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, kl_coef=0.05,
        kl_estimator="k1", kl_target=0.0, kl_horizon=10000.0, entropy_coef=0.0, whiten_rewards=False,
        missing_eos_penalty=1.0))

    c.lora = config_blocks.lora()
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)

    # counted in optimizer updates (steps × epochs × num_minibatches; total_steps is set from them)
    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=0, schedule="linear", final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-5,
        weight_decay=0.0, clip_norm=1.0, total_steps=0))

    c.mesh = config_blocks.mesh()
    c.grad_accum = 1
    c.loss_chunk = 256
    c.log_every = 5
    c.eval_every = 50
    c.eval_at_start = True
    c.eval_prompts = 64  # held-out prompts sampled at every evaluation (0 = off)
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

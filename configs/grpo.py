"""GRPO and RLOO with verifiable rewards (Python functions over the decoded text) and/or a reward model. Presets:
`tiny` (CPU tests, the demo), `smollm2_135m` (LoRA GRPO of a SmolLM2-135M-Instruct SFT run on chat-form arithmetic;
init_from=checkpoint:DIR), `llama3_8b` (LoRA GRPO of Llama-3-8B on a TPU pod slice).

    flaxalign train --config=configs/grpo.py:tiny --workdir=runs/grpo --config.init_from=checkpoint:runs/sft
    flaxalign train --config=configs/grpo.py:tiny --workdir=runs/rloo --config.init_from=checkpoint:runs/sft \
        --config.grpo.algorithm=rloo
    flaxalign train --config=configs/grpo.py:tiny --workdir=runs/grpo_rm --config.init_from=checkpoint:runs/sft \
        --config.reward_from=checkpoint:runs/reward --config.rewards=answer_format
"""

import ml_collections

from flaxalign import config_blocks
from flaxalign.losses import group_rl

PRESETS = {
    "tiny": dict(steps=1200, lr=3e-4, batch_size=16, group_size=16, max_prompt_len=24, max_new_tokens=12),
    # 4 questions × 8 answers per iteration; chatml prompts of two-digit questions take ≈ 20 tokens
    "smollm2_135m": dict(steps=30, lr=1e-4, batch_size=4, group_size=8, max_prompt_len=48, max_new_tokens=16,
                         lora_rank=8, eval_every=0, eval_prompts=0,
                         prompts="builtin:arithmetic_prompts?max=99&chat=1&split=train"),
    # Llama-3-8B(-Instruct) GRPO with LoRA on a TPU pod slice (weights from init_from=hf:DIR, prompts with answers in
    # data.train): 32 prompts × 8 samples of up to 512 tokens after prompts of up to 256; the frozen base (which is
    # also the reference) and the optimizer sharded over every chip, activations recomputed, each update over
    # micro-batches of 16 rows. `flaxalign plan --config=configs/grpo.py:llama3_8b --topology=v5e:2x4` shows the
    # memory of every role and of the rollout (docs/rl_plan.md).
    "llama3_8b": dict(steps=500, lr=1e-5, batch_size=32, group_size=8, max_prompt_len=256, max_new_tokens=512,
                      num_minibatches=4, grad_accum=4, lora_rank=16, beta=0.04, remat="full", mesh_data=1,
                      mesh_fsdp=-1, eval_every=50, eval_prompts=64),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/grpo.py")
    c = ml_collections.ConfigDict()
    c.stage = "grpo"
    c.seed = 0
    c.steps = p["steps"]  # iterations: one rollout of data.batch_size prompts × group_size samples each
    c.init_from = ""  # checkpoint:DIR of an SFT run: the starting policy (and reference) and its tokenizer
    c.model = config_blocks.model(arg, remat=p.get("remat", "minimal"))

    # reward functions, comma-separated: built-ins (exact_answer, answer_format, answer_closeness) or
    # "package.module:function", called as fn(prompts, completions, answer=[...]) -> floats; summed with
    # reward_weights (comma-separated numbers, one per function; "" = all 1)
    c.rewards = "exact_answer"
    c.reward_weights = ""
    c.reward_from = ""  # optional checkpoint:DIR of a configs/reward.py run, added with reward_model_weight
    c.reward_model_weight = 1.0

    # arithmetic with answers (tiny: single digits); batch_size prompts per rollout (× group_size responses)
    c.data = config_blocks.prompt_data(p.get("prompts", "builtin:arithmetic_prompts?max=9"),
                                       max_prompt_len=p["max_prompt_len"], batch_size=p["batch_size"])

    c.rollout = config_blocks.rollout(p["max_new_tokens"], temperature=1.0)
    # algorithm: the advantage estimator (grpo, rloo, reinforce_pp, reinforce_pp_baseline); policy_loss: clip or
    # cispo; importance_sampling_level: token, or sequence (GSPO); loss_type: dapo, bnpo, grpo, dr_grpo. README
    # "GRPO family" lists every field and the recipes (GSPO, CISPO, DAPO, REINFORCE++).
    c.grpo = ml_collections.ConfigDict(dict(
        algorithm="grpo", group_size=p["group_size"], epochs=1, num_minibatches=p.get("num_minibatches", 2),
        policy_loss="clip", importance_sampling_level="token", clip_eps=0.2, clip_eps_high=0.0, delta=0.0,
        cispo_max_weight=5.0, beta=p.get("beta", 0.0), loss_type="dapo", missing_eos_penalty=0.0,
        sampler_correction="none", sampler_correction_min=0.0, sampler_correction_max=3.0, overlong_buffer=0,
        overlong_penalty=1.0, dynamic_sampling=False, dynamic_sampling_max_rounds=3,
        # the advantage estimators' own fields, from their registry entries: scale_rewards (grpo), rloo_normalize
        **group_rl.estimator_hyper_defaults()))

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

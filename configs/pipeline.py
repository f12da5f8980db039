"""The whole pipeline in one command: tokenizer + CLM → SFT → reward model (+ a gold reward model) → PPO, DPO and
GRPO (per seed, all from the SFT checkpoint) → evaluation → report. Presets: `tiny` (the demo: embedded data, 2 CPU
cores, ≤ 10 minutes with 3 seeds), `smollm2_135m` (launch/demo_real.sh: LoRA SFT, DPO and GRPO of
SmolLM2-135M-Instruct from its GGUF file — no CLM stage, no reward models — on two-digit arithmetic in chat form,
judged on questions no stage trained on).

    flaxalign pipeline --config=configs/pipeline.py:tiny --workdir=runs/pipeline [--seeds=3]

Each stage block names a stage config (`configs/FILE.py:PRESET`) and extra `--config.*` flags as one string;
`init_from`, `reward_from`, `reference`, `gold_reward_from` and `seed` are set by the pipeline. A method block also
says whether its stage trains against the pipeline's reward model (`reward_model`).

`tiny` is one task with a ground truth: single-digit arithmetic ("What is 7 + 5?" → "The answer is 12."). SFT
teaches the answer format and a little of the arithmetic; the reward model learns correctness from preference pairs
(chosen = the right answer, rejected = a wrong answer in the same sentence, a near miss or a hedge); PPO optimises
that reward model, DPO learns from the pairs directly (with RPO's NLL term), GRPO from the exact-answer reward. Every
policy answers the eval preset's 128 prompts (`arithmetic_prompts?max=9&seed=1`: the first records of SFT's own
training set; there are only ≈ 220 single-digit problems, and every training set holds them all, so this measures how
often a policy answers right, not generalisation) and is judged by the exact-answer checker and by a gold reward
model trained on pairs drawn with another seed (≈ 40 % of them equal to pairs of the proxy's set).
"""

import ml_collections

from flaxalign import config_blocks

TASK = "max=9"  # single-digit operands: every builtin:arithmetic_* spec of the demo
PAIRS = f"builtin:arithmetic_preferences?{TASK}&far=1"
REAL_TASK = "max=99&chat=1"  # two-digit operands, the questions as user messages (SmolLM2 is a chat model)
REAL_PAIRS = f"builtin:arithmetic_preferences?{REAL_TASK}&far=1"
PRESETS = {
    # Sizes measured on 2 CPU cores (BUILD_NOTES, issue 20): SFT stops at 200 steps (≈ 34 % greedy accuracy; 600 steps
    # reach 100 %, which would leave the methods nothing to show); PPO 100 and GRPO 350 iterations and 400-step reward
    # models keep the demo near 10 minutes; DPO uses RPO (α = 1, lr 1e-3): plain DPO (β 0.1, lr 2e-4) lowered the
    # accuracy in every variant tried.
    "tiny": dict(
        seeds=3, methods="ppo,dpo,grpo",
        sft_args=f"--config.data.train=builtin:arithmetic_sft?seed=1&{TASK} --config.steps=200 --config.eval_every=0",
        reward_args=f"--config.data.train={PAIRS}&seed=0 --config.steps=400",
        gold_reward_args=f"--config.data.train={PAIRS}&seed=2 --config.steps=400",
        ppo_args=f"--config.data.train=builtin:arithmetic_prompts?{TASK} --config.steps=100",
        dpo_args=f"--config.data.train={PAIRS}&seed=0 --config.loss.rpo_alpha=1.0 --config.optim.lr=1e-3",
        grpo_args="--config.steps=350",
        eval_args="--config.num_prompts=128 --config.num_examples=6"),
    # SmolLM2-135M-Instruct (launch/fetch_smollm2.sh), LoRA rank 8 in every stage, one seed, ≈ 26 minutes on 2 CPU
    # cores (BUILD_NOTES): the "train" questions (`split=train`) for SFT, DPO and GRPO; DPO's held-out preference
    # accuracy and the evaluations on "test" questions, a tenth of all that no stage sees; perplexity on 4,096 tokens
    # of the stdlib docs, and no multiple choice (the eval preset's are single-digit questions, not held out).
    "smollm2_135m": dict(
        seeds=1, methods="dpo,grpo", base=f"gguf:{config_blocks.smollm2_gguf()}", reward=False,
        sft_args=f"--config.data.train=builtin:arithmetic_sft?{REAL_TASK}&split=train --config.steps=40 "
                 "--config.optim.lr=1e-3 --config.eval_every=0",
        dpo_args=f"--config.data.train={REAL_PAIRS}&split=train --config.data.eval={REAL_PAIRS}&split=test&n=64 "
                 "--config.steps=40 --config.loss.rpo_alpha=1.0 --config.optim.lr=5e-4 --config.eval_every=20",
        grpo_args="",
        eval_args=f"--config.prompts=builtin:arithmetic_prompts?{REAL_TASK}&seed=101&split=test "
                  "--config.num_prompts=64 --config.num_examples=6 --config.perplexity_max_tokens=4096 "
                  "--config.mc_file="),
}


def _stage(config: str, args: str = "", **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(config=config, args=args, **fields))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/pipeline.py")
    c = ml_collections.ConfigDict()
    c.seeds = p["seeds"]  # runs per method (their spread is the stability row of the report)
    c.cpu_devices = 0  # > 0: emulate this many CPU devices in every stage
    c.stop_after = ""  # a stage name (e.g. "sft", "reward", "eval/sft"): run up to it, no report
    c.methods = p["methods"]  # the method blocks below to run, in this order
    # pretrained weights to start from (gguf:FILE, hf:DIR, checkpoint:DIR) instead of the CLM stage; "" = pretrain
    c.base = p.get("base", "")
    c.clm = _stage(f"configs/clm.py:{arg}" if not c.base else "")
    c.sft = _stage(f"configs/sft.py:{arg}", p["sft_args"])
    reward = p.get("reward", True)
    # the proxy, which PPO optimises, and the gold judge (trained on other pairs); config "" = none
    c.reward = _stage(f"configs/reward.py:{arg}" if reward else "", p.get("reward_args", ""))
    c.gold_reward = _stage(f"configs/reward.py:{arg}" if reward else "", p.get("gold_reward_args", ""))
    c.ppo = _stage(f"configs/ppo.py:{arg}" if reward else "", p.get("ppo_args", ""), reward_model=True)
    c.dpo = _stage(f"configs/dpo.py:{arg}", p["dpo_args"], reward_model=False)
    c.grpo = _stage(f"configs/grpo.py:{arg}", p["grpo_args"], reward_model=False)  # the exact-answer reward
    c.eval = _stage(f"configs/eval.py:{arg}", p["eval_args"])
    return c

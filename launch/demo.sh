#!/usr/bin/env bash
# The main job on the embedded default data (no download): the pipeline as far as it is built today —
#   1. train a tokenizer on Python's own documentation and pretrain the `tiny` Llama-family model (CLM),
#   2. supervised fine-tuning of that checkpoint on the built-in SFT pairs (full fine-tuning),
#   3. the same SFT with LoRA (rank 8, all linear layers) on the frozen CLM weights,
#   4. a reward model from the SFT checkpoint on the built-in arithmetic preference pairs (+ reward normalisation),
#   5. DPO of the SFT model on the same pairs (frozen reference copy), and DPO with LoRA (adapter-off reference),
#   6. PPO of the SFT model against that reward model (value model from the RM, per-token KL to the SFT model),
#   7. a short SFT on single-digit arithmetic from the CLM checkpoint, then GRPO on it with the exact-answer reward.
# Usage: ./launch/demo.sh [extra flaxalign flags for every stage]
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
root="${WORKDIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
flaxalign train --config=configs/clm.py:tiny --workdir="$root/clm" "$@"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft" --config.init_from="checkpoint:$root/clm" "$@"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft_lora" --config.init_from="checkpoint:$root/clm" \
  --config.lora.rank=8 --config.optim.lr=1e-2 "$@"
flaxalign train --config=configs/reward.py:tiny --workdir="$root/reward" --config.init_from="checkpoint:$root/sft" "$@"
flaxalign train --config=configs/dpo.py:tiny --workdir="$root/dpo" --config.init_from="checkpoint:$root/sft" "$@"
flaxalign train --config=configs/dpo.py:tiny --workdir="$root/dpo_lora" --config.init_from="checkpoint:$root/sft" \
  --config.lora.rank=8 --config.optim.lr=2e-3 "$@"
flaxalign train --config=configs/ppo.py:tiny --workdir="$root/ppo" --config.init_from="checkpoint:$root/sft" \
  --config.reward_from="checkpoint:$root/reward" "$@"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft_math" --config.init_from="checkpoint:$root/clm" \
  '--config.data.train=builtin:arithmetic_sft?seed=1&max=9' --config.steps=150 --config.eval_every=0 "$@"
flaxalign train --config=configs/grpo.py:tiny --workdir="$root/grpo" --config.init_from="checkpoint:$root/sft_math" \
  --config.steps=400 "$@"  # the preset runs 1200 (the +15-point acceptance run, ≈ 6 min); the demo shows the first third
echo
for stage in clm sft sft_lora reward dpo dpo_lora ppo sft_math grpo; do
  echo "== $stage"
  cat "$root/$stage/report.md"
done
echo "demo: outputs in $root/{clm,sft,sft_lora,reward,dpo,dpo_lora,ppo,sft_math,grpo}: report.md, metrics.jsonl, tensorboard/, checkpoints/"

#!/usr/bin/env bash
# The main job on the embedded default data (no download): the whole adaptation pipeline in one command —
#   tokenizer + CLM pretraining on Python's own documentation → SFT on single-digit arithmetic → a proxy reward model
#   and a gold reward model on arithmetic preference pairs → PPO (against the proxy), DPO (on the pairs, with RPO)
#   and GRPO (exact-answer reward), all from the SFT checkpoint, 3 seeds each → evaluation of base/SFT/every policy
#   against SFT, judged by the exact-answer checker and both reward models → report.md with plots and the measured
#   PPO-vs-DPO-vs-GRPO table (about 10 minutes on 2 CPU cores, install included). Re-running with the same WORKDIR
#   resumes: finished stages are skipped, an interrupted one continues from its last checkpoint.
# More stages on the same runs (LoRA SFT/DPO): ./launch/demo_extras.sh WORKDIR
# Usage: [WORKDIR=dir] ./launch/demo.sh [extra flaxalign pipeline flags, e.g. --seeds=1]
set -euo pipefail
# shellcheck source=launch/_venv.sh
. "$(dirname "$0")/_venv.sh" ""  # "" = no extras (sourced without one, it would read this script's flags as extras)
root="${WORKDIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
flaxalign pipeline --config=configs/pipeline.py:tiny --workdir="$root" "$@"
echo
cat "$root/report.md"
echo
echo "demo: report $root/report.md (plots next to it); stage runs in $root/{clm,sft,reward,gold_reward,ppo_s*,dpo_s*,grpo_s*}, evaluations in $root/eval/"

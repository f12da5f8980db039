#!/usr/bin/env bash
# Further stages on a finished demo pipeline's runs (WORKDIR = the demo's workdir):
#   LoRA SFT (rank 8) on the frozen CLM weights, LoRA DPO (adapter-off reference) from SFT, and a short SFT on
#   single-digit arithmetic followed by GRPO with the exact-answer reward (400 of the preset's 1200 steps).
# Usage: ./launch/demo_extras.sh WORKDIR [extra flaxalign train flags for every stage]
set -euo pipefail
root="${1:?usage: ./launch/demo_extras.sh WORKDIR (a finished ./launch/demo.sh workdir)}"
shift
# shellcheck source=launch/_venv.sh
. "$(dirname "$0")/_venv.sh"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft_lora" --config.init_from="checkpoint:$root/clm" \
  --config.lora.rank=8 --config.optim.lr=1e-2 "$@"
flaxalign train --config=configs/dpo.py:tiny --workdir="$root/dpo_lora" --config.init_from="checkpoint:$root/sft" \
  --config.lora.rank=8 --config.optim.lr=2e-3 "$@"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft_math" --config.init_from="checkpoint:$root/clm" \
  '--config.data.train=builtin:arithmetic_sft?seed=1&max=9' --config.steps=150 --config.eval_every=0 "$@"
flaxalign train --config=configs/grpo.py:tiny --workdir="$root/grpo" --config.init_from="checkpoint:$root/sft_math" \
  --config.steps=400 "$@"
for stage in sft_lora dpo_lora sft_math grpo; do
  echo "== $stage"
  cat "$root/$stage/report.md"
done

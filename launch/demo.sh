#!/usr/bin/env bash
# The main job on the embedded default data (no download): the pipeline as far as it is built today —
#   1. train a tokenizer on Python's own documentation and pretrain the `tiny` Llama-family model (CLM),
#   2. supervised fine-tuning of that checkpoint on the built-in SFT pairs (full fine-tuning),
#   3. the same SFT with LoRA (rank 8, all linear layers) on the frozen CLM weights.
# Usage: ./launch/demo.sh [extra flaxalign flags for every stage]
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
root="${WORKDIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
flaxalign train --config=configs/clm.py:tiny --workdir="$root/clm" "$@"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft" --config.init_from="checkpoint:$root/clm" "$@"
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft_lora" --config.init_from="checkpoint:$root/clm" \
  --config.lora.rank=8 --config.optim.lr=1e-2 "$@"
echo
for stage in clm sft sft_lora; do
  echo "== $stage"
  cat "$root/$stage/report.md"
done
echo "demo: outputs in $root/{clm,sft,sft_lora}: report.md, metrics.jsonl, tensorboard/, checkpoints/"

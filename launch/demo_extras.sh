#!/usr/bin/env bash
# Further stages on a finished demo pipeline's runs (WORKDIR = the demo's workdir): LoRA SFT (rank 8) on the frozen
# CLM weights and LoRA DPO (with RPO's NLL term; the reference is the adapter-off base) from SFT, on the demo's
# arithmetic data, each evaluated like the pipeline's policies.
# Usage: ./launch/demo_extras.sh WORKDIR [extra flaxalign train flags for every stage]
set -euo pipefail
root="${1:?usage: ./launch/demo_extras.sh WORKDIR (a finished ./launch/demo.sh workdir)}"
shift
# shellcheck source=launch/_venv.sh
. "$(dirname "$0")/_venv.sh" ""  # "" = no extras (sourced without one, it would read this script's flags as extras)
flaxalign train --config=configs/sft.py:tiny --workdir="$root/sft_lora" --config.init_from="checkpoint:$root/clm" \
  '--config.data.train=builtin:arithmetic_sft?seed=1&max=9' --config.lora.rank=8 --config.optim.lr=1e-2 \
  --config.steps=200 --config.eval_every=0 "$@"
flaxalign train --config=configs/dpo.py:tiny --workdir="$root/dpo_lora" --config.init_from="checkpoint:$root/sft" \
  '--config.data.train=builtin:arithmetic_preferences?max=9&far=1' --config.loss.rpo_alpha=1.0 \
  --config.lora.rank=8 --config.optim.lr=2e-3 "$@"
for stage in sft_lora dpo_lora; do
  flaxalign eval --config=configs/eval.py:tiny --checkpoint="$root/$stage" --workdir="$root/eval/$stage" \
    --config.reference="checkpoint:$root/sft" --config.num_prompts=128
  echo "== $stage"
  cat "$root/$stage/report.md"
done

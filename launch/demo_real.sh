#!/usr/bin/env bash
# The real-model recipe, ≈ 26 minutes on 2 CPU cores: SmolLM2-135M-Instruct (Apache-2.0; fetched once as GGUF by
# launch/fetch_smollm2.sh, the only download) through LoRA SFT, LoRA DPO (with RPO's NLL term) and LoRA GRPO
# (exact-answer reward) on embedded two-digit arithmetic in chat form, every policy judged on questions no stage
# trained on (configs/pipeline.py:smollm2_135m; the report is WORKDIR/report.md). Then DPO's policy is exported as
# one PEFT adapter on the original base and as a merged HF directory, and — where the parity extra (torch,
# transformers, peft) is installed — both exports are loaded in transformers and checked to give the run's logits.
# Usage: WORKDIR=runs/demo_real ./launch/demo_real.sh [extra flaxalign pipeline flags, e.g. --config.sft.args=…;
# the exports need the dpo method]
set -euo pipefail
# shellcheck source=launch/_venv.sh
. "$(dirname "$0")/_venv.sh" ""  # "" = no extras (sourced without one, it would read this script's flags as extras)
workdir="${WORKDIR:-runs/demo_real}"
gguf="$(launch/fetch_smollm2.sh)"
flaxalign pipeline --config=configs/pipeline.py:smollm2_135m --workdir="$workdir" --config.base="gguf:$gguf" "$@"
exports="$workdir/exports"
flaxalign convert --from="$workdir/dpo_s0" --to="$exports/dpo_lora" --format=peft --merge_parent --overwrite
flaxalign convert --from="$workdir/dpo_s0" --to="$exports/dpo_merged" --format=hf --overwrite
if python -c "import peft, torch, transformers" 2>/dev/null; then
  flaxalign convert --from="gguf:$gguf" --to="$exports/base" --format=hf --overwrite
  python launch/check_export.py "$workdir/dpo_s0" "$exports/dpo_merged" "$exports/dpo_lora" "$exports/base"
else
  echo "demo_real: torch/transformers/peft are not installed (pip install -e '.[parity]'), so the exports in" \
    "$exports were not loaded in transformers."
fi
echo "demo_real: report: $workdir/report.md"

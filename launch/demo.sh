#!/usr/bin/env bash
# The main job on the embedded default data (no download): train a tokenizer on Python's own documentation and
# pretrain the `tiny` Llama-family model on it. Usage: ./launch/demo.sh [extra flaxalign flags]
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
workdir="${WORKDIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
flaxalign train --config=configs/clm.py:tiny --workdir="$workdir" "$@"
echo
echo "demo: outputs in $workdir: report.md, metrics.jsonl, tensorboard/, checkpoints/, tokenizer.model"
cat "$workdir/report.md"

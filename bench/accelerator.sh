#!/usr/bin/env bash
# One short, prepared benchmark for a lent accelerator (GPU or TPU host with JAX installed; installs nothing, needs
# no network): the CLM and DPO train steps in bfloat16 on the `small` preset and on Llama-3.2-1B shapes, with
# tokens/s and MFU against the chip's datasheet bf16 peak (flaxalign/train/mfu.py). About 5 minutes on one H100.
# Usage: bench/accelerator.sh [OUT_DIR]   (JSON results and a log in OUT_DIR, default bench/out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/out}"
mkdir -p "$out"
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import jax; print('devices:', jax.devices())" 2>&1 | tee "$out/devices.txt"
run() {  # name, then the command; a failing case is logged and the next one runs
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/log.txt"
  timeout 900 "$@" --json="$out/$name.json" 2>&1 | tail -n 20 | tee -a "$out/log.txt"
}
run clm_small "$py" bench/clm_step.py --preset=small --dtype=bfloat16 --batch=32 --seq=1024 --steps=10 --rounds=2 --no_torch
run clm_1b "$py" bench/clm_step.py --preset=llama3_2_1b --dtype=bfloat16 --batch=8 --seq=2048 --steps=5 --rounds=2 \
  --remat=dots_with_no_batch_dims_saveable --loss_chunk=512 --no_torch
run dpo_small "$py" bench/dpo_step.py --preset=small --dtype=bfloat16 --pairs=16 --seq=1024 --steps=5 --rounds=2 --no_trl
run dpo_1b "$py" bench/dpo_step.py --preset=llama3_2_1b --dtype=bfloat16 --pairs=4 --seq=1024 --steps=3 --rounds=2 \
  --remat=dots_with_no_batch_dims_saveable --loss_chunk=512 --no_trl --no_end_to_end
echo "results: $out/*.json, log: $out/log.txt"

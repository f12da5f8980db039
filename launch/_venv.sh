# Sourced by launch/*.sh: create or update the project's virtual environment in .venv and activate it.
# Usage: . launch/_venv.sh [extras], e.g. ". launch/_venv.sh test".
# shellcheck shell=bash
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "launch: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
extras="${1:-}"
# Whether an install newer than the package's metadata covered every extra in $1 (comma-separated; "" = the package
# alone, which every install covers), so that e.g. demo.sh after test.sh installs nothing.
installed() {
  local stamp want covered
  for stamp in .venv/.installed-*; do
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then continue; fi
    covered=1
    for want in ${1//,/ }; do
      [[ ",${stamp#.venv/.installed-}," == *",$want,"* ]] || covered=0
    done
    if [ "$covered" = 1 ]; then return 0; fi
  done
  return 1
}
if ! installed "$extras"; then
  echo "launch: installing flaxalign${extras:+[$extras]} into .venv"
  python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
  touch ".venv/.installed-${extras:-base}"
fi

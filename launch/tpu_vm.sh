#!/usr/bin/env bash
# Trains on a single-host Cloud TPU VM (e.g. v5litepod-8, v4-8, v6e-8): run it ON the TPU VM, in this repository.
# --install=1 first creates .venv and installs flaxalign with jax[tpu] (libtpu from the jax-releases index); then
# `flaxalign train --config=... --workdir=... [the other arguments]` runs. A single host needs no jax.distributed
# flags. For multi-host pod slices use launch/tpu_pod.sh (from your workstation). --dry-run prints every command,
# one per line, instead of running it.
set -euo pipefail
prog=tpu_vm.sh
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/_launch_lib.sh
. "$repo/launch/_launch_lib.sh"
libtpu_index=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --config=FILE:PRESET --workdir=DIR [--install=0|1] [--python=PYTHON] [--dry-run]
                        [flaxalign train flags, e.g. --config.steps=1000]
  --config=FILE:PRESET  flaxalign's --config, e.g. configs/dpo.py:tiny
  --workdir=DIR         a local path, a persistent disk's mount point or gs://bucket/run
  --install=0|1         1: create .venv (with PYTHON) and install flaxalign and jax[tpu] into it (default 0)
  --python=PYTHON       the interpreter for --install (default python3.11; apt-installed if missing)
  --dry-run             print the commands instead of running them
  --help                this text
Every other argument (and everything after --) goes to flaxalign train unchanged.
EOF
}



# One shell command line: printed under --dry-run; else echoed to stderr and run (bash, pipefail) in the repository.
step() {
  if (( dry_run )); then printf '%s\n' "$1"; return 0; fi
  printf '+ %s\n' "$1" >&2
  (cd "$repo" && bash -o pipefail -c "$1")
}

config="" workdir="" install=0 python=python3.11 dry_run=0
passthrough=()
while (( $# )); do
  arg=$1; shift
  case $arg in
    --) passthrough+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --config=*|--workdir=*|--python=*) opt=${arg%%=*}; printf -v "${opt#--}" '%s' "${arg#*=}" ;;
    --config|--workdir|--python)
      if (( $# == 0 )) || [[ $1 == --* ]]; then die "$arg needs a value."; fi
      printf -v "${arg#--}" '%s' "$1"; shift ;;
    --install=*|--dry-run=*|--install|--dry-run)
      opt=${arg%%=*}
      if [[ $arg == *=* ]]; then value=${arg#*=}
      else value=1; if (( $# )) && [[ $1 == 0 || $1 == 1 ]]; then value=$1; shift; fi; fi
      [[ $value == 0 || $value == 1 ]] || die "$opt takes 0 or 1, not '$value'."
      opt=${opt#--}; printf -v "${opt//-/_}" '%s' "$value" ;;
    *) passthrough+=("$arg") ;;
  esac
done
take_dry_run

[[ -n $config ]] || die "--config is required (e.g. --config=configs/dpo.py:tiny)."
[[ -n $workdir ]] || die "--workdir is required (a local or shared-filesystem path)."
[[ $python =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python='$python' is not an interpreter name or path."

q "$repo"; (( ! dry_run )) || printf 'cd %s\n' "$REPLY"
if (( install )); then
  step "if ! command -v $python >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $python\
 $python-venv; fi && $python -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e .\
 \"jax[tpu]\" -f $libtpu_index"
fi
qjoin flaxalign train "--config=$config" "--workdir=$workdir" ${passthrough[@]+"${passthrough[@]}"}
step "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi && $REPLY"

# Sourced by launch/tpu_vm.sh, tpu_pod.sh and gpu_multinode.sh (each sets `prog` first): one-line errors, shell
# quoting for the printed commands, and --dry-run found among flaxalign's pass-through flags.
# shellcheck shell=bash disable=SC2154,SC2034  # prog, passthrough and dry_run belong to the sourcing script

die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 2; }

# shlex.quote: a word stays bare when every character is safe, else it is single-quoted ('"'"' for a quote inside).
q() {
  local LC_ALL=C sq="'" dq='"' safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ -n $1 && $1 =~ $safe ]]; then REPLY=$1; else REPLY="'${1//$sq/$sq$dq$sq$dq$sq}'"; fi
}
qjoin() { local out="" w; for w in "$@"; do q "$w"; out+="${out:+ }$REPLY"; done; REPLY=$out; }

# flaxalign has no --dry-run: one among its flags (after --) is this script's, so it never runs by mistake.
take_dry_run() {
  local rest=() arg
  for arg in ${passthrough[@]+"${passthrough[@]}"}; do
    if [[ $arg == --dry-run ]]; then dry_run=1; else rest+=("$arg"); fi
  done
  passthrough=(${rest[@]+"${rest[@]}"})
}

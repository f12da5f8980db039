#!/usr/bin/env bash
# Trains on several GPU hosts: one flaxalign process per host (it uses all of the host's GPUs), joined by
# jax.distributed through --coordinator_address (process 0's host), --num_processes and --process_id; every process
# gets the same other flags. The repository (and its .venv, if any) must be at the same path on every host, and the
# workdir on a filesystem every host shares (checkpoints are written by all processes).
#   --launcher slurm: one `srun --nodes=N --ntasks-per-node=1` (inside an allocation: salloc or an sbatch script);
#                     each task takes $SLURM_PROCID as its process id and the step's first node as the coordinator.
#   --launcher ssh:   `ssh HOST '...'` for every host of --hosts in the background, then wait; the first host is
#                     the coordinator. If one process fails, the others are stopped.
# --dry-run prints every command, one per line, instead of running it.
set -euo pipefail
prog=gpu_multinode.sh
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/_launch_lib.sh
. "$repo/launch/_launch_lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_multinode.sh --launcher=slurm --nodes=N --config=FILE:PRESET --workdir=DIR [options] [-- flags]
       launch/gpu_multinode.sh --launcher=ssh --hosts=H1,H2,... --config=FILE:PRESET --workdir=DIR [options] [-- flags]
  --launcher=slurm|ssh  how the processes start
  --nodes=N             slurm: the number of nodes (default: $SLURM_JOB_NUM_NODES inside an allocation)
  --hosts=H1,H2,...     ssh: the hosts ([user@]host), process i on the i-th
  --coordinator=HOST    ssh: the coordinator's address as the hosts reach it (default: the first host, no user@)
  --port=PORT           the coordinator's port (default 12355)
  --repo-dir=DIR        the repository on the hosts (default: this repository's path)
  --config=FILE:PRESET  flaxalign's --config, e.g. configs/dpo.py:tiny
  --workdir=DIR         a directory every host shares
  --dry-run             print the commands instead of running them
  --help                this text
Flags after -- and any --config.FIELD=VALUE go to flaxalign train unchanged (in every process).
EOF
}



launcher="" nodes="" hosts="" coordinator="" port=12355 repo_dir=$repo config="" workdir="" dry_run=0
passthrough=()
while (( $# )); do
  arg=$1; shift
  case $arg in
    --) passthrough+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --config.*) passthrough+=("$arg"); continue ;;
    --dry-run|--dry-run=*)
      value=1; [[ $arg != *=* ]] || value=${arg#*=}
      [[ $value == 0 || $value == 1 ]] || die "--dry-run takes 0 or 1, not '$value'."
      dry_run=$value; continue ;;
    --*=*) opt=${arg%%=*}; value=${arg#*=} ;;
    --*) opt=$arg; if (( $# == 0 )) || [[ $1 == --* ]]; then die "$opt needs a value."; fi; value=$1; shift ;;
    *) die "unexpected argument '$arg' (options are --name=value; flaxalign flags go after --)." ;;
  esac
  case $opt in
    --launcher|--nodes|--hosts|--coordinator|--port|--repo-dir|--config|--workdir)
      opt=${opt#--}; printf -v "${opt//-/_}" '%s' "$value" ;;
    *) die "unknown option $opt (see --help; flaxalign flags go after --)." ;;
  esac
done

take_dry_run

[[ -n $launcher ]] || die "--launcher is required (slurm or ssh)."
[[ -n $config ]] || die "--config is required (e.g. --config=configs/dpo.py:tiny)."
[[ -n $workdir ]] || die "--workdir is required (a directory every host shares)."
if ! [[ $port =~ ^[0-9]{1,5}$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
  die "--port must be a TCP port number, not '$port'."
fi

qjoin flaxalign train "--config=$config" "--workdir=$workdir" ${passthrough[@]+"${passthrough[@]}"}; train=$REPLY
q "$repo_dir"; prefix="cd $REPLY && if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi &&"

case $launcher in
  slurm)
    [[ -z $hosts ]] || die "--hosts is for --launcher=ssh; slurm takes the nodes from the allocation."
    [[ -n $nodes ]] || nodes=${SLURM_JOB_NUM_NODES:-}
    [[ -n $nodes ]] || die "--nodes is required with --launcher=slurm (outside an allocation)."
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not '$nodes'."
    # Evaluated by each task: its rank and the first node of this job step.
    task="$prefix $train --coordinator_address=\$(scontrol show hostnames \"\$SLURM_STEP_NODELIST\" | head -n 1):$port\
 --num_processes=$nodes --process_id=\$SLURM_PROCID"
    qjoin srun "--nodes=$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$task"
    line=$REPLY
    if (( dry_run )); then printf '%s\n' "$line"; exit 0; fi
    printf '+ %s\n' "$line" >&2
    exec bash -c "$line"
    ;;
  ssh)
    [[ -n $hosts ]] || die "--hosts is required with --launcher=ssh (e.g. --hosts=gpu1,gpu2)."
    [[ -z $nodes ]] || die "--nodes is for --launcher=slurm; ssh starts one process per host of --hosts."
    IFS=, read -r -a host_list <<< "$hosts"
    for host in "${host_list[@]}"; do
      [[ $host =~ ^[A-Za-z0-9_.@:-]+$ ]] || die "--hosts: '$host' is not a host name."
    done
    [[ -n $coordinator ]] || coordinator=${host_list[0]#*@}
    [[ $coordinator =~ ^[A-Za-z0-9_.:-]+$ ]] || die "--coordinator: '$coordinator' is not a host name."
    n=${#host_list[@]}
    lines=()
    for (( i = 0; i < n; i++ )); do
      qjoin ssh -o BatchMode=yes "${host_list[i]}" "$prefix $train --coordinator_address=$coordinator:$port\
 --num_processes=$n --process_id=$i"
      lines+=("$REPLY")
    done
    if (( dry_run )); then printf '%s &\n' "${lines[@]}"; printf 'wait\n'; exit 0; fi
    pids=()
    stop() { local pid; for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
    trap 'stop; exit 130' INT TERM
    for line in "${lines[@]}"; do
      printf '+ %s &\n' "$line" >&2
      bash -c "$line" &
      pids+=("$!")
    done
    # The first process to fail stops the others (they would wait for it in a collective until a timeout).
    for (( left = n; left > 0; left-- )); do
      rc=0; wait -n || rc=$?
      if (( rc != 0 )); then
        printf '%s: a process exited with status %s; stopping the others.\n' "$prog" "$rc" >&2
        stop; wait || true; exit "$rc"
      fi
    done
    ;;
  *) die "--launcher must be slurm or ssh, not '$launcher'." ;;
esac

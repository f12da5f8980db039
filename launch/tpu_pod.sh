#!/usr/bin/env bash
# Trains on a multi-host Cloud TPU pod slice (e.g. v5litepod-16: 4 hosts of 4 chips) from your workstation, with
# gcloud. Steps, each optional except the run: create the TPU VM (--create; as a queued resource with --queued; spot
# with --spot) → copy this repository to every worker (--copy) → install it there (--install) → a setup command on
# every worker (--setup, e.g. fetch the weights) → ONE `gcloud compute tpus tpu-vm ssh --worker=all` that starts
# `flaxalign train` with the same flags on every host. No --coordinator_address/--num_processes/--process_id on TPU
# VMs: jax.distributed detects the slice and this host's index by itself (flaxalign/sharding.py).
# --resume-loop runs the job again after a preemption (a spot TPU is deleted and re-created, when --create is given,
# then copied/installed/set up again) until the run's run_summary.json says finished; each run resumes from the
# workdir's latest checkpoint by itself. --dry-run prints every command, one per line, instead of running it.
set -euo pipefail
prog=tpu_pod.sh
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/_launch_lib.sh
. "$repo/launch/_launch_lib.sh"
remote_repo=flaxalign  # on every worker: ~/flaxalign
remote_log=/tmp/flaxalign-worker.log
libtpu_index=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=TPU --zone=ZONE --config=FILE:PRESET --workdir=DIR [options] [-- flaxalign flags]
  --name=TPU               the TPU VM (with --queued also the queued resource's name)
  --zone=ZONE              e.g. us-west4-a
  --project=PROJECT        default: gcloud's configured project
  --config=FILE:PRESET     flaxalign's --config, e.g. configs/dpo.py:tiny
  --workdir=DIR            gs://bucket/run or a path every worker shares (relative: under ~/flaxalign)
  --create                 create the TPU VM first (needs --accelerator-type and --version); an existing READY
                           one is used as it is, a preempted one is deleted and created again
  --queued                 ... as a queued resource, waiting until it is ACTIVE
  --spot                   ... as a spot TPU (preemptible; pair with --resume-loop)
  --accelerator-type=TYPE  e.g. v5litepod-16, v4-32, v5p-16, v6e-16
  --version=RUNTIME        TPU runtime, e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base
  --copy                   copy this repository (files git tracks or would track) to ~/flaxalign on every worker
  --install                create ~/flaxalign/.venv on every worker, install flaxalign and jax[tpu] (libtpu)
  --python=PYTHON          the interpreter for --install (default python3.11; apt-installed if missing)
  --setup=COMMAND          a shell command run on every worker after copy/install (e.g. fetch weights)
  --resume-loop            run again after a preemption until run_summary.json says finished
  --max-attempts=N         with --resume-loop (default 20)
  --retry-wait=SECONDS     pause between attempts and state polls (default 60)
  --logs=DIR               tee each worker's output to /tmp/flaxalign-worker.log, copy them to DIR/worker-I.log
                           (DIR/attempt-K/worker-I.log with --resume-loop)
  --num-workers=N          hosts in the slice (default: from --accelerator-type; needed by --logs)
  --dry-run                print the commands instead of running them
  --help                   this text
Flags after -- and any --config.FIELD=VALUE go to flaxalign train unchanged (on every worker).
EOF
}

say() { if (( ! dry_run )); then printf '%s: %s\n' "$prog" "$*" >&2; fi; }


# One shell command line: printed under --dry-run; else echoed to stderr and run (bash, pipefail).
step() {
  if (( dry_run )); then printf '%s\n' "$1"; return 0; fi
  printf '+ %s\n' "$1" >&2
  bash -o pipefail -c "$1"
}

name="" zone="" project="" config="" workdir="" accelerator="" version="" python=python3.11 setup="" logs=""
create=0 queued=0 spot=0 copy=0 install=0 resume_loop=0 dry_run=0 num_workers="" max_attempts=20 retry_wait=60
passthrough=()
while (( $# )); do
  arg=$1; shift
  case $arg in
    --) passthrough+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --config.*) passthrough+=("$arg"); continue ;;
    --*=*) opt=${arg%%=*}; value=${arg#*=}; has_value=1 ;;
    --*) opt=$arg; value=""; has_value=0 ;;
    *) die "unexpected argument '$arg' (options are --name=value; flaxalign flags go after --)." ;;
  esac
  case $opt in
    --create|--queued|--spot|--copy|--install|--resume-loop|--dry-run)
      if (( ! has_value )); then
        value=1
        if (( $# )) && [[ $1 == 0 || $1 == 1 ]]; then value=$1; shift; fi
      fi
      [[ $value == 0 || $value == 1 ]] || die "$opt takes 0 or 1, not '$value'."
      opt=${opt#--}; printf -v "${opt//-/_}" '%s' "$value" ;;
    --name|--zone|--project|--config|--workdir|--accelerator-type|--version|--python|--setup|--logs|--num-workers|\
    --max-attempts|--retry-wait)
      if (( ! has_value )); then
        if (( $# == 0 )) || [[ $1 == --* ]]; then die "$opt needs a value."; fi
        value=$1; shift
      fi
      case $opt in
        --accelerator-type) accelerator=$value ;;
        *) opt=${opt#--}; printf -v "${opt//-/_}" '%s' "$value" ;;
      esac ;;
    *) die "unknown option $opt (see --help; flaxalign flags go after --)." ;;
  esac
done

take_dry_run

[[ -n $name ]] || die "--name is required (the TPU VM's name)."
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name='$name' is not a TPU name (lowercase letters, digits, -)."
[[ -n $zone ]] || die "--zone is required (e.g. --zone=us-west4-a)."
[[ -n $config ]] || die "--config is required (e.g. --config=configs/dpo.py:tiny)."
[[ -n $workdir ]] || die "--workdir is required (gs://bucket/run or a path every worker shares)."
if (( create )); then
  [[ -n $accelerator ]] || die "--create needs --accelerator-type (e.g. v5litepod-16)."
  [[ -n $version ]] || die "--create needs --version (the TPU runtime, e.g. v2-alpha-tpuv5-lite)."
else
  (( ! queued )) || die "--queued needs --create."
  (( ! spot )) || die "--spot needs --create."
fi
[[ $max_attempts =~ ^[1-9][0-9]*$ ]] || die "--max-attempts must be a positive integer, not '$max_attempts'."
[[ $retry_wait =~ ^[0-9]+$ ]] || die "--retry-wait must be a number of seconds, not '$retry_wait'."
[[ -z $num_workers || $num_workers =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer."
[[ $python =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python='$python' is not an interpreter name or path."

# Hosts of a slice from its accelerator type: v2/v3/v4/v5p count TensorCores (8 per host), v5e/v6e count chips
# (one host up to 8 chips, then 4 per host).
hosts_of() {
  local count=${1##*-}
  [[ $count =~ ^[0-9]+$ ]] || return 1
  case $1 in
    v2-*|v3-*|v4-*|v5p-*) REPLY=$(( count <= 8 ? 1 : count / 8 )) ;;
    v5litepod-*|v5e-*|v6e-*) REPLY=$(( count <= 8 ? 1 : count / 4 )) ;;
    *) return 1 ;;
  esac
}
if [[ -n $logs && -z $num_workers ]]; then
  if [[ -n $accelerator ]] && hosts_of "$accelerator"; then num_workers=$REPLY
  else die "--logs needs --num-workers (or a known --accelerator-type to derive it)."; fi
fi

loc=("--zone=$zone")
[[ -z $project ]] || loc+=("--project=$project")
[[ $workdir == / ]] || workdir=${workdir%/}

# ---- the command lines ----
on_all() { qjoin gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all "--command=$1"; }

provision_lines=()
if (( queued )); then
  create_args=(gcloud compute tpus queued-resources create "$name" "${loc[@]}" "--node-id=$name"
               "--accelerator-type=$accelerator" "--runtime-version=$version")
  (( ! spot )) || create_args+=(--spot)
  qjoin "${create_args[@]}"; provision_lines+=("$REPLY")
  qjoin gcloud compute tpus queued-resources describe "$name" "${loc[@]}" '--format=value(state.state)'
  provision_lines+=("until s=\$($REPLY) && [ \"\$s\" = ACTIVE ]; do case \$s in FAILED|SUSPENDED) echo \"queued\
 resource $name is \$s\" >&2; exit 1;; esac; sleep $retry_wait; done")
  qjoin gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force --quiet; delete_line=$REPLY
else
  create_args=(gcloud compute tpus tpu-vm create "$name" "${loc[@]}" "--accelerator-type=$accelerator"
               "--version=$version")
  (( ! spot )) || create_args+=(--spot)
  qjoin "${create_args[@]}"; provision_lines+=("$REPLY")
  qjoin gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" --quiet; delete_line=$REPLY
fi
qjoin gcloud compute tpus tpu-vm describe "$name" "${loc[@]}" '--format=value(state)'; describe_line=$REPLY

prepare_lines=()
if (( copy )); then
  # A clean copy of the files git lists (tracked, and untracked but not ignored: no .venv, runs/, .git), so that
  # `scp --recurse` sends the source only; a tracked file deleted in the working tree is skipped.
  stage="/tmp/flaxalign-launch-$name"
  q "$repo"; qrepo=$REPLY; q "$stage/$remote_repo"; qstage=$REPLY
  prepare_lines+=("rm -rf $stage" "mkdir -p $qstage")
  prepare_lines+=("cd $qrepo && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f;\
 do if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done | tar --null -T - -cf - | tar -C $qstage -xf -")
  qjoin gcloud compute tpus tpu-vm scp --recurse "$stage/$remote_repo" "$name:" "${loc[@]}" --worker=all
  prepare_lines+=("$REPLY")
fi
if (( install )); then
  on_all "cd $remote_repo && if ! command -v $python >/dev/null; then sudo apt-get update -qq && sudo apt-get\
 install -y -qq $python $python-venv; fi && $python -m venv .venv && .venv/bin/pip install -q -U pip &&\
 .venv/bin/pip install -q -e . \"jax[tpu]\" -f $libtpu_index"
  prepare_lines+=("$REPLY")
fi
if [[ -n $setup ]]; then on_all "$setup"; prepare_lines+=("$REPLY"); fi

qjoin flaxalign train "--config=$config" "--workdir=$workdir" ${passthrough[@]+"${passthrough[@]}"}; train=$REPLY
remote="cd $remote_repo && if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi && $train"
[[ -z $logs ]] || remote="cd $remote_repo && set -o pipefail && if [ -f .venv/bin/activate ]; then\
 . .venv/bin/activate; fi && $train 2>&1 | tee $remote_log"
qjoin gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all --ssh-flag=-oServerAliveInterval=60 \
  --ssh-flag=-oServerAliveCountMax=5 "--command=$remote"
run_line=$REPLY
# A process left over from an interrupted attempt would hold the TPU chips.
on_all 'pkill -f "[b]in/flaxalign train"; sleep 5; true'; cleanup_line=$REPLY

if [[ $workdir == gs://* ]]; then
  # (process substitution, not a pipe: grep -q stops reading at the match, which must not fail the check)
  q "$workdir/run_summary.json"; check_line="grep -q finished.:.true <(gcloud storage cat $REPLY)"
else
  q "$workdir/run_summary.json"
  qjoin gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=0 \
    "--command=cd $remote_repo && grep -q finished.:.true $REPLY"
  check_line=$REPLY
fi

collect_logs() {  # collect_logs ATTEMPT: copy each worker's log here (a failure only warns: the TPU may be gone)
  local dir=$logs worker
  (( ! resume_loop )) || dir="$logs/attempt-$1"
  q "$dir"; step "mkdir -p $REPLY"
  for (( worker = 0; worker < num_workers; worker++ )); do
    qjoin gcloud compute tpus tpu-vm scp "$name:$remote_log" "$dir/worker-$worker.log" "${loc[@]}" "--worker=$worker"
    step "$REPLY" || say "warning: could not copy worker $worker's log."
  done
}

tpu_state() {  # REPLY = the TPU VM's state (READY, PREEMPTED, ...), MISSING when it does not exist
  local out errors tries
  errors=$(mktemp)
  for (( tries = 0; tries < 10; tries++ )); do
    if out=$(bash -c "$describe_line" 2>"$errors"); then REPLY=${out:-UNKNOWN}; rm -f "$errors"; return 0; fi
    if grep -q NOT_FOUND "$errors"; then REPLY=MISSING; rm -f "$errors"; return 0; fi
    sleep "$retry_wait"
  done
  printf '%s: cannot read the state of TPU %s: %s\n' "$prog" "$name" "$(tail -n 1 "$errors")" >&2
  rm -f "$errors"; exit 1
}

settled_state() {  # tpu_state, after waiting out the passing states (at most 60 polls)
  local polls
  for (( polls = 0; polls < 60; polls++ )); do
    tpu_state
    case $REPLY in
      CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|DELETING|STOPPING|UNKNOWN) sleep "$retry_wait" ;;
      *) return 0 ;;
    esac
  done
}

# ---- run ----
provision() { local line; for line in "${provision_lines[@]}"; do step "$line"; done; }
prepare() { local line; for line in ${prepare_lines[@]+"${prepare_lines[@]}"}; do step "$line"; done; }
gone() { [[ $1 == PREEMPTED || $1 == TERMINATED || $1 == MISSING ]]; }
if (( create && ! dry_run )); then  # running the same command again later: an existing READY TPU is used as it is
  settled_state
  if [[ $REPLY == READY ]]; then say "TPU $name exists and is READY: not creating it."
  elif [[ $REPLY == MISSING ]]; then provision
  elif gone "$REPLY"; then say "TPU $name is $REPLY: re-creating it."; step "$delete_line" || true; provision
  else say "TPU $name is $REPLY: not touching it."; exit 1; fi
elif (( create )); then
  provision
fi
prepare
attempt=1
while :; do
  rc=0
  step "$run_line" || rc=$?
  [[ -z $logs ]] || collect_logs "$attempt"
  (( resume_loop )) || exit "$rc"
  if (( dry_run )); then
    printf '%s\n' "$check_line"
    printf '# --resume-loop: until that check passes (at most %s attempts, %s s apart): %s\n' \
      "$max_attempts" "$retry_wait" "$describe_line"
    if (( create )); then
      printf '# if the TPU is not READY: %s, then the create, copy, install and setup lines above again\n' \
        "$delete_line"
    else
      printf '# if the TPU is not READY: stop (without --create the script cannot re-create it)\n'
    fi
    printf '# if it is READY: %s\n' "$cleanup_line"
    printf '# then the run line again (flaxalign resumes from the latest checkpoint in the workdir)\n'
    exit 0
  fi
  if step "$check_line"; then say "the run is finished (attempt $attempt)."; exit 0; fi
  if (( rc == 2 )); then say "exit status 2 (a flag or config error): not retrying."; exit 2; fi
  if (( attempt >= max_attempts )); then say "not finished after $attempt attempts; giving up."; exit 1; fi
  attempt=$(( attempt + 1 ))
  say "not finished (exit status $rc); attempt $attempt in $retry_wait s."
  sleep "$retry_wait"
  settled_state
  if [[ $REPLY == READY ]]; then
    step "$cleanup_line" || true
  elif gone "$REPLY" && (( create )); then
    say "TPU $name is $REPLY: re-creating it."
    step "$delete_line" || true
    provision
    prepare
  elif gone "$REPLY"; then
    say "TPU $name is $REPLY; pass --create (with --accelerator-type and --version) to re-create it."; exit 1
  else
    say "TPU $name is $REPLY: not touching it."; exit 1
  fi
done

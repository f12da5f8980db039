"""One run per workdir (`flaxalign.train.workdir_lock`): a second run is refused with one line naming the holder's pid
and host; the lock goes with its holder however it ends (SIGKILL included), so a killed run never leaves a stale
lock; a pipeline's hold on its workdir does not block its stages.

The holder is a real second process (a few lines of Python that take the lock and wait), so these tests exercise
the kernel's `flock` between processes, not a flag inside this one; each costs well under a second.
"""

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys

import pytest

from flaxalign import main
from flaxalign.train import workdir_lock
from tests import cli_helpers as cli

HOLDER = ("import sys\n"
          "from flaxalign.train import workdir_lock\n"
          "fd = workdir_lock.acquire(sys.argv[1])\n"
          "print('locked', flush=True)\n"
          "sys.stdin.read()  # hold until the test closes stdin\n")
WAIT_SECONDS = 60


@contextlib.contextmanager
def held_by_another_process(workdir: str):
    """A child process that holds `workdir`'s lock until the block ends; yields it (a Popen)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=cli.REPO, env=cli.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_SECONDS)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "locked", f"the holder did not take the lock: {proc.stderr.read()[-2000:]}"
        yield proc
    finally:
        cli.kill_group(proc)


def refusal(workdir: str, pid: int) -> str:
    return (f"workdir {workdir} is in use by another flaxalign run (pid {pid} on host {socket.gethostname()}); "
            "wait for it to finish or use another --workdir.")


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    with held_by_another_process(workdir) as holder:
        with pytest.raises(workdir_lock.WorkdirError) as refused:
            workdir_lock.acquire(workdir)
        assert str(refused.value) == refusal(workdir, holder.pid)


def test_the_lock_goes_with_a_sigkilled_holder(tmp_path):
    """kill -9 runs no clean-up code: the kernel alone releases the lock, so the next run starts."""
    workdir = str(tmp_path / "run")
    with held_by_another_process(workdir) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=WAIT_SECONDS)
        assert holder.returncode == -signal.SIGKILL
        fd = workdir_lock.acquire(workdir)  # raises if the dead holder's lock had stayed
        workdir_lock.release(fd)


def test_the_lock_goes_with_a_holder_that_exits(tmp_path):
    workdir = str(tmp_path / "run")
    with held_by_another_process(workdir) as holder:
        holder.stdin.close()  # the holder's read returns and it exits normally, without releasing explicitly
        holder.wait(timeout=WAIT_SECONDS)
        assert holder.returncode == 0, holder.stderr.read()
        with workdir_lock.hold(workdir):
            pass


def test_hold_releases_at_the_end_of_its_block(tmp_path):
    """In-process callers (tests, a pipeline) take and drop the lock around their work: a later hold succeeds, one
    while it is held does not (a second descriptor is a second holder, even in the same process)."""
    workdir = str(tmp_path / "run")
    with workdir_lock.hold(workdir):
        with pytest.raises(workdir_lock.WorkdirError, match="is in use by another flaxalign run"):
            workdir_lock.acquire(workdir)
    with workdir_lock.hold(workdir):
        pass


def test_a_pipeline_holding_its_workdir_does_not_block_its_stages(tmp_path):
    """`flaxalign pipeline` locks W; each stage (`flaxalign train --workdir=W/NAME`) locks W/NAME: another file."""
    with workdir_lock.hold(str(tmp_path)):
        with workdir_lock.hold(str(tmp_path / "clm")):
            pass


@pytest.fixture
def parsed_flags():
    yield main.FLAGS
    main.FLAGS.unparse_flags()


def _error_line(capsys, action) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        action()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    assert [line for line in lines if line.startswith("flaxalign: error: ")] == lines[-1:], err[-2000:]
    return lines[-1].removeprefix("flaxalign: error: ")


# were the lock ignored, the command would end in seconds rather than train the preset (or the whole pipeline); set
# on the parsed config, not as --config.* flags (absl keeps an override flag defined for the rest of the process)
QUICK_CLM = {"steps": 0, "data.max_chars": 20000}
QUICK = {"train": QUICK_CLM,
         "pipeline": {"stop_after": "clm", "clm.args": " ".join(f"--config.{k}={v}" for k, v in QUICK_CLM.items())}}


def _set(config, values: dict) -> None:
    for key, value in values.items():
        *parents, leaf = key.split(".")
        for parent in parents:
            config = config[parent]
        config[leaf] = value


@pytest.mark.parametrize("command, config", [("train", "configs/clm.py:tiny"),
                                             ("pipeline", "configs/pipeline.py:tiny")])
def test_train_and_pipeline_on_a_held_workdir_exit_2_with_one_line(command, config, tmp_path, parsed_flags,
                                                                   monkeypatch, capsys):
    """Through main's own error path, as `flaxalign train|pipeline --workdir=W` while another process holds W;
    nothing of the holder's is touched (the lock file still names it)."""
    workdir = str(tmp_path / "run")
    argv = ["flaxalign", command, f"--config={os.path.join(cli.REPO, config)}", f"--workdir={workdir}"]
    monkeypatch.setattr(sys, "argv", argv)
    main.parse_flags(argv)
    _set(main.FLAGS.config, QUICK[command])
    with held_by_another_process(workdir) as holder:
        action = main.train_command if command == "train" else main.pipeline_command
        assert _error_line(capsys, action) == refusal(workdir, holder.pid)
        assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
        with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
            assert f'"pid": {holder.pid}' in f.read()

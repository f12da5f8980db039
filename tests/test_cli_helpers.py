"""The subprocess helpers of the CLI tests leave nothing running: an orphaned grandchild (a pipeline's stage) is
killed with its group, and a failed process of a multi-process job stops its peers at once."""

import os
import subprocess
import sys
import time

import pytest

from tests import cli_helpers as cli

# Writes its pid to argv[1] and sleeps far past any test's timeout: it only ends if someone kills it.
SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"


def _wait_for_pid(path: str) -> int:
    for _ in range(300):  # a bounded wait for the file, not a timing check
        if os.path.exists(path) and open(path).read():
            return int(open(path).read())
        time.sleep(0.05)
    pytest.fail(f"{path} was never written")


def _gone(pid: int) -> bool:
    for _ in range(100):  # SIGKILL is delivered asynchronously; give the kernel a moment
        if not cli.running(pid):
            return True
        time.sleep(0.05)
    return False


def test_finish_kills_a_grandchild_the_child_left_behind(tmp_path):
    pid_file = str(tmp_path / "grandchild.pid")
    parent = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, {pid_file!r}], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    grandchild = _wait_for_pid(pid_file)
    try:
        rc, _, err = cli.finish(proc, timeout=60)
        assert rc == 0, err
        assert _gone(grandchild), "the orphaned grandchild still runs"
    finally:
        if cli.running(grandchild):
            os.kill(grandchild, 9)


def test_run_together_stops_the_peers_of_a_failed_process(tmp_path):
    """Process 0 fails once process 1 is up; process 1 would sleep 600 s. The helper fails with process 0's
    output and kills process 1 (with a 120 s timeout, a helper that waited would fail with another message)."""
    pid_file = str(tmp_path / "peer.pid")
    failing = (f"import os, sys, time\nwhile not os.path.exists({pid_file!r}): time.sleep(0.05)\n"
               "print('boom: the coordinator is unreachable'); sys.exit(3)")
    with pytest.raises(pytest.fail.Exception) as failure:
        cli.run_together([[sys.executable, "-c", failing], [sys.executable, "-c", SLEEPER, pid_file]], timeout=120)
    message = str(failure.value)
    assert "process 0 of 2 exited with 3" in message and "boom: the coordinator is unreachable" in message
    peer = _wait_for_pid(pid_file)
    assert _gone(peer), "the peer of the failed process still runs"

"""One flaxalign run per workdir: an advisory lock on `WORKDIR/flaxalign.lock`.

The lock is `flock(LOCK_EX | LOCK_NB)` on a descriptor held open while the run lives. The kernel drops it when that
descriptor closes, which happens on any exit — a normal one, an exception, SIGKILL, a crash — so a lock can never be
left stale and nothing has to be cleaned up after a killed run. The file itself stays (deleting a lock file opens a
race between a run that opened it and one that recreates it); its one line names the last holder, so a refused run
can say which process holds the workdir.

The lock is as wide as the filesystem's locks: on a local disk or NFS every process on every host sees it; a
filesystem without working `flock` is used unlocked, with a warning.
"""

import contextlib
import fcntl
import json
import os
import socket

from absl import logging

from flaxalign import errors

LOCK_FILE = "flaxalign.lock"


class WorkdirError(errors.FlaxalignError):
    """The workdir cannot be used: in use by another run, a file, or not writable."""


def prepare(workdir: str) -> None:
    """Creates `workdir` if needed; one-line errors when a file is in the way or it cannot be written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory; give the path of a directory (it is "
                           "created if it does not exist).")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir={workdir}: {_reason(e)} ({e.filename}).") from None
    # a read-only directory can still hold a writable lock file left by an earlier run: check the directory itself
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir} is not writable; checkpoints, metrics and the report are written "
                           "there, so give a directory you can write to.")


def acquire(workdir: str) -> int:
    """Creates `workdir` if needed and locks it; returns the descriptor that holds the lock (close it to release).
    Raises `WorkdirError` when another process holds it."""
    prepare(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} is not writable ({_reason(e)}: {path}).") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirError(f"workdir {workdir} is in use by another flaxalign run ({holder}); wait for it to finish "
                           "or use another --workdir.") from None
    except OSError as e:  # e.g. ENOLCK: a filesystem without flock
        logging.warning("Cannot lock %s (%s): nothing stops a second run on this workdir.", path, _reason(e))
        return fd
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def hold(workdir: str):
    """`acquire` for the duration of a `with` block (and, since the kernel holds it, no longer than the process)."""
    fd = acquire(workdir)
    try:
        yield
    finally:
        release(fd)


def _holder(fd: int) -> str:
    """'pid P on host H' from the lock file, or a note when the holder has not written its line yet."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(record['pid'])} on host {record['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and host not recorded yet"


def _reason(e: OSError) -> str:
    return (e.strerror or type(e).__name__).lower()

"""SIGTERM (a TPU preemption, `kill`, a scheduler's stop) as a flag, from the first moment of `flaxalign train`.

`flaxalign train` installs the handler before JAX, the data or any compile starts, so a SIGTERM at any point of the
run sets the flag instead of killing the process: during start-up the run stops before training (nothing to save),
during training the loop saves a checkpoint at the next step and stops, after the loop the run just finishes.
Either way the exit status is 0.

The handler records; it never raises, so whatever runs when the signal arrives (a compile, an Orbax save) is never
interrupted half-way.
"""

import contextlib
import signal

_requested = False
_installed = False
_previous = None  # the handler before the first `install`, put back by `uninstall`


def _handle(signum, frame):
    global _requested
    _requested = True


def install() -> bool:
    """Installs the recording handler (again, if something replaced it since: JAX's multi-process start-up puts a
    SIGTERM handler of its own in place). False off the main thread, where signals cannot be handled."""
    global _installed, _previous
    try:
        previous = signal.signal(signal.SIGTERM, _handle)
    except ValueError:  # not the main thread
        return False
    if not _installed:
        _installed, _previous = True, previous
    return True


def reinstall() -> None:
    """`install` again if it was installed (after library start-up code that may have replaced the handler)."""
    if _installed:
        install()


def installed() -> bool:
    return _installed


def uninstall() -> None:
    """Puts the handler from before `install` back and forgets any recorded SIGTERM."""
    global _installed, _previous, _requested
    if _installed:
        signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
    _installed, _previous, _requested = False, None, False


def requested() -> bool:
    """Whether this process got SIGTERM since `install`."""
    return _requested


def any_process_requested() -> bool:
    """Whether any process of the run got SIGTERM; a collective in multi-process runs (call it on every process)."""
    import jax
    if jax.process_count() == 1:
        return _requested
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(_requested))))


class Watch:
    """What the training loop asks between steps."""

    def any_process(self, step: int, every: int = 10) -> bool:
        """Whether any process got SIGTERM. Across processes this is a collective, so it runs only every `every`
        steps (the same steps everywhere) rather than syncing the hosts after each step."""
        import jax
        if jax.process_count() > 1 and step % every:
            return False
        return any_process_requested()


@contextlib.contextmanager
def watching():
    """The flag for the length of a training loop. Under `flaxalign train` the handler is already installed and
    stays after the loop (a SIGTERM while the report is written still ends in exit 0), and a SIGTERM that arrived
    before the loop is kept, so its first step saves and stops. Called elsewhere (in-process tests, a library
    user), it installs the handler here and puts the previous one back on leaving."""
    owner = not _installed
    install()
    try:
        yield Watch()
    finally:
        if owner:
            uninstall()

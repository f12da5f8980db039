"""Atomic file writes: readers see the old file or the new one, never half."""

import os
import tempfile


def write_atomically(path: str, write) -> None:
    """Calls write(binary_file) on a temporary file, then renames it to path.

    The temporary file lives in the same folder, so the rename is atomic, and
    it is removed if writing fails.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            write(tmp_file)
        # mkstemp makes the file private (0600); the result is an ordinary file.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise

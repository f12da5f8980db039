"""Which files a data spec (a file, a folder or a glob) names, in a fixed order."""

import glob
import os

from flaxalign.errors import DataError


def list_files(spec: str, *, suffixes: tuple[str, ...] | None = None, label: str = "data path") -> list[str]:
    """The file itself; the non-hidden files below a folder (only `suffixes` if given), sorted by relative path so
    the order does not depend on the file system; or the sorted matches of a glob (folders expanded)."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        return _files_under(spec, suffixes)
    if glob.has_magic(spec):
        files = []
        for match in sorted(glob.glob(spec, recursive=True)):
            files.extend(_files_under(match, suffixes) if os.path.isdir(match) else [match])
        if files:
            return files
        raise DataError(f"{label} '{spec}' does not exist (the glob matches no file).")
    raise DataError(f"{label} '{spec}' does not exist.")


def _files_under(folder: str, suffixes: tuple[str, ...] | None) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # .git, .cache hold no data
        found.extend(os.path.join(root, name) for name in names
                     if not name.startswith(".") and (suffixes is None or os.path.splitext(name)[1] in suffixes))
    return sorted(found, key=lambda path: os.path.relpath(path, folder))

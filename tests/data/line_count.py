"""Counting the Python lines a call executes inside `flaxalign/`: a deterministic measure of Python-level work.

Data code that must be fast does its per-token work in NumPy (C), so the Python lines it runs grow with the number
of documents or records, never with the number of tokens. Tests compare line counts of inputs that differ only in
their token count; unlike a wall-clock threshold this does not depend on how busy the machine is.
"""

import os
import sys

import flaxalign

PACKAGE = os.path.dirname(os.path.abspath(flaxalign.__file__)) + os.sep


def python_lines(fn, *args, **kwargs):
    """(fn(*args, **kwargs), the number of Python lines it executed in flaxalign's own files)."""
    count = 0

    def count_lines(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return count_lines

    def on_call(frame, event, arg):
        # Trace lines only in flaxalign's frames (comprehensions and generators included); numpy's Python
        # wrappers and the standard library are not the code under test.
        return count_lines if frame.f_code.co_filename.startswith(PACKAGE) else None

    previous = sys.gettrace()  # e.g. a coverage tracer, put back afterwards
    sys.settrace(on_call)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.settrace(previous)
    return result, count

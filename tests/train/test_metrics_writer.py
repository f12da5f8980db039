"""`metrics.jsonl` stays a valid record across faults: every line is strict JSON (NaN and ±inf as null, and not sent
to TensorBoard), a fresh start drops the rows of an earlier attempt (the step-0 evaluation of a run killed before its
first checkpoint is not duplicated), a resume keeps exactly the rows up to its step, a line torn by a kill is
dropped with a warning, and damage before the last line stops the run with one line naming the file and the line.
"""

import json
import logging as pylogging

import numpy as np
import pytest

from flaxalign import errors, main
from flaxalign.train.metrics import MetricsWriter


def strict_rows(path) -> list[dict]:
    """The file's rows, parsed by a JSON reader that refuses NaN/Infinity (which Python's default accepts)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


class RecordingBoard:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        pass


def test_non_finite_values_are_written_as_null_and_not_plotted(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.close()
    writer._tb = RecordingBoard()  # what would go to TensorBoard
    writer.write(1, {"loss": np.float32("nan"), "grad_norm": float("inf"), "lr": -float("inf"), "mfu": 0.25,
                     "tokens_per_sec": np.float64(1000.0)})
    assert strict_rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": None, "grad_norm": None, "lr": None, "mfu": 0.25, "tokens_per_sec": 1000.0}]
    assert writer._tb.scalars == [("mfu", 0.25, 1), ("tokens_per_sec", 1000.0, 1)]


def write_rows(path, steps, tail: str = "") -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in steps)
        f.write(tail)


def test_a_fresh_start_drops_every_earlier_row(tmp_path):
    """A run killed after its step-0 evaluation row but before its first checkpoint starts again from scratch
    (`resume_step=None`): its step-0 row is written once, not twice."""
    write_rows(tmp_path / "metrics.jsonl", [0])
    writer = MetricsWriter(str(tmp_path), resume_step=None)
    writer.write(0, {"eval_loss": 2.0})
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [0]


def test_a_resume_keeps_the_rows_up_to_its_step(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [0, 1, 2, 3, 4, 5])
    MetricsWriter(str(tmp_path), resume_step=3)
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


@pytest.mark.parametrize("tail", ['{"step": 4, "lo', "\x00\x00\x00", '{"step": 4, "loss": 0.2}garbage\n'])
def test_a_torn_last_line_is_dropped_with_a_warning(tail, tmp_path, caplog):
    """What a kill in the middle of a write leaves (a cut row, zero bytes from a lost page, a row with trailing
    bytes): the rest resumes as if the last write had never started."""
    write_rows(tmp_path / "metrics.jsonl", [1, 2, 3], tail)
    with caplog.at_level(pylogging.WARNING):
        writer = MetricsWriter(str(tmp_path), resume_step=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == pylogging.WARNING]
    assert len(warnings) == 1 and "dropped its last line 4" in warnings[0], warnings
    writer.write(4, {"loss": 0.2})
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_valid_last_row_missing_only_its_newline_is_kept(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [1, 2], '{"step": 3, "loss": 0.25}')
    writer = MetricsWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"loss": 0.2})
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


BAD_MIDDLE_LINES = {  # the line, what the message says about it
    "not JSON": ("garbage\n", "is not JSON (Expecting value at column 1)"),
    "a JSON list": ("[1, 2]\n", 'is not a metrics row (a JSON object with an integer "step")'),
    "no step": ('{"loss": 1.0}\n', 'is not a metrics row (a JSON object with an integer "step")'),
    "not UTF-8": ("\udcff\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_MIDDLE_LINES))
def test_damage_before_the_last_line_is_one_error_line_naming_the_file_and_line(case, tmp_path, capsys):
    """Through main's error path: exit 2, one line, the file left as it was (the user decides what to repair)."""
    line, problem = BAD_MIDDLE_LINES[case]
    path = tmp_path / "metrics.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"step": 1, "loss": 0.5}\n' + line.encode("utf-8", "surrogateescape") + b'{"step": 3}\n')
    before = path.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        with main.user_errors(with_jax=False):
            MetricsWriter(str(tmp_path), resume_step=3)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"flaxalign: error: {path} line 2 {problem}; delete or repair that line (every line is one JSON row with a "
        '"step"), or use a new --workdir.')
    assert path.read_bytes() == before


def test_processes_other_than_0_check_the_file_but_never_write_it(tmp_path):
    """Every process reads the shared file (so damage stops all of them alike); only process 0 rewrites it."""
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [1], "garbage\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(errors.DataError, match="line 2"):
        MetricsWriter(str(tmp_path), enabled=False, resume_step=2)
    write_rows(path, [1, 2, 3])
    before = path.read_bytes()
    MetricsWriter(str(tmp_path), enabled=False, resume_step=1).write(2, {"loss": 1.0})
    assert path.read_bytes() == before

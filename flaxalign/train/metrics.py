"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, the console."""

import json
import math
import os
import time

from absl import logging

from flaxalign import errors


class MetricsWriter:
    """Writes on process 0 only. `resume_step=N` (a resumed run) keeps the rows of steps up to N and drops the later
    ones, so the file reads as one uninterrupted run; `resume_step=None` (a fresh start) drops every existing row,
    e.g. the step-0 evaluation of a run killed before its first checkpoint. Non-finite values are written as null:
    every line is valid JSON."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        # every process reads the kept rows (the workdir is shared), so a damaged file stops all of them alike
        kept = [] if resume_step is None else [line for step, line in read_rows(self.path, warn=enabled)
                                               if step <= resume_step]
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
            logging.warning("tensorboardX is not installed; writing metrics.jsonl only.")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):  # null (non-finite) is not plotted
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_rows(path: str, *, warn: bool = True) -> list[tuple[int, bytes]]:
    """(step, line) of each row of an existing `metrics.jsonl` (line as on disk, newline-terminated), for a resume.

    A last line that is not a row is what a kill in the middle of a write leaves: it is dropped, with a warning. A
    bad line before the last is damage this code never writes: `DataError` naming the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        step, problem = _parse_row(line)
        if problem is None:
            rows.append((step, line if line.endswith(b"\n") else line + b"\n"))
        elif index == len(lines) - 1:
            if warn:
                logging.warning("%s: dropped its last line %d, %s (a write cut short, e.g. by a kill): %r", path,
                                number, problem, line[:60])
        else:
            raise errors.DataError(f"{path} line {number} is {problem}; delete or repair that line (every line is "
                                   "one JSON row with a \"step\"), or use a new --workdir.")
    return rows


def _parse_row(line: bytes) -> tuple[int | None, str | None]:
    """(step, None) for a metrics row, else (None, what is wrong with it)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as e:
        return None, f"not JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else "not JSON"
    if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
        return None, "not a metrics row (a JSON object with an integer \"step\")"
    return row["step"], None


def _jsonable(value):
    """A metric as JSON: array scalars as Python numbers, NaN and ±inf as None (JSON has no literal for them)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def console_line(step: int, total: int, metrics: dict, started: float) -> str:
    elapsed = time.time() - started
    parts = [f"step {step}/{total}"]
    for key in ("loss", "eval_loss", "grad_norm"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    if "tokens_per_sec" in metrics:
        parts.append(f"tok/s {metrics['tokens_per_sec']:,.0f}")
    if "mfu" in metrics:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    if "step_time" in metrics and step < total:
        parts.append(f"eta {_duration((total - step) * metrics['step_time'])}")
    parts.append(f"elapsed {_duration(elapsed)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"

"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, the console."""

import json
import math
import os
import time

from absl import logging


class MetricsWriter:
    """Writes on process 0 only. On resume, rows after the restored step are dropped first, so the file reads as
    one uninterrupted run."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step or 0)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
            logging.warning("tensorboardX is not installed; writing metrics.jsonl only.")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
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

"""Running the `flaxalign` CLI in subprocesses (always with a timeout, so a hung run fails instead of hanging)."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def env(**extra) -> dict:
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    out.pop("XLA_FLAGS", None)
    return out


def small_run_flags(corpus: str, tokenizer: str, workdir: str, **config) -> list[str]:
    values = {"data.train": corpus, "data.tokenizer": tokenizer, "data.seq_len": 64, "data.batch_size": 8,
              "log_every": 1, "eval_every": 0, "steps": 6, "checkpoint_every": 0}
    values.update(config)
    return ["--config=configs/clm.py:tiny", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in values.items()]


def start(args: list[str], cpu_devices: int = 8, command: str = "train", **env_extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flaxalign.main", command, f"--cpu_devices={cpu_devices}"] + args
    return subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"flaxalign did not finish within {timeout}s; stderr tail:\n{err[-3000:]}")
    return proc.returncode, out, err


def run(args: list[str], cpu_devices: int = 8, timeout: float = TIMEOUT, command: str = "train",
        **env_extra) -> tuple[int, str, str]:
    return finish(start(args, cpu_devices, command, **env_extra), timeout)


def metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""SIGKILL at a random moment — during start-up, compilation, a step, an async checkpoint save or the final save —
never loses the last good checkpoint, and the rerun ends with the uninterrupted run's metrics, bit for bit, for CLM,
SFT, DPO, PPO (adaptive KL) and GRPO: every logged metric but the timings, so an RL rerun also samples the same
rollouts (rollout rng, data position, KL coefficient and optimizer counts all come back from the checkpoint). The
moment is drawn from a seeded generator (the seed is in the test id), so a failure can be rerun."""

import os
import random
import signal
import time

import pytest

from tests import cli_helpers as cli

pytestmark = pytest.mark.slow

STEPS, EVERY = 48, 8
COMMON = {"steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 2, "log_every": 1, "eval_every": 0,
          "data.batch_size": 4}
RL = {"init_from": "checkpoint:{clm}", "eval_at_start": False, "eval_prompts": 0}
STAGES = {
    "clm": ("configs/clm.py:tiny", {"data.max_chars": 200_000, "data.seq_len": 32}),
    "sft": ("configs/sft.py:tiny", {"init_from": "checkpoint:{clm}", "eval_at_start": False, "data.seq_len": 32,
                                    "data.train": "builtin:arithmetic_sft?n=64"}),
    "dpo": ("configs/dpo.py:tiny", {"init_from": "checkpoint:{clm}", "eval_at_start": False, "data.seq_len": 32,
                                    "data.train": "builtin:arithmetic_preferences?n=64", "eval_kl.num_prompts": 0}),
    # the reward model is `rl_upstream`'s; the adaptive controller moves β every step
    "ppo": ("configs/ppo.py:tiny", {**RL, "reward_from": "checkpoint:{reward}", "ppo.kl_target": 0.1}),
    # a reward that differs between samples of a prompt (an untrained policy never gets an answer right)
    "grpo": ("configs/grpo.py:tiny", {**RL, "grpo.group_size": 4, "rewards": "tests.test_rewards:length_reward"}),
}
TIMINGS = ("step_time", "tokens_per_sec", "mfu")
# "startup": killed before the first step is logged (flags, data, model, compilation); a number: a seed for a moment
# in the training phase (steps, async saves, the final save)
# Each stage is killed at one moment of its training phase, each at another one (seeds 14, 3, 10, 7, 12: 10 %, 21 %,
# 51 %, 29 %, 43 % of the phase), so steps, async saves and the final save are all covered; start-up (flags, data,
# model, compilation: the same code in every stage) once, in DPO, whose start-up loads the most (a reference).
CASES = [("dpo", "startup"), ("clm", 14), ("sft", 3), ("dpo", 10), ("ppo", 7), ("grpo", 12)]


def _flags(stage: str, workdir: str, upstream: dict, **overrides) -> list[str]:
    """`upstream`: {"clm": DIR, "reward": DIR} of the runs the later stages start from."""
    config, extra = STAGES[stage]
    values = {**COMMON, **extra, **overrides}
    return [f"--config={config}", f"--workdir={workdir}"] + [
        f"--config.{k}={str(v).format(**upstream)}" for k, v in values.items()]


def _metrics(workdir: str) -> dict:
    """{step: its logged metrics but the timings}."""
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in cli.metrics(workdir)}


def _run_timed(args: list[str], kill_at=None) -> tuple[float, float]:
    """Runs `flaxalign train ARGS`; returns (seconds to the first logged step, seconds to the end). With
    `kill_at(first_row_seconds) -> seconds or None`, SIGKILLs the run at that moment (measured from its start)."""
    started = time.monotonic()
    metrics = os.path.join(args[1].split("=", 1)[1], "metrics.jsonl")
    first_row = None
    with cli.started(args, cpu_devices=1) as proc:
        deadline = started + cli.TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic() - started
            if first_row is None and os.path.exists(metrics) and os.path.getsize(metrics):
                first_row = now
            moment = kill_at(first_row) if kill_at else None
            if moment is not None and now >= moment:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return first_row or now, now
            time.sleep(0.02)
        assert proc.poll() is not None, "the run did not finish in time"
        assert kill_at is None, f"the run ended (rc {proc.returncode}) before it could be killed"
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
    return first_row, time.monotonic() - started


@pytest.fixture(scope="module")
def straight(rl_upstream, tmp_path_factory):
    """The uninterrupted run of each stage: {stage: ({step: metrics}, seconds to its first logged step, to its
    end)}."""
    runs = {}
    for stage in STAGES:
        workdir = str(tmp_path_factory.mktemp(f"straight_{stage}"))
        first_row, end = _run_timed(_flags(stage, workdir, rl_upstream))
        runs[stage] = (_metrics(workdir), first_row, end)
    return runs


@pytest.mark.parametrize("stage, moment", CASES)
def test_a_sigkill_at_a_random_moment_resumes_to_the_same_metrics(stage, moment, rl_upstream, straight, tmp_path):
    expected, first_row, end = straight[stage]
    if moment == "startup":
        fraction = random.Random(stage).uniform(0.2, 0.9)
        kill_at = lambda _: fraction * first_row  # noqa: E731
    else:  # the same share of the training phase after this run's own first logged step
        fraction = random.Random(moment).uniform(0.0, 0.9)
        kill_at = lambda seen: None if seen is None else seen + fraction * (end - first_row)  # noqa: E731
    workdir = str(tmp_path / "killed")
    args = _flags(stage, workdir, rl_upstream)
    _, killed_after = _run_timed(args, kill_at)
    rc, _, err = cli.run(args, cpu_devices=1)
    assert rc == 0, f"killed after {killed_after:.1f}s; the rerun failed:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    rows = cli.metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), f"killed after {killed_after:.1f}s"
    resumed = [line for line in err.splitlines() if "Resumed from checkpoint at step" in line]
    resumed_at = int(resumed[0].rsplit("step ", 1)[1].rstrip(".")) if resumed else 0
    assert resumed_at % EVERY == 0
    print(f"{stage} {moment}: killed after {killed_after:.1f}s (first step at {first_row:.1f}s, end at {end:.1f}s), "
          f"resumed at step {resumed_at}")
    # every step the rerun trained equals the straight run's, exactly (a kill before the first checkpoint
    # restarts from scratch: then all of them)
    got = _metrics(workdir)
    assert expected[STEPS]["loss"] != 0.0  # a run whose updates do something
    assert {s: got[s] for s in got if s > resumed_at} == {s: expected[s] for s in expected if s > resumed_at}, \
        f"killed after {killed_after:.1f}s, resumed at {resumed_at}"

"""Multi-process RL: GRPO with Python reward functions and PPO run as 2 processes × 4 CPU devices (jax.distributed
on localhost) give the per-step metrics of 1 process × 8 devices. In GRPO each process decodes and scores the rollout
rows it holds and the rewards are all-gathered (`flaxalign.host_rows`); the group advantages are computed in the
jitted step over the global batch, so a group may straddle processes."""

import collections
import os

import pytest

from tests import cli_helpers as cli

pytestmark = pytest.mark.slow

STEPS = 3
COMMON = {"steps": STEPS, "log_every": 1, "eval_every": STEPS, "eval_at_start": False, "eval_prompts": 8,
          "checkpoint_every": 0, "data.batch_size": 8, "mesh.data": 8}
STAGES = {
    # exact_answer looks each row's answer up in its prompt record; the length reward gives the groups a spread
    "grpo": ("configs/grpo.py:tiny", {"grpo.group_size": 4,
                                      "rewards": "exact_answer,tests.stages.test_multihost_rl:counted_length_reward"}),
    # PPO has no host-side work: its held-out evaluation is the same jitted program as its rollout, so it is off
    "ppo": ("configs/ppo.py:tiny", {"reward_from": "checkpoint:{reward}", "ppo.kl_target": 0.1, "data.batch_size": 16,
                                    "ppo.num_minibatches": 2, "eval_prompts": 0}),
}
TIMINGS = ("step_time", "tokens_per_sec", "mfu")


def counted_length_reward(prompts, completions, **_):
    """Each completion's length in characters; appends "PID ROWS" to $REWARD_CALLS_LOG (who scored how many)."""
    with open(os.environ["REWARD_CALLS_LOG"], "a") as log:
        log.write(f"{os.getpid()} {len(completions)}\n")
    return [float(len(completion)) for completion in completions]


def raises_on_process_1(prompts, completions, **_):
    import jax

    if jax.process_index() == 1:
        raise RuntimeError("no answer key on this host")
    return [0.0] * len(completions)


def _calls(path: str) -> dict:
    """{pid: Counter(rows per call)} of a run's reward calls."""
    calls = collections.defaultdict(collections.Counter)
    with open(path) as log:
        for line in log:
            pid, rows = line.split()
            calls[pid][int(rows)] += 1
    return dict(calls)


def _flags(stage: str, workdir: str, upstream: dict) -> list[str]:
    config, extra = STAGES[stage]
    values = {**COMMON, "init_from": "checkpoint:{clm}", **extra}
    return [f"--config={config}", f"--workdir={workdir}"] + [
        f"--config.{k}={str(v).format(**upstream)}" for k, v in values.items()]


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_give_the_metrics_of_one(stage, rl_upstream, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    logs = {run: str(tmp_path / f"{run}_reward_calls.log") for run in ("one", "two")}
    rc, _, err = cli.run(_flags(stage, one, rl_upstream), cpu_devices=8, REWARD_CALLS_LOG=logs["one"])
    assert rc == 0, err[-2000:]
    address = f"127.0.0.1:{cli.free_port()}"
    cli.run_together([cli.cli_command(_flags(stage, two, rl_upstream) + [
        f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"], cpu_devices=4)
        for i in range(2)], REWARD_CALLS_LOG=logs["two"])
    if stage == "grpo":  # per step 32 rollout rows, at the evaluation 8 held-out prompts (greedy, then sampled)
        assert list(_calls(logs["one"]).values()) == [{32: STEPS, 8: 2}]
        assert list(_calls(logs["two"]).values()) == [{16: STEPS, 4: 2}] * 2  # each process scored its half
    expected, got = cli.metrics(one), cli.metrics(two)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    assert expected[-1]["loss"] != 0.0  # updates that do something
    if stage == "grpo":  # the held-out evaluation ran (on both sides), its rewards scored per process
        assert "eval_reward_greedy" in expected[-1] and "eval_reward_sampled" in expected[-1]
    for want, have in zip(expected, got):
        assert set(have) == set(want)
        for key in set(want) - set(TIMINGS):
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)


def test_a_reward_function_raising_on_one_process_stops_both_in_one_line(rl_upstream, tmp_path):
    """Process 1's reward function raises in the first rollout: it names the function, process 0 names process 1,
    both exit 2 (neither waits for the other in a collective), and the step-0 checkpoint is saved."""
    workdir = str(tmp_path / "run")
    flags = _flags("grpo", workdir, rl_upstream) + [
        "--config.rewards=tests.stages.test_multihost_rl:raises_on_process_1"]
    address = f"127.0.0.1:{cli.free_port()}"
    (_, first), (_, second) = cli.run_together([cli.cli_command(flags + [
        f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"], cpu_devices=4)
        for i in range(2)], expected_rc=2)
    assert "flaxalign: error: reward function 'tests.stages.test_multihost_rl:raises_on_process_1' raised " \
           "RuntimeError: no answer key on this host" in second
    assert "flaxalign: error: process 1 stopped on an error" in first
    assert "Traceback" not in first + second
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "0"))

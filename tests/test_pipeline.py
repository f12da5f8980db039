"""`flaxalign pipeline`: the stage plan, the report (tables from hand-made run outputs), and resumption after a kill."""

import json
import os
import signal
import time

import ml_collections
import pytest

from flaxalign import errors
from flaxalign.pipeline import is_finished, plan, run_pipeline
from flaxalign.pipeline_report import mean_std, write_pipeline_report
from tests import cli_helpers as cli


def _config(**overrides) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_config", "configs/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.update(overrides)
    return config


def test_plan_runs_ppo_and_dpo_per_seed_from_the_same_sft_and_evaluates_every_policy():
    stages = {s.name: s for s in plan(_config(), "/w", seeds=2)}
    assert list(stages)[:3] == ["clm", "sft", "reward"]
    assert "--config.init_from=checkpoint:/w/clm" in stages["sft"].args
    for seed in (0, 1):
        ppo, dpo = stages[f"ppo_s{seed}"], stages[f"dpo_s{seed}"]
        assert {"--config.init_from=checkpoint:/w/sft", f"--config.seed={seed}"} <= set(ppo.args) & set(dpo.args)
        assert "--config.reward_from=checkpoint:/w/reward" in ppo.args
        assert "--config.steps=150" in ppo.args  # the preset's extra flags
    evals = [s for s in stages.values() if s.command == "eval"]
    assert [s.name for s in evals] == ["eval/clm", "eval/sft", "eval/ppo_s0", "eval/dpo_s0", "eval/ppo_s1",
                                       "eval/dpo_s1"]
    assert all("--config.reference=checkpoint:/w/sft" in s.args for s in evals)


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(((4 + 1 + 9) / 2) ** 0.5))
    assert mean_std([0.5]) == (0.5, 0.0)


def _write_run(workdir, name, summary, rows):
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with open(os.path.join(workdir, name, "run_summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(workdir, name, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _write_eval(workdir, name, values):
    os.makedirs(os.path.join(workdir, "eval", name), exist_ok=True)
    with open(os.path.join(workdir, "eval", name, "eval.json"), "w") as f:
        json.dump({"metrics": values}, f)


def test_report_fills_the_ppo_vs_dpo_table_from_the_runs(tmp_path):
    w = str(tmp_path)
    for i, name in enumerate(["clm", "sft", "reward", "ppo_s0", "ppo_s1", "dpo_s0", "dpo_s1"]):
        rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
        if name.startswith("ppo"):
            rows += [{"step": 0, "eval_score": 0.0, "eval_kl": 0.0}, {"step": 2, "eval_score": 1.0, "eval_kl": 3.0}]
        if name.startswith("dpo"):
            rows += [{"step": 2, "rewards/margins": 0.5, "rewards/accuracies": 0.75}]
        _write_run(w, name, {"finished": True, "final_step": 2, "seconds": 10.0 * (i + 1), "flops": 1e9,
                             "peak_rss_mb": 500.0 + i}, rows)
    win = {"clm": 0.2, "sft": 0.5, "ppo_s0": 0.7, "ppo_s1": 0.9, "dpo_s0": 0.6, "dpo_s1": 0.8}
    for name, rate in win.items():
        _write_eval(w, name, {"win_rate/win_rate_ties_half": rate, "win_rate/win_rate": rate, "win_rate/tie_rate": 0.0,
                              "win_rate/loss_rate": 1 - rate, "reward/score_mean": rate - 0.5, "kl/mean": 2 * rate})
    with open(write_pipeline_report(w, seeds=2)) as f:
        text = f.read()
    assert "| RM win rate vs SFT (ties ½) | 0.800 ± 0.141 | 0.700 ± 0.141 |" in text  # PPO, DPO over 2 seeds
    assert "| wall-clock (s) | 45 ± 7 | 65 ± 7 |" in text  # PPO 40, 50; DPO 60, 70
    assert "| RM win rate vs SFT (ties ½) | 0.200 | 0.500 | 0.800 ± 0.141 | 0.700 ± 0.141 |" in text
    assert "0.200 (min 0.700, max 0.900)" in text
    for png in ("loss_curves.png", "ppo_reward_kl.png", "dpo_margins.png", "frontier.png"):
        assert os.path.exists(os.path.join(w, png)) and f"({png})" in text


def test_unknown_stop_after_is_named(tmp_path):
    with pytest.raises(errors.ConfigError, match="stop_after='ppo'"):
        run_pipeline(_config(stop_after="ppo"), str(tmp_path), seeds=1)


@pytest.mark.slow
def test_killed_pipeline_resumes_the_interrupted_stage_and_skips_finished_ones(tmp_path):
    """SIGTERM to the pipeline reaches its running SFT stage, which checkpoints and stops (exit 2: unfinished);
    the rerun skips the finished CLM stage and resumes SFT from its checkpoint. The pipeline runs in a process
    group of its own that is killed however the test ends, so a failed assertion never orphans the stage."""
    workdir = str(tmp_path / "pipeline")
    args = ["--config=configs/pipeline.py:tiny", f"--workdir={workdir}", "--config.stop_after=sft",
            "--config.clm.args=--config.steps=20 --config.eval_every=0",
            "--config.sft.args=--config.steps=400 --config.checkpoint_every=10 --config.eval_every=0"]
    checkpoints = os.path.join(workdir, "sft", "checkpoints")
    with cli.started(args, cpu_devices=1, command="pipeline") as proc:
        deadline = time.monotonic() + 400
        while not (os.path.isdir(checkpoints) and any(
                name.isdigit() and int(name) >= 10 for name in os.listdir(checkpoints))):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no SFT checkpoint within 400 s"
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        rc, out, err = cli.finish(proc)
    assert rc == 2 and "stopped before its last step" in err, (rc, err[-1500:])
    assert is_finished(plan(_config(), workdir, 1)[0], workdir)  # clm finished
    resumed_sft = "--config.sft.args=--config.steps=30 --config.checkpoint_every=10 --config.eval_every=0"
    rc, out, err = cli.run([*args, resumed_sft], cpu_devices=1, command="pipeline")
    assert rc == 0, err[-2000:]
    assert "clm: done earlier (skipped)" in out
    with open(os.path.join(workdir, "logs", "sft.log")) as f:
        log = f.read()
    assert log.count("$ ") == 2 and "Resumed from checkpoint at step" in log
    with open(os.path.join(workdir, "logs", "clm.log")) as f:
        assert f.read().count("$ ") == 1  # not run again

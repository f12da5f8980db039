"""`flaxalign pipeline`: the stage plan, the report (tables from hand-made run outputs), resumption after a kill, and
the whole pipeline at tiny sizes (every stage, its report, and the metrics of its PPO stage)."""

import json
import os
import signal
import time

import ml_collections
import numpy as np
import pytest

from flaxalign import errors, weights
from flaxalign.pipeline import is_finished, plan, run_pipeline
from flaxalign.pipeline_report import mean_std, write_pipeline_report
from tests import cli_helpers as cli
from tests.config_files import stage_config


def _config(preset="tiny", **overrides) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_config", "configs/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.update(overrides)
    return config


def test_plan_runs_every_method_per_seed_from_the_same_sft_and_evaluates_every_policy_with_the_gold_judge():
    stages = {s.name: s for s in plan(_config(), "/w", seeds=2)}
    assert list(stages)[:4] == ["clm", "sft", "reward", "gold_reward"]
    assert "--config.init_from=checkpoint:/w/clm" in stages["sft"].args
    assert "--config.init_from=checkpoint:/w/sft" in stages["gold_reward"].args
    # the two reward models learn from pairs of different seeds: the gold judge's pairs are not the proxy's
    data = {name: next(a for a in stages[name].args if a.startswith("--config.data.train=")) for name in
            ("reward", "gold_reward")}
    assert data["reward"] != data["gold_reward"] and "seed=2" in data["gold_reward"]
    for seed in (0, 1):
        runs = [stages[f"{m}_s{seed}"] for m in ("ppo", "dpo", "grpo")]
        for run in runs:
            assert {"--config.init_from=checkpoint:/w/sft", f"--config.seed={seed}"} <= set(run.args)
        assert ["--config.reward_from=checkpoint:/w/reward" in run.args for run in runs] == [True, False, False]
        assert "--config.steps=100" in runs[0].args  # the preset's extra flags
    evals = [s for s in stages.values() if s.command == "eval"]
    assert [s.name for s in evals] == ["eval/clm", "eval/sft"] + [
        f"eval/{m}_s{seed}" for seed in (0, 1) for m in ("ppo", "dpo", "grpo")]
    assert all({"--config.reference=checkpoint:/w/sft", "--config.reward_from=checkpoint:/w/reward",
                "--config.gold_reward_from=checkpoint:/w/gold_reward"} <= set(s.args) for s in evals)
    only_dpo = plan(_config(methods="dpo", gold_reward=ml_collections.ConfigDict(dict(config="", args=""))), "/w", 1)
    assert [s.name for s in only_dpo] == ["clm", "sft", "reward", "dpo_s0", "eval/clm", "eval/sft", "eval/dpo_s0"]
    assert not any("gold_reward_from" in a for s in only_dpo for a in s.args)


def test_plan_from_pretrained_weights_has_no_clm_stage_and_evaluates_the_base_on_held_out_questions():
    stages = {s.name: s for s in plan(_config("smollm2_135m"), "/w", seeds=1)}
    assert list(stages) == ["sft", "dpo_s0", "grpo_s0", "eval/base", "eval/sft", "eval/dpo_s0", "eval/grpo_s0"]
    base = _config("smollm2_135m").base
    assert base.startswith("gguf:") and f"--config.init_from={base}" in stages["sft"].args
    assert f"--checkpoint={base}" in stages["eval/base"].args
    assert not any("reward_from" in a for s in stages.values() for a in s.args)  # no reward models
    flags = {name: " ".join(stages[name].args) for name in stages}
    # trained on split=train questions, judged on split=test ones (DPO's held-out pairs too), all in chat form
    assert all("split=train" in flags[n] and "chat=1" in flags[n] for n in ("sft", "dpo_s0"))
    assert stage_config("grpo", preset="smollm2_135m").data.train.endswith("chat=1&split=train")
    assert "split=test" in flags["dpo_s0"] and "split=test" in flags["eval/base"]
    with pytest.raises(errors.ConfigError, match="ppo trains against the reward model, but reward.config is empty"):
        plan(_config("smollm2_135m", methods="ppo,dpo"), "/w", 1)
    with pytest.raises(errors.ConfigError, match="base is empty and clm.config is empty"):
        plan(_config("smollm2_135m", base=""), "/w", 1)


@pytest.mark.parametrize("methods", ["ppo,eval", "ppo,ppo", "", "ppo,nosuch", "seeds"])
def test_methods_must_name_method_blocks_once(methods):
    with pytest.raises(errors.ConfigError, match="methods="):
        plan(_config(methods=methods), "/w", 1)


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(((4 + 1 + 9) / 2) ** 0.5))
    assert mean_std([0.5]) == (0.5, 0.0)


def _write_run(workdir, name, summary, rows):
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with open(os.path.join(workdir, name, "run_summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(workdir, name, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _write_eval(workdir, name, values, examples=()):
    os.makedirs(os.path.join(workdir, "eval", name), exist_ok=True)
    with open(os.path.join(workdir, "eval", name, "eval.json"), "w") as f:
        json.dump({"metrics": values, "examples": list(examples)}, f)


def test_report_fills_the_tables_from_the_runs(tmp_path):
    w = str(tmp_path)
    runs = ["clm", "sft", "reward", "gold_reward", "ppo_s0", "ppo_s1", "dpo_s0", "dpo_s1", "grpo_s0", "grpo_s1"]
    for i, name in enumerate(runs):
        rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
        if name.startswith("ppo"):
            rows += [{"step": 0, "eval_score": 0.0, "eval_kl": 0.0}, {"step": 2, "eval_score": 1.0, "eval_kl": 3.0}]
        if name.startswith("dpo"):
            rows += [{"step": 2, "rewards/margins": 0.5, "rewards/accuracies": 0.75}]
        if name.startswith("grpo"):
            rows += [{"step": 2, "eval_exact_answer_greedy": 0.5, "eval_exact_answer_sampled": 0.4}]
        _write_run(w, name, {"finished": True, "final_step": 2, "seconds": 10.0 * (i + 1), "flops": 1e9,
                             "peak_rss_mb": 500.0 + i}, rows)
    win = {"clm": 0.2, "sft": 0.5, "ppo_s0": 0.7, "ppo_s1": 0.9, "dpo_s0": 0.6, "dpo_s1": 0.8, "grpo_s0": 0.65,
           "grpo_s1": 0.75}
    accuracy = {"clm": 0.0, "sft": 0.25, "ppo_s0": 0.3, "ppo_s1": 0.4, "dpo_s0": 0.35, "dpo_s1": 0.45,
                "grpo_s0": 0.5, "grpo_s1": 0.6}
    for name, rate in win.items():
        _write_eval(w, name, {"win_rate/win_rate_ties_half": rate, "win_rate/win_rate": rate, "win_rate/tie_rate": 0.0,
                              "win_rate/loss_rate": 1 - rate, "reward/score_mean": rate - 0.5, "kl/mean": 2 * rate,
                              "gold/score_mean": rate - 0.4, "gold_win_rate/win_rate_ties_half": rate - 0.1,
                              "exact_match/greedy_accuracy": accuracy[name],
                              "exact_match/accuracy": accuracy[name] / 2},
                    examples=[{"prompt": "What is 2 + 2?", "answer": "4", "response": f"The answer is {name}."}])
    with open(write_pipeline_report(w, seeds=2, methods=("ppo", "dpo", "grpo"))) as f:
        text = f.read()
    table = "PPO vs DPO vs GRPO (§5.4.4, measured)"
    assert _report_row(text, table, "proxy RM win rate vs SFT (ties ½)") == ["0.800 ± 0.141", "0.700 ± 0.141",
                                                                              "0.700 ± 0.071"]
    assert _report_row(text, table, "wall-clock (s)") == ["55 ± 7", "75 ± 7", "95 ± 7"]  # 50, 60; 70, 80; 90, 100
    assert _report_row(text, table, "stability: greedy-accuracy spread over 2 seed(s)")[0] == (
        "0.100 (min 0.300, max 0.400)")
    evaluation = "Evaluation (evaluation prompts; reference = SFT; mean ± std over seeds)"
    assert _report_row(text, evaluation, "gold RM win rate vs SFT (ties ½)") == [
        "0.100", "0.400", "0.700 ± 0.141", "0.600 ± 0.141", "0.600 ± 0.071"]
    assert _report_row(text, evaluation, "**exact-answer accuracy, greedy** (gold)")[:3] == ["0.000", "0.250",
                                                                                         "0.350 ± 0.071"]
    # greedy gains over SFT's 0.25: PPO +5, +15 points → +10.0 ± 7.1, mean − std +2.9
    assert _report_row(text, "Gain over SFT on the ground truth", "PPO")[:2] == ["+10.0 ± 7.1", "+2.9"]
    assert _report_row(text, "Example answers", "What is 2 + 2?") == [
        "4", "The answer is sft.", "The answer is ppo_s0.", "The answer is dpo_s0.", "The answer is grpo_s0."]
    for png in ("stage_curves.png", "ppo_reward_kl.png", "dpo_margins.png", "frontier.png", "accuracy_frontier.png"):
        assert os.path.exists(os.path.join(w, png)) and f"({png})" in text


def test_report_of_a_pipeline_from_pretrained_weights_without_reward_models(tmp_path):
    w = str(tmp_path)
    for name in ("sft", "dpo_s0"):
        _write_run(w, name, {"finished": True, "final_step": 2, "seconds": 10.0, "flops": 1e9, "peak_rss_mb": 500.0},
                   [{"step": 1, "loss": 2.0}, {"step": 1, "eval_rewards/accuracies": 0.5},
                    {"step": 2, "loss": 1.0}, {"step": 2, "eval_rewards/accuracies": 0.75}])
    for name, accuracy in (("base", 0.05), ("sft", 0.5), ("dpo_s0", 0.625)):
        _write_eval(w, name, {"exact_match/greedy_accuracy": accuracy, "kl/mean": 1.0})
    with open(write_pipeline_report(w, seeds=1, methods=("dpo",), judges=(), base="base")) as f:
        text = f.read()
    evaluation = "Evaluation (evaluation prompts; reference = SFT; mean ± std over seeds)"
    assert "| metric | base (pretrained) | SFT | DPO |" in text
    assert _report_row(text, evaluation, "**exact-answer accuracy, greedy** (gold)") == ["0.050", "0.500", "0.625"]
    assert "proxy RM" not in text.split("## Evaluation")[1].split("## Gain")[0]  # rows no policy has are left out
    assert "| clm |" not in text and "| reward |" not in text
    assert _report_row(text, "Gain over SFT on the ground truth", "DPO")[:2] == ["+12.5 ± 0.0", "+12.5"]
    table = "DPO (§5.4.4, measured)"
    assert _report_row(text, table, "held-out pair accuracy (implicit reward, the run's last evaluation)") == ["0.750"]
    assert "| gold RM win rate vs SFT (ties ½) |" not in text


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


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline at tiny sizes: every stage runs (3 steps each, 8 evaluation prompts), one seed: 12 subprocesses,
# mostly start-up and compiles.

REDUCED_STAGES = {
    "clm": "--config.steps=3 --config.eval_every=0 --config.data.max_chars=100000 --config.data.seq_len=64 "
           "--config.data.batch_size=8 --config.log_every=1",
    "sft": "--config.steps=3 --config.eval_every=0 --config.eval_at_start=False --config.data.seq_len=64 "
           "--config.data.batch_size=8 --config.log_every=1",
    "reward": "--config.steps=3 --config.eval_every=0 --config.eval_at_start=False --config.data.seq_len=64 "
              "--config.data.batch_size=8 --config.normalize.num_prompts=8 --config.normalize.max_new_tokens=8 "
              "--config.log_every=1",
    "gold_reward": "--config.steps=3 --config.eval_every=0 --config.eval_at_start=False --config.data.seq_len=64 "
                   "--config.data.batch_size=8 --config.normalize.num_prompts=8 --config.normalize.max_new_tokens=8 "
                   "--config.log_every=1 --config.data.train=builtin:arithmetic_preferences?seed=2",
    # evaluated at the start and at the end (one compile), on 8 held-out prompts
    "ppo": "--config.steps=3 --config.data.batch_size=8 --config.rollout.max_new_tokens=8 "
           "--config.ppo.num_minibatches=2 --config.ppo.epochs=2 --config.eval_prompts=8 --config.eval_every=3 "
           "--config.log_every=1",
    "dpo": "--config.steps=3 --config.data.seq_len=64 --config.data.batch_size=8 --config.eval_every=0 "
           "--config.eval_at_start=False --config.log_every=1 --config.loss.rpo_alpha=1.0",
    "grpo": "--config.steps=3 --config.data.batch_size=2 --config.grpo.group_size=4 --config.rollout.max_new_tokens=8 "
            "--config.eval_prompts=8 --config.eval_every=3 --config.log_every=1",
    # sampled responses only: KL, reward and win rate (what the PPO-vs-DPO table reads); no perplexity, no MC
    "eval": "--config.num_prompts=8 --config.max_new_tokens=8 --config.batch_size=8 --config.text_files='' "
            "--config.mc_file=''",
}
PIPELINE_TIMEOUT = 1200  # measured 5½–9 min of wall-clock on 2 cores shared with 4–6 other test runs


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """(workdir, stdout) of `flaxalign pipeline` through every stage at the sizes of REDUCED_STAGES."""
    workdir = str(tmp_path_factory.mktemp("tiny_pipeline") / "w")
    args = ["--config=configs/pipeline.py:tiny", f"--workdir={workdir}", "--seeds=1"] + [
        f"--config.{stage}.args={flags}" for stage, flags in REDUCED_STAGES.items()]
    # XLA as users run it: the tests below assert a KL of exactly 0 between identical policies (SFT's evaluation against
    # itself, PPO's first evaluation), which holds for the optimised programs; unoptimised ones round the two log-prob
    # passes apart by ~1e-7
    rc, out, err = cli.run(args, cpu_devices=1, command="pipeline", timeout=PIPELINE_TIMEOUT, optimized=True)
    assert rc == 0, err[-3000:]
    return workdir, out


def _read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _report_row(text: str, section: str, label: str) -> list[str]:
    """The cells after `label` of the first table row with that label under heading `section`."""
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in body.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


@pytest.mark.slow
@pytest.mark.timeout(PIPELINE_TIMEOUT + 300)
def test_pipeline_runs_every_stage_and_reports_the_methods_with_the_measured_numbers(tiny_pipeline):
    """Every planned stage ran to its last step (train: run_summary.json says finished at step 3; eval: eval.json),
    and report.md's methods table holds the numbers of eval/{ppo,dpo,grpo}_s0 and of the runs' summaries, read here
    from their own files; every policy was judged by the gold reward model and the exact-answer checker."""
    workdir, out = tiny_pipeline
    stages = plan(_config(), workdir, seeds=1)
    assert len(stages) == 12 and "flaxalign: pipeline finished; report" in out
    evals = {}
    for i, stage in enumerate(stages, 1):
        assert f"pipeline [{i}/12] {stage.name}: " in out
        if stage.command == "train":
            summary = _read_json(workdir, stage.name, "run_summary.json")
            assert summary["finished"] and summary["final_step"] == 3, (stage.name, summary)
        else:
            evals[stage.name.split("/")[1]] = _read_json(workdir, stage.name, "eval.json")["metrics"]
    assert evals["sft"]["kl/mean"] == 0.0  # SFT against itself: the same weights
    assert evals["ppo_s0"]["kl/mean"] > 0  # PPO's updates moved the policy away from SFT
    for name, metrics in evals.items():
        assert {"gold_win_rate/win_rate_ties_half", "exact_match/win_win_rate_ties_half",
                "exact_match/greedy_accuracy"} <= set(metrics), name
    with open(os.path.join(workdir, "report.md")) as f:
        text = f.read()
    table = "PPO vs DPO vs GRPO (§5.4.4, measured)"
    policies = ("ppo_s0", "dpo_s0", "grpo_s0")
    for label, key, fmt in (("proxy RM win rate vs SFT (ties ½)", "win_rate/win_rate_ties_half", "{:.3f}"),
                            ("gold RM win rate vs SFT (ties ½)", "gold_win_rate/win_rate_ties_half", "{:.3f}"),
                            ("exact-answer accuracy, greedy (gold)", "exact_match/greedy_accuracy", "{:.3f}"),
                            ("KL to SFT (nats / response)", "kl/mean", "{:.2f}")):
        assert _report_row(text, table, label) == [fmt.format(evals[n][key]) for n in policies]
    summaries = {name: _read_json(workdir, name, "run_summary.json") for name in policies}
    for label, key, fmt in (("wall-clock (s)", "seconds", "{:.0f}"), ("model FLOPs", "flops", "{:.3g}")):
        assert _report_row(text, table, label) == [fmt.format(summaries[n][key]) for n in policies]
    for png in ("stage_curves.png", "ppo_reward_kl.png", "dpo_margins.png", "frontier.png", "accuracy_frontier.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 0 and f"({png})" in text


@pytest.mark.slow
@pytest.mark.timeout(PIPELINE_TIMEOUT + 300)
def test_ppo_stage_starts_at_its_reference_and_logs_metrics_that_agree_with_each_other(tiny_pipeline):
    """The pipeline's PPO stage is `flaxalign train --config=configs/ppo.py:tiny` from the SFT run with the reward
    run as reward_from. Its logged metrics: KL exactly 0 while the policy still equals its frozen reference copy (the
    evaluation at step 0 and the first rollout) and > 0 after updates; the importance ratio of each iteration's first
    minibatch 1 (no update yet, same log-probs as the rollout); the score the reward run's normalisation of the raw
    reward model score, minus the missing-EOS penalty; rlhf_reward = score − β·KL; a checkpoint and a report."""
    workdir, _ = tiny_pipeline
    run = os.path.join(workdir, "ppo_s0")
    with open(os.path.join(workdir, "logs", "ppo_s0.log")) as f:
        command = f.readline()
    assert "flaxalign.main train --config=configs/ppo.py:tiny" in command
    assert f"--config.init_from=checkpoint:{workdir}/sft" in command
    assert f"--config.reward_from=checkpoint:{workdir}/reward" in command
    rows = cli.metrics(run)
    start = next(row for row in rows if row["step"] == 0)
    assert start["eval_kl"] == 0.0 and np.isfinite(start["eval_score"])
    train = [row for row in rows if "ratio_first" in row]
    assert [row["step"] for row in train] == [1, 2, 3]
    assert train[0]["kl"] == 0.0 and train[0]["kl_estimate"] == 0.0
    assert all(row["kl"] > 0 for row in train[1:]), train
    norm = _read_json(workdir, "reward", "reward_normalization.json")
    penalty = _read_json(run, "config.json")["ppo"]["missing_eos_penalty"]
    for row in train:
        assert abs(row["ratio_first"] - 1.0) < 1e-5, row  # float32 recomputation: measured |ratio − 1| < 1e-7
        assert np.isfinite(row["score"]) and np.isfinite(row["raw_score"]), row
        # row means of gain·r + b − penalty·[no EOS] (float32 sums; measured difference ≤ 1.1e-7)
        expected = norm["gain"] * row["raw_score"] + norm["bias"] - penalty * (1.0 - row["eos_rate"])
        assert abs(row["score"] - expected) < 1e-5, (row, expected)
        assert abs(row["rlhf_reward"] - (row["score"] - row["kl_coef"] * row["kl"])) < 1e-5, row
    assert os.listdir(os.path.join(run, "checkpoints")) == ["3"]
    assert os.path.exists(os.path.join(run, "report.md"))
    meta = weights.metadata(run)
    assert meta["stage"] == "ppo" and meta["reward_from"] == f"checkpoint:{workdir}/reward"

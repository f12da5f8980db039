"""End to end on the built-in arithmetic preference data, from the demo's SFT checkpoint (tiny preset): the reward
model, DPO (full and LoRA with the adapter-off reference), IPO, ORPO, SimPO and KTO through `flaxalign train`, and
the preference stages' bad-input errors.

Held-out preference accuracy of a policy = how often it gives the chosen answer a higher per-token log-likelihood
than the rejected one (`eval_pref_accuracy_per_token`): defined for the SFT model too (whose implicit DPO reward
against itself is 0 for every pair), and free of the bias towards the shorter answer.
"""

import json
import os
import re

import pytest

from tests import cli_helpers as cli

pytestmark = pytest.mark.slow


def _evals(workdir):
    return [r for r in cli.metrics(workdir) if "eval_loss" in r]


def _train(config, workdir, sft_workdir, *extra):
    # XLA optimising as for users: these runs train for 60–1,200 steps (unoptimised code runs them ~2× slower), and
    # dpo_run asserts a KL of exactly 0 at step 0, which unoptimised programs round to ~1e-7
    rc, _, err = cli.run([f"--config=configs/{config}.py:tiny", f"--workdir={workdir}",
                          f"--config.init_from=checkpoint:{sft_workdir}", *extra], cpu_devices=1, optimized=True)
    assert rc == 0, err[-3000:]
    return _evals(workdir)


@pytest.fixture(scope="module")
def dpo_run(sft_demo_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dpo"))
    return workdir, _train("dpo", workdir, sft_demo_run)


def test_dpo_raises_held_out_preference_accuracy_by_20_points(dpo_run):
    _, evals = dpo_run
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(0.693147, abs=1e-5)  # π = π_ref: ln 2
    assert first["eval_kl"] == 0.0
    assert "eval_perplexity" not in first  # a pairwise loss is no token NLL
    gain = last["eval_pref_accuracy_per_token"] - first["eval_pref_accuracy_per_token"]
    assert gain >= 0.20, f"{first['eval_pref_accuracy_per_token']:.3f} → {last['eval_pref_accuracy_per_token']:.3f}"
    assert last["eval_rewards/accuracies"] >= 0.7 and last["eval_rewards/margins"] > 1.0
    assert last["eval_kl"] > 0


def test_dpo_report_lists_the_held_out_metrics(dpo_run):
    workdir, _ = dpo_run
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    assert "| pref_accuracy_per_token |" in report and "| kl |" in report


def test_reward_model_reaches_80_percent_held_out_accuracy(sft_demo_run, tmp_path):
    workdir = str(tmp_path / "rm")
    evals = _train("reward", workdir, sft_demo_run)
    assert evals[-1]["eval_accuracy"] >= 0.80, [round(r["eval_accuracy"], 3) for r in evals]
    with open(os.path.join(workdir, "reward_normalization.json")) as f:
        norm = json.load(f)
    assert norm["num_samples"] == 64 and norm["raw_std"] > 0
    assert norm["gain"] * norm["raw_mean"] + norm["bias"] == pytest.approx(0.0, abs=1e-9)


VARIANTS = {
    "lora": (["--config.lora.rank=8", "--config.optim.lr=2e-3"], "pref_accuracy_per_token"),
    "ipo": (["--config.loss.loss_type=ipo"], "loss"),
    "orpo": (["--config.loss.loss_type=orpo"], "rewards/accuracies"),
    "simpo": (["--config.loss.loss_type=simpo"], "rewards/accuracies"),
    "kto": (["--config.loss.loss_type=kto", "--config.data.train=builtin:arithmetic_kto"], "accuracy"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_without_nan_and_improves_its_held_out_metric(variant, sft_demo_run, tmp_path):
    extra, metric = VARIANTS[variant]
    evals = _train("dpo", str(tmp_path / variant), sft_demo_run, "--config.steps=60", "--config.eval_every=60",
                   *extra)
    assert all(v == v for r in evals for v in r.values()), "NaN in the metrics"
    before, after = evals[0][f"eval_{metric}"], evals[-1][f"eval_{metric}"]
    assert (after < 0.9 * before) if metric == "loss" else (after >= before + 0.1), f"{metric}: {before} → {after}"


BAD_INPUTS = {
    "unknown loss type": (["--config.loss.loss_type=dpo2"], "unknown loss_type 'dpo2'; valid: sigmoid, robust"),
    "beta not positive": (["--config.loss.beta=0"], "loss.beta must be > 0"),
    "reference with another vocabulary": (["--config.reference_from=checkpoint:{other}"],
                                          "the reference model must use the policy's vocabulary"),
}


@pytest.fixture(scope="module")
def other_vocabulary_checkpoint(tmp_path_factory):
    """A 2-step CLM run with a 384-token vocabulary (the demo's has 512)."""
    workdir = str(tmp_path_factory.mktemp("other_vocab"))
    rc, _, err = cli.run(["--config=configs/clm.py:tiny", f"--workdir={workdir}", "--config.steps=2",
                          "--config.model.vocab_size=384", "--config.data.vocab_size=384",
                          "--config.data.max_chars=200000", "--config.eval_every=0"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    return workdir


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_sentence(case, sft_demo_run, other_vocabulary_checkpoint, tmp_path):
    extra, expected = BAD_INPUTS[case]
    extra = [e.format(other=other_vocabulary_checkpoint) for e in extra]
    rc, _, err = cli.run(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path / 'w'}",
                          f"--config.init_from=checkpoint:{sft_demo_run}", *extra], cpu_devices=1)
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("flaxalign: error: ") and expected in last_line, last_line


def test_identical_pairs_are_dropped_and_counted(sft_demo_run, tmp_path):
    data = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}.",
                "rejected": f"The answer is {i + 2}." if i % 4 else f"The answer is {i + 1}."} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rc, out, err = cli.run(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path / 'w'}",
                            f"--config.init_from=checkpoint:{sft_demo_run}", f"--config.data.train={data}",
                            "--config.data.eval_fraction=0.25", "--config.data.batch_size=8", "--config.steps=2",
                            "--config.eval_kl.num_prompts=0"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    counts = dict(re.findall(r"(\w+_identical_dropped)=(\d+)", out + err))
    assert int(counts["train_identical_dropped"]) + int(counts["eval_identical_dropped"]) == 10, counts

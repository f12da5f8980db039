"""GRPO/RLOO stage: advantages of a real rollout against NumPy, the reference-free layout at β = 0, non-finite rewards
skipped, sharding and micro-batch invariance; and through the CLI: a raising reward function (named, run
checkpointed), NaN rewards (update skipped and logged), over-long prompts (left-truncated and counted)."""

import functools
import math
import os

import jax
import numpy as np
import optax
import pytest

from flaxalign import models
from flaxalign.data.batching import left_pad_prompts
from flaxalign.models import heads
from flaxalign.policy import TrainableModel
from flaxalign.stages import grpo, onpolicy
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from flaxalign.train.task import Task
from tests import cli_helpers as cli
from tests import helpers, rollout_reference

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2)
G, PROMPTS, NEW_TOKENS = 4, 4, 6
PROMPT_IDS = [list(np.random.default_rng(0).integers(4, 512, size=n)) for n in (3, 6, 4, 5)]


def _reward_model():
    """(abstract, logical axes, loader) of a random reward model of the policy's architecture."""
    _, abstract, logical = models.abstract_model(CONFIG)
    def without_head(tree):
        return {k: v for k, v in tree.items() if k != "lm_head"}

    params = {"model": without_head(helpers.random_params(CONFIG, 1)),
              "head": heads.init_scalar_head(CONFIG.d_model, 3)}
    return ({"model": without_head(abstract), "head": heads.abstract_scalar_head(CONFIG.d_model)},
            {"model": without_head(logical), "head": heads.HEAD_LOGICAL},
            lambda shardings: jax.device_put(params, shardings))


def _task(h, grad_accum=1, optimizer=None, with_reward_model=False, lora_config=None):
    policy = TrainableModel(CONFIG, lora_config)
    m = grpo.GrpoModels(policy=onpolicy.Policy(policy, 1.0, 16),
                        reward=onpolicy.reward_scorer(CONFIG) if with_reward_model else None)
    layout = grpo.grpo_layout(
        policy, init_base=lambda shardings: jax.device_put(helpers.random_params(CONFIG, 0), shardings),
        reference=h.needs_reference, reward_model=_reward_model() if with_reward_model else None)
    optimizer = optimizer or optax.sgd(0.05)
    task = Task(name="grpo", optimizer=optimizer, eval_step=None, train_data=None, eval_batches=None,
                train_step=functools.partial(grpo.grpo_step, m=m, h=h, optimizer=optimizer, grad_accum=grad_accum),
                tokens_per_step=1, flops_per_step=1.0, metadata={}, **layout)
    return task, m


def _state(task, mesh, tmp, name):
    return loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(tmp, name)))[:2]


def _rollout_with_eos(task, m, h, tmp, greedy=False):
    """`eos_id -> rollout` of 4 prompts × G from one compiled program (the EOS id is an argument, not a constant,
    so that probing for an EOS and rolling out with it compile once)."""
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, tmp, "rollout")
    prompts = left_pad_prompts(PROMPT_IDS, pad_id=0)
    sampling = onpolicy.Sampling(NEW_TOKENS, 1.0)

    @jax.jit
    def fn(state, prompts, rng, eos_id):  # the stage's pieces: repeat, the policy's sampler, the learner's scores
        prompts = grpo.repeat_prompts({**prompts, "index": np.arange(PROMPTS)}, G)
        engine = m.policy.rollout_sampler(eos_id=eos_id, pad_id=0)
        sampled = engine.traced(m.policy.weights(state.params, state.frozen),
                                {k: prompts[k] for k in onpolicy.PROMPT_KEYS}, rng,
                                sampling.greedy() if greedy else sampling)
        return grpo.grpo_score(state, sampled, prompts["index"], m=m, with_reference=h.needs_reference,
                               learner_logps=not greedy)

    def rollout(eos_id):
        with jax.set_mesh(mesh):
            return jax.device_get(fn(state, prompts, jax.random.PRNGKey(3), np.int32(eos_id)))
    return rollout


def _rollout(task, m, h, tmp, rewards, greedy=False):
    return {**_rollout_with_eos(task, m, h, tmp, greedy)(-1), "rewards": np.asarray(rewards, np.float32)}


REWARDS = [1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0.5, 0, 2, 0, 1]


@pytest.mark.parametrize("algorithm, beta", [("grpo", 0.04), ("rloo", 0.05)])
def test_advantages_match_numpy(tmp_path, algorithm, beta):
    h = grpo.GrpoHyper(algorithm=algorithm, group_size=G, beta=beta)
    task, m = _task(h)
    batch = _rollout(task, m, h, str(tmp_path), REWARDS)
    r = np.asarray(REWARDS, np.float64).reshape(PROMPTS, G)
    if algorithm == "grpo":
        expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    else:  # the policy is still the reference, so Σ k1 = 0 and the reward is unchanged
        np.testing.assert_array_equal(batch["old_logps"], batch["ref_logps"])
        expected = r - (r.sum(1, keepdims=True) - r) / (G - 1)
    advantages = grpo.grpo_advantages_of(batch, h)
    np.testing.assert_allclose(advantages, expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_every_rollout_is_scored_by_the_reward_model(tmp_path):
    """Sampled and greedy (evaluation) rollouts, with an EOS that some rows emit: each row's score is the reward
    model's on that row alone, rebuilt unpadded (its prompt without the left padding, its response cut after the
    EOS) and scored at its last token, in float64."""
    h = grpo.GrpoHyper(group_size=G, beta=0.0)
    task, m = _task(h, with_reward_model=True)
    state, _ = _state(task, helpers.mesh((1, 1, 1)), str(tmp_path), "rm")
    reward_params = jax.device_get(state.frozen["reward"])
    for greedy in (False, True):
        rollout = _rollout_with_eos(task, m, h, str(tmp_path), greedy)
        eos_id = int(rollout(-1)["response"][0, 2])  # the same rng samples the same tokens: row 0 ends by step 2
        batch = rollout(eos_id)
        lengths = [rollout_reference.response_length(row, eos_id) for row in batch["response"]]
        assert min(lengths) <= 3 and max(lengths) == NEW_TOKENS, lengths  # rows cut at the EOS and rows without
        rows = [rollout_reference.unpadded_row(PROMPT_IDS[row // G], response, eos_id)
                for row, response in enumerate(batch["response"])]
        expected = rollout_reference.reward_model_scores(CONFIG, reward_params, rows)
        assert np.std(expected) > 1e-4
        np.testing.assert_allclose(batch["rm_scores"], expected, rtol=1e-5, atol=1e-6)  # measured |Δ| ≤ 9.4e-7
    assert (batch["response"][::G] == batch["response"][1::G]).all()  # greedy: a group's rows are identical


def test_reference_free_at_beta_zero(tmp_path):
    h = grpo.GrpoHyper(group_size=G, beta=0.0)
    task, _ = _task(h)
    assert task.abstract_frozen == {}


def test_step_sharded_micro_batched_and_nonfinite_skip(tmp_path):
    tmp = str(tmp_path)
    h = grpo.GrpoHyper(group_size=G, beta=0.04, num_minibatches=2, epochs=2)
    task, m = _task(h)
    batch = _rollout(task, m, h, tmp, REWARDS)
    mesh = helpers.mesh((1, 1, 1))

    def run(task, mesh, name, batch):
        state, shardings = _state(task, mesh, tmp, name)
        new_state, metrics = CompiledStep(task.train_step, mesh, shardings)(state, batch)
        return jax.device_get(new_state), jax.device_get(metrics)

    start = jax.device_get(_state(task, mesh, tmp, "start")[0])
    reference, metrics = run(task, mesh, "unsharded", batch)
    sharded, _ = run(task, helpers.mesh((2, 2, 2)), "sharded", batch)
    micro, _ = run(_task(h, grad_accum=2)[0], mesh, "micro", batch)

    def diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))

    assert diff(reference, start) > 1e-3 and metrics["skipped"] == 0
    assert diff(reference, sharded) < 1e-6 and diff(reference, micro) < 1e-6
    np.testing.assert_allclose(metrics["reward"], np.mean(REWARDS), rtol=1e-6)
    skipped, skipped_metrics = run(task, mesh, "nan", dict(batch, rewards=np.where(
        np.arange(len(REWARDS)) == 5, np.nan, batch["rewards"]).astype(np.float32)))
    assert skipped_metrics["skipped"] == 1 and diff(skipped, start) == 0 and int(skipped.step) == 1


# ----------------------------------------------------------------------------------------------------------------
# Through the CLI, from the demo's SFT run (reward functions are looked up as tests.stages.test_grpo:NAME)
# ----------------------------------------------------------------------------------------------------------------


def exploding_reward(prompts, completions, **_):
    raise ZeroDivisionError("the checker divided by zero")


def sometimes_nan_reward(prompts, completions, **_):
    """NaN for every completion of the first call's batch (step 0), 1.0 afterwards."""
    marker = os.environ["FLAXALIGN_TEST_MARKER"]
    first = not os.path.exists(marker)
    open(marker, "a").close()
    return [math.nan if first else float(len(c) % 2) for c in completions]


def _grpo_flags(workdir, sft, **config):
    values = {"init_from": f"checkpoint:{sft}", "steps": 3, "log_every": 1, "eval_every": 0, "eval_prompts": 0,
              "data.batch_size": 4, "grpo.group_size": 4, "rollout.max_new_tokens": 6, "checkpoint_every": 0}
    values.update(config)
    return ["--config=configs/grpo.py:tiny", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_raising_reward_function_is_named_and_the_run_checkpointed(sft_demo_run, tmp_path):
    workdir = str(tmp_path / "grpo")
    rc, _, err = cli.run(_grpo_flags(workdir, sft_demo_run, rewards="tests.stages.test_grpo:exploding_reward"),
                         cpu_devices=1)
    assert rc == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "tests.stages.test_grpo:exploding_reward" in last and "ZeroDivisionError" in last, last
    assert "Traceback" not in err
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]


@pytest.mark.slow
def test_nan_rewards_skip_the_update_and_long_prompts_are_truncated(sft_demo_run, tmp_path):
    workdir = str(tmp_path / "grpo")
    rc, out, err = cli.run(_grpo_flags(workdir, sft_demo_run, rewards="tests.stages.test_grpo:sometimes_nan_reward",
                                       **{"data.max_prompt_len": 8}),
                           cpu_devices=1, FLAXALIGN_TEST_MARKER=str(tmp_path / "called"))
    assert rc == 0, err[-2000:]
    data_line = next(line for line in out.splitlines() if line.startswith("data:"))
    stats = dict(item.split("=") for item in data_line[len("data: "):].split(", "))
    assert int(stats["train_truncated"]) > 0 and int(stats["train_tokens_removed"]) > 0
    assert "rewards are not finite; this update is skipped" in err
    rows = cli.metrics(workdir)
    assert [row["skipped"] for row in rows if "skipped" in row] == [1.0, 0.0, 0.0]

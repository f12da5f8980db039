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
from flaxalign.losses import group_rl
from flaxalign.models import heads
from flaxalign.policy import TrainableModel
from flaxalign.stages import group_rollout, grpo, onpolicy
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from flaxalign.train.task import Task
from tests import cli_helpers as cli
from tests import helpers, rollout_reference
from tests.config_files import stage_config

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
    m = group_rollout.RolloutModels(policy=onpolicy.Policy(policy, 1.0, 16),
                                    reward=onpolicy.reward_scorer(CONFIG) if with_reward_model else None)
    layout = group_rollout.rollout_layout(
        policy, init_base=lambda shardings: jax.device_put(helpers.random_params(CONFIG, 0), shardings),
        reference=h.needs_reference, frozen_models={"reward": _reward_model()} if with_reward_model else None)
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
        prompts = group_rollout.repeat_prompts({**prompts, "index": np.arange(PROMPTS)}, G)
        engine = m.policy.rollout_sampler(eos_id=eos_id, pad_id=0)
        sampled = engine.traced(m.policy.weights(state.params, state.frozen),
                                {k: prompts[k] for k in onpolicy.PROMPT_KEYS}, rng,
                                sampling.greedy() if greedy else sampling)
        return group_rollout.score_rollout(state, sampled, prompts["index"], m=m, with_reference=h.needs_reference,
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
    else:  # the policy is still the reference, so Σ k1 = 0 (to float rounding: two forward passes over two copies
        # of the weights in one jitted program need not agree bit for bit) and the reward is unchanged
        np.testing.assert_allclose(batch["old_logps"], batch["ref_logps"], rtol=1e-6, atol=1e-6)
        expected = r - (r.sum(1, keepdims=True) - r) / (G - 1)
    advantages = grpo.grpo_advantages_of(batch, batch["rewards"], h)
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


# The issue-19 pieces through the stage: GSPO with the sampler correction and the overlong penalty; REINFORCE++ with
# CISPO (per-token advantages, KL in the reward) over 2 epochs × 2 minibatches
FAMILY = {
    "gspo": dict(importance_sampling_level="sequence", loss_type="grpo", sampler_correction="token_truncate",
                 overlong_buffer=3, overlong_penalty=0.5, beta=0.04, num_minibatches=2, epochs=2),
    "reinforce_pp+cispo": dict(algorithm="reinforce_pp", policy_loss="cispo", cispo_max_weight=1.5, beta=0.05,
                               num_minibatches=2, epochs=2),
}


@pytest.mark.parametrize("variant", list(FAMILY))
def test_family_step_is_sharding_and_micro_batch_invariant_and_uses_its_pieces(tmp_path, variant):
    tmp = str(tmp_path)
    h = grpo.GrpoHyper(group_size=G, **FAMILY[variant])
    task, m = _task(h)
    rollout = _rollout_with_eos(task, m, h, tmp)
    free = rollout(-1)["response"]  # the same rng samples the same tokens: an EOS cuts rows where it occurs

    def lengths(token):  # the response lengths (EOS + 1) that `token` as the EOS would give
        hit = free == token
        return np.where(hit.any(1), np.argmax(hit, axis=1) + 1, free.shape[1])

    eos_id = max(sorted(set(free[:, :5].ravel())), key=lambda token: len(set(lengths(token))))
    batch = {**rollout(int(eos_id)), "rewards": np.asarray(REWARDS, np.float32)}
    assert len(set(batch["response_mask"].sum(1))) > 2  # responses of several lengths
    mesh = helpers.mesh((1, 1, 1))

    def run(task, mesh, name):
        state, shardings = _state(task, mesh, tmp, name)
        new_state, metrics = CompiledStep(task.train_step, mesh, shardings)(state, batch)
        return jax.device_get(new_state.params), jax.device_get(metrics)

    def diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    start = jax.device_get(_state(task, mesh, tmp, "start")[0].params)
    reference, metrics = run(task, mesh, "unsharded")
    assert diff(reference, start) > 1e-3 and metrics["skipped"] == 0
    assert diff(reference, run(task, helpers.mesh((2, 2, 2)), "sharded")[0]) < 1e-6
    assert diff(reference, run(_task(h, grad_accum=2)[0], mesh, "micro")[0]) < 1e-6
    plain = grpo.GrpoHyper(group_size=G, beta=h.beta, num_minibatches=h.num_minibatches, epochs=h.epochs)
    assert diff(reference, run(_task(plain)[0], mesh, "plain")[0]) > 1e-4  # the variant's pieces change the update
    # the sampler and the learner are the same float32 model here: their log-probs agree to rounding
    assert metrics["sampler/logp_gap_max"] < 1e-4
    if h.sampler_correction != "none":
        assert abs(metrics["sampler/is_weight_mean"] - 1) < 1e-4
    if h.overlong_buffer:  # rows reaching into the last 3 of 6 tokens are penalised by up to 0.5
        lengths = batch["response_mask"].sum(1)
        expected = 0.5 * np.where(lengths > 3, (3 - lengths) / 3, 0)
        np.testing.assert_allclose(metrics["overlong_penalty"], expected.mean(), rtol=1e-5)
        assert metrics["overlong_penalty"] < 0


class _GroupScorer:
    """Rewards from the record index: even records get 4 equal rewards (an uninformative group), odd ones 0,1,2,3.
    Keeps every rollout it scores."""

    def __init__(self):
        self.seen = []

    def __call__(self, rollout):
        index = np.asarray(jax.device_get(rollout["index"]))
        self.seen.append(jax.device_get(rollout))
        return np.where(index % 2 == 0, 1.0, np.tile(np.arange(G, dtype=np.float64), len(index) // G)), {}


def test_a_new_advantage_estimator_is_its_function_and_one_registration(monkeypatch):
    """What adding an advantage estimator with its own hyper-parameter takes: the function and one registry entry in
    `losses/group_rl.py` (stood in for here by monkeypatching the registry). The `grpo` config block then has the
    field, `GrpoHyper.from_config` carries it and the stage's advantages use it: no stage or config file changes."""
    def scaled(e, h):
        return h.advantage_scale * group_rl.grpo_advantages(e.rewards, e.group_size)

    monkeypatch.setitem(group_rl.ADVANTAGE_ESTIMATORS._entries, "scaled_grpo",
                        group_rl.Estimator(scaled, kl_in_reward=False, hyper={"advantage_scale": 2.0}))
    assert stage_config("grpo").grpo.advantage_scale == 2.0
    h = grpo.GrpoHyper.from_config(stage_config("grpo", {"grpo.algorithm": "scaled_grpo",
                                                         "grpo.advantage_scale": 3.0, "grpo.group_size": 2}).grpo)
    assert dict(h.estimator_hyper)["advantage_scale"] == 3.0 and h.settings()["advantage_scale"] == 3.0
    rewards = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    batch = {"response_mask": np.ones((4, 3), np.int32), "old_logps": np.zeros((4, 3), np.float32),
             "ref_logps": np.zeros((4, 3), np.float32)}
    ours = grpo.grpo_advantages_of(batch, rewards, h)
    expected = 3.0 * np.asarray(group_rl.grpo_advantages(rewards, 2))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert np.abs(expected).max() > 0.5
    with pytest.raises(group_rl.RLLossError, match="advantage_scale"):
        group_rl.estimator_hyper("grpo", 0.0, advantage_scal=1.0)


def test_dynamic_sampling_keeps_informative_groups_and_refills_from_new_prompts(tmp_path):
    """Round 0 holds records 0-3 (groups 1, 3 informative), the draws records 4-7 (5, 7) and 8-11 (9, 11): the
    batch of 4 groups is 1, 3, 5, 7 — rows copied from the rollouts that sampled them, prompts of a narrower bucket
    left-padded — after 2 rollouts; with a single round allowed, the first rollout's dropped groups 0, 2 fill in."""
    h = grpo.GrpoHyper(group_size=G, beta=0.0)
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path), "dynamic")
    widths = [10, 3, 6]  # the second batch's prompts are shorter: a narrower bucket

    def prompts(first, width):
        ids = [list(np.random.default_rng(first + i).integers(4, 512, size=width - i % 2)) for i in range(PROMPTS)]
        return {**left_pad_prompts(ids, pad_id=0), "index": np.arange(first, first + PROMPTS)}

    batches = iter([prompts(4, widths[1]), prompts(8, widths[2])])
    scorer = _GroupScorer()
    rollouts = group_rollout.GroupRollouts(mesh, scorer, group_size=G, dynamic_sampling_rounds=3, m=m,
                                           sampling=onpolicy.Sampling(NEW_TOKENS, 1.0), eos_id=-1, pad_id=0,
                                           with_reference=False)
    out, logged = rollouts(state, 0, prompts(0, widths[0]), lambda: next(batches))
    out = jax.device_get(out)
    assert logged == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/dropped_groups": 4.0,
                      "dynamic_sampling/filled_groups": 0.0}
    np.testing.assert_array_equal(out["index"], np.repeat([1, 3, 5, 7], G))
    np.testing.assert_array_equal(out["rewards"], np.tile(np.arange(G), 4))
    for slot, (round_, group) in enumerate([(0, 1), (0, 3), (1, 1), (1, 3)]):
        source, rows = scorer.seen[round_], slice(group * G, (group + 1) * G)
        mine = slice(slot * G, (slot + 1) * G)
        for key in ("response", "response_mask", "old_logps", "sampler_logps"):
            np.testing.assert_array_equal(out[key][mine], source[key][rows], err_msg=key)
        pad = out["tokens"].shape[1] - source["tokens"].shape[1]
        np.testing.assert_array_equal(out["tokens"][mine, pad:], source["tokens"][rows])
        assert (out["mask"][mine, :pad] == 0).all()
    assert scorer.seen[1]["tokens"].shape[1] < out["tokens"].shape[1]  # the left padding was exercised

    one_round = group_rollout.GroupRollouts(mesh, _GroupScorer(), group_size=G, dynamic_sampling_rounds=1, m=m,
                                            sampling=onpolicy.Sampling(NEW_TOKENS, 1.0), eos_id=-1, pad_id=0,
                                            with_reference=False)
    out, logged = one_round(state, 0, prompts(0, widths[0]), lambda: pytest.fail("no second round was allowed"))
    assert logged["dynamic_sampling/filled_groups"] == 2.0
    np.testing.assert_array_equal(jax.device_get(out["index"]), np.repeat([1, 3, 0, 2], G))
    np.testing.assert_array_equal(jax.device_get(out["group_weight"]), np.repeat([1.0, 1.0, 0.0, 0.0], G))

    # the fill gets no policy gradient: with rewards that would tell its samples apart (as reward shaping in the step
    # can), the update equals the one where the filled groups' rewards are equal
    out = dict(jax.device_get(out))
    spread, flat = dict(out), dict(out)
    spread["rewards"] = np.tile(np.arange(G, dtype=np.float32), 4)
    flat["rewards"] = np.concatenate([spread["rewards"][: 2 * G], np.zeros(2 * G, np.float32)])
    ones = {**spread, "group_weight": np.ones(4 * G, np.float32)}
    new = {}
    for name, batch in (("spread", spread), ("flat", flat), ("ones", ones)):
        fresh, shardings = _state(task, mesh, str(tmp_path), f"fill_{name}")  # the step donates its state
        new[name] = jax.device_get(CompiledStep(task.train_step, mesh, shardings)(fresh, batch)[0].params)
    assert helpers.max_difference(new["spread"], new["flat"]) < 1e-7
    assert helpers.max_difference(new["spread"], new["ones"]) > 1e-5


class _NanGroupScorer:
    """Group 0's rewards are all NaN (a reward function that cannot score that prompt), the others 0, 1, 2, 3."""

    def __call__(self, rollout):
        index = np.asarray(jax.device_get(rollout["index"]))
        return np.where(index == 0, np.nan, np.tile(np.arange(G, dtype=np.float64), len(index) // G)), {}


def test_dynamic_sampling_keeps_a_non_finite_group_and_leaves_a_full_batch_alone(tmp_path):
    """A group with a NaN reward is kept (the step is then skipped and logged, as without dynamic sampling), so this
    batch needs no refill: nothing is drawn, and the first rollout comes back as it was."""
    h = grpo.GrpoHyper(group_size=G, beta=0.0)
    task, m = _task(h)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path), "nan_group")
    prompts = {**left_pad_prompts(PROMPT_IDS, pad_id=0), "index": np.arange(PROMPTS)}
    rollouts = group_rollout.GroupRollouts(mesh, _NanGroupScorer(), group_size=G, dynamic_sampling_rounds=3, m=m,
                                           sampling=onpolicy.Sampling(NEW_TOKENS, 1.0), eos_id=-1, pad_id=0,
                                           with_reference=False)
    out, logged = rollouts(state, 0, prompts, lambda: pytest.fail("a full batch drew more prompts"))
    assert logged == {"dynamic_sampling/rounds": 1.0, "dynamic_sampling/dropped_groups": 0.0,
                      "dynamic_sampling/filled_groups": 0.0}
    rewards = jax.device_get(out["rewards"])
    assert np.isnan(rewards[:G]).all() and (rewards[G:] == np.tile(np.arange(G), PROMPTS - 1)).all()
    np.testing.assert_array_equal(jax.device_get(out["index"]), np.repeat(np.arange(PROMPTS), G))


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

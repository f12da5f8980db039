"""PPO stage: the rollout and `ppo_step` against an independent NumPy computation of the rewards, GAE and whitening;
KL exactly 0 while policy == reference; the missing-EOS penalty; padding kept out; non-finite scores skipped;
sharding and micro-batch invariance; config errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxalign import errors, models, sampler
from flaxalign.data.batching import left_pad_prompts
from flaxalign.models import heads
from flaxalign.peft import lora
from flaxalign.policy import TrainableModel, value_model
from flaxalign.sampler import generate_recompute
from flaxalign.stages import onpolicy, ppo
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from flaxalign.train.optim import make_optimizer
from flaxalign.train.task import Task
from tests import helpers, rollout_reference

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2)
PAD = 0
ROWS, NEW_TOKENS = 8, 8
HYPER = ppo.PpoHyper(epochs=2, num_minibatches=2, kl_coef=0.1)


def _models(temperature=0.7, lora_config=None):
    policy = TrainableModel(CONFIG, lora_config)
    value, _ = value_model(policy, "auto", CONFIG)
    return ppo.PpoModels(policy=onpolicy.Policy(policy, temperature, 16), value=value,
                         reward=onpolicy.reward_scorer(CONFIG))


def _without_head(tree):
    return {k: v for k, v in tree.items() if k != "lm_head"}


def _task(h=HYPER, grad_accum=1, optimizer=None, lora_config=None):
    _, abstract, logical = models.abstract_model(CONFIG)
    rm_abstract = {"model": _without_head(abstract), "head": heads.abstract_scalar_head(CONFIG.d_model)}
    rm_logical = {"model": _without_head(logical), "head": heads.HEAD_LOGICAL}
    rm_params = {"model": _without_head(helpers.random_params(CONFIG, 1)),
                 "head": heads.init_scalar_head(CONFIG.d_model, 3)}
    m = _models(lora_config=lora_config)
    layout = ppo.ppo_layout(
        m.policy.model, m.value, "policy" if lora_config else "reward",
        init_base=lambda shardings: jax.device_put(helpers.random_params(CONFIG, 0), shardings),
        reward_model=(rm_abstract, rm_logical, lambda shardings: jax.device_put(rm_params, shardings)),
        kl_coef=h.kl_coef)
    optimizer = optimizer or make_optimizer(helpers.optim_config(lr=1e-3, warmup_steps=0, weight_decay=0.0))
    return Task(name="ppo", optimizer=optimizer, eval_step=None, train_data=None, eval_batches=None,
                train_step=functools.partial(ppo.ppo_step, m=m, h=h,
                                             optimizer=optimizer, grad_accum=grad_accum),
                tokens_per_step=1, flops_per_step=1.0, metadata={}, **layout)


def _state(task, mesh, tmp_path, name):
    """A fresh state whose value head is random (so GAE sees non-zero values)."""
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(tmp_path, name)))
    head = {"kernel": jnp.asarray(np.random.default_rng(5).normal(size=CONFIG.d_model) * 0.1, jnp.float32),
            "bias": jnp.asarray(0.3, jnp.float32)}
    head = jax.device_put(head, shardings.params["value"]["head"])
    return state.replace(params={**state.params, "value": {**state.params["value"], "head": head}}), shardings


PROMPT_IDS = [list(np.random.default_rng(0).integers(4, CONFIG.vocab_size, size=n)) for n in (3, 7, 5, 8, 2, 6, 4, 8)]


def _prompts():
    return left_pad_prompts(PROMPT_IDS, pad_id=PAD)


def _rollout(state, eos_id, penalty=0.0, mesh=None, lora_config=None):
    """The stage's own rollout: the policy's sampler, then `ppo_score`."""
    rollouts = ppo.Rollouts(mesh or helpers.mesh((1, 1, 1)), m=_models(lora_config=lora_config),
                            sampling=onpolicy.Sampling(NEW_TOKENS, 0.7), eos_id=eos_id, pad_id=PAD, gain=2.0,
                            bias=-0.5, missing_eos_penalty=penalty)
    return jax.device_get(rollouts.rollout(state, _prompts(), jax.random.PRNGKey(11)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(task, mesh, eos_id, rollout): EOS is a token that row 0 samples at step 3, so some rows end and others
    run to the token budget (mixed masks)."""
    tmp = str(tmp_path_factory.mktemp("ppo"))
    task, mesh = _task(), helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, tmp, "probe")
    free = _rollout(state, eos_id=-1)
    eos_id = int(free["response"][0, 3])
    rollout = _rollout(state, eos_id=eos_id)
    assert rollout["ended"].any() and not rollout["ended"].all()
    return task, mesh, eos_id, rollout, tmp


def _step(task, mesh, tmp, name, batch):
    state, shardings = _state(task, mesh, tmp, name)
    new_state, metrics = CompiledStep(task.train_step, mesh, shardings)(state, batch)
    return jax.device_get(new_state), jax.device_get(metrics)


def _reference_advantages(batch, beta, gamma=1.0, lam=0.95):
    """Rewards (k1 penalty + score on the last real token), a Python GAE loop over each row's real tokens (the EOS
    token is the last one: V after it = 0) and whitening with the unbiased variance, in float64."""
    mask = batch["response_mask"].astype(bool)
    logr = batch["old_logps"].astype(np.float64) - batch["ref_logps"]
    values = batch["values"].astype(np.float64)
    advantages = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        rewards = -beta * logr[b, :n]
        rewards[n - 1] += batch["scores"][b]
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[t] + gamma * next_value - values[b, t] + gamma * lam * last
            advantages[b, t] = last
    real = advantages[mask]
    whitened = (advantages - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8)
    return np.where(mask, whitened, 0.0)


class _HostEngine:
    """Another engine behind the sampler seam, as an external server would be: `generate_recompute` (no cache) run
    on its own, answering with numpy arrays of the contract's shapes. It also records what it was given."""

    def __init__(self, m, eos_id):
        self.run = jax.jit(lambda w, p, r, s: generate_recompute(
            m.policy.forward(w["trainable"], w["frozen"]), p, r, max_new_tokens=s.max_new_tokens, eos_id=eos_id,
            pad_id=PAD, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p), static_argnums=3)
        self.seen, self.answers, self.frozen_given = [], [], []

    def sample(self, weights, prompts, rng, sampling, group_size=1):
        self.seen.append(sampling)
        self.frozen_given.append(weights["frozen"])
        self.answers.append(jax.device_get(self.run(weights, prompts, rng, sampling)))
        return self.answers[-1]


def test_another_engine_plugs_into_the_rollout(setup):
    """The PPO rollout through the seam with a host-side engine that recomputes the prefix (numpy outputs): the
    same tokens as the default KV-cache sampler (same rng), and the learner's own log-probs, values and scores."""
    task, mesh, eos_id, rollout, tmp = setup
    state, _ = _state(task, mesh, tmp, "engine")
    engine = _HostEngine(_models(), eos_id)
    rollouts = ppo.Rollouts(mesh, m=_models(), sampling=onpolicy.Sampling(NEW_TOKENS, 0.7), eos_id=eos_id, pad_id=PAD,
                            gain=2.0, bias=-0.5, engine=engine)
    other = jax.device_get(rollouts.rollout(state, _prompts(), jax.random.PRNGKey(11)))
    assert engine.seen == [onpolicy.Sampling(NEW_TOKENS, 0.7)]
    assert "policy" in state.frozen  # full fine-tuning's reference copy, which the sampler is not given
    assert engine.frozen_given == [{"policy": {}}]
    contract = sampler.rollout_shapes(len(PROMPT_IDS), _prompts()["input_ids"].shape[1], engine.seen[0])
    assert {k: (v.shape, v.dtype) for k, v in engine.answers[0].items()} == {
        k: (v.shape, v.dtype) for k, v in contract.items()}
    for key in ("tokens", "mask", "response", "response_mask", "ended"):
        np.testing.assert_array_equal(other[key], rollout[key], err_msg=key)
    for key in ("old_logps", "ref_logps", "values", "scores"):
        np.testing.assert_allclose(other[key], rollout[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_prompts_cut_to_their_bucket_give_the_same_rollout(setup):
    """Prompts left-padded to 40 columns are cut to 16 (`trim_left_padding`: the next power of two ≥ 16 above the
    longest, 8): the dropped columns are padding in every row, so the responses are the same token for token and the
    learner's scores the same up to rounding."""
    task, mesh, eos_id, _, tmp = setup
    state, _ = _state(task, mesh, tmp, "trim")
    wide = left_pad_prompts(PROMPT_IDS, pad_id=PAD, length=40)
    cut = sampler.trim_left_padding({**wide, "index": np.arange(len(PROMPT_IDS))})
    assert cut["input_ids"].shape == (len(PROMPT_IDS), 16) and (cut["index"] == np.arange(len(PROMPT_IDS))).all()
    np.testing.assert_array_equal(cut["input_ids"], wide["input_ids"][:, 24:])
    rollouts = ppo.Rollouts(mesh, m=_models(), sampling=onpolicy.Sampling(NEW_TOKENS, 0.7), eos_id=eos_id, pad_id=PAD,
                            gain=2.0, bias=-0.5)
    rng = jax.random.PRNGKey(11)
    full = jax.device_get(rollouts.rollout(state, wide, rng))
    short = jax.device_get(rollouts.rollout(state, {k: cut[k] for k in onpolicy.PROMPT_KEYS}, rng))
    assert short["tokens"].shape[1] == 16 + NEW_TOKENS
    for key in ("response", "response_mask", "ended"):
        np.testing.assert_array_equal(short[key], full[key], err_msg=key)
    for key in ("old_logps", "ref_logps", "values", "scores"):
        np.testing.assert_allclose(short[key], full[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_rollout_masks_values_and_kl_zero_at_start(setup):
    _, _, eos_id, rollout, _ = setup
    mask = rollout["response_mask"].astype(bool)
    ended = rollout["ended"]
    for row, row_mask, done in zip(rollout["response"], mask, ended):
        n = int(row_mask.sum())
        assert (row[:n - 1] != eos_id).all()
        assert (row[n - 1] == eos_id) == done and (n == NEW_TOKENS or done)
        assert (row[n:] == PAD).all()
    for key in ("old_logps", "ref_logps", "values", "kl", "entropy"):
        assert (rollout[key][~mask] == 0).all(), key
    # the policy is the reference: identical log-probs and a full-vocabulary KL of exactly 0
    np.testing.assert_array_equal(rollout["old_logps"], rollout["ref_logps"])
    assert (rollout["kl"] == 0).all()
    assert (rollout["values"][mask] != 0).all()


def test_rollout_kl_logps_and_scores_match_each_row_rebuilt_unpadded(setup):
    """Policy ≠ reference (the frozen reference perturbed; the policy, hence every sampled token, unchanged), each
    row rebuilt unpadded — prompt without its left padding, response cut after its EOS — and run alone: per-token
    `kl` is the full-softmax KL(π‖π_ref) of softmax(logits / 0.7) in float64 over the response tokens (0 after),
    `old_logps` / `ref_logps` the sampled tokens' log-probs, `raw_scores` the reward model's at the last token."""
    task, mesh, eos_id, rollout, tmp = setup
    state, shardings = _state(task, mesh, tmp, "moved_reference")
    reference = rollout_reference.perturbed(jax.device_get(state.frozen["policy"]), seed=9, scale=0.02)
    state = state.replace(frozen={**state.frozen,
                                  "policy": jax.device_put(reference, shardings.frozen["policy"])})
    moved = _rollout(state, eos_id)
    np.testing.assert_array_equal(moved["response"], rollout["response"])
    rows = [rollout_reference.unpadded_row(p, r, eos_id) for p, r in zip(PROMPT_IDS, moved["response"])]
    lengths = [len(row) - len(p) for row, p in zip(rows, PROMPT_IDS)]
    np.testing.assert_array_equal(moved["response_mask"].sum(1), lengths)
    assert min(lengths) < NEW_TOKENS == max(lengths)  # rows cut at their EOS and rows without one
    prompt_lens = [len(p) for p in PROMPT_IDS]
    policy = rollout_reference.response_log_probs(CONFIG, jax.device_get(state.params["policy"]), rows,
                                                  prompt_lens, temperature=0.7)
    ref = rollout_reference.response_log_probs(CONFIG, reference, rows, prompt_lens, temperature=0.7)
    for b, (logp, logq, n) in enumerate(zip(policy, ref, lengths)):
        kl = (np.exp(logp) * (logp - logq)).sum(-1)
        assert kl.min() > 1e-4  # the perturbation is visible at every token
        taken = moved["response"][b, :n, None]
        # measured (float32 passes vs float64): |Δkl| ≤ 6.4e-7 for KLs up to 1.5, |Δ log-prob| ≤ 1.8e-6
        np.testing.assert_allclose(moved["kl"][b, :n], kl, rtol=1e-5, atol=2e-6, err_msg=f"row {b}")
        np.testing.assert_allclose(moved["old_logps"][b, :n], np.take_along_axis(logp, taken, 1)[:, 0],
                                   rtol=1e-5, atol=5e-6, err_msg=f"row {b}")
        np.testing.assert_allclose(moved["ref_logps"][b, :n], np.take_along_axis(logq, taken, 1)[:, 0],
                                   rtol=1e-5, atol=5e-6, err_msg=f"row {b}")
        assert (moved["kl"][b, n:] == 0).all() and (moved["ref_logps"][b, n:] == 0).all()
    scores = rollout_reference.reward_model_scores(CONFIG, jax.device_get(state.frozen["reward"]), rows)
    assert np.std(scores) > 1e-3
    np.testing.assert_allclose(moved["raw_scores"], scores, rtol=1e-5, atol=1e-6)  # measured |Δ| ≤ 4.9e-7


def test_missing_eos_penalty_applies_only_to_rows_without_eos(setup):
    task, mesh, eos_id, rollout, tmp = setup
    state, _ = _state(task, mesh, tmp, "penalty")
    penalised = _rollout(state, eos_id, penalty=2.5)
    np.testing.assert_array_equal(penalised["ended"], rollout["ended"])
    np.testing.assert_allclose(rollout["scores"] - penalised["scores"], 2.5 * (~rollout["ended"]), atol=1e-6)
    np.testing.assert_allclose(rollout["scores"], 2.0 * rollout["raw_scores"] - 0.5, rtol=1e-6)


def test_first_minibatch_ratio_one_and_loss_minus_mean_advantage(setup):
    """On the first minibatch of epoch 0 the ratio is 1 and the clipped surrogate is −mean(A) over its tokens, with
    A from an independent NumPy reward/GAE/whitening computation; the KL metrics are exactly 0."""
    task, mesh, _, rollout, tmp = setup
    state, _ = _state(task, mesh, tmp, "first")
    advantages = _reference_advantages(rollout, beta=HYPER.kl_coef)
    _, shuffle_rng = jax.random.split(state.rng)
    first = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_rng, 0), ROWS))[: ROWS // 2]
    mask = rollout["response_mask"][first].astype(bool)
    expected = -advantages[first][mask].mean()
    _, metrics = _step(task, mesh, tmp, "first_step", rollout)
    assert abs(metrics["ratio_first"] - 1.0) < 1e-6
    np.testing.assert_allclose(metrics["policy_loss_first"], expected, rtol=1e-4, atol=1e-5)
    assert metrics["kl"] == 0 and metrics["kl_estimate"] == 0 and metrics["skipped"] == 0
    np.testing.assert_allclose(metrics["rlhf_reward"], rollout["scores"].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["eos_rate"], rollout["ended"].mean())


def test_padding_never_enters_the_step(setup):
    """NaN in every masked position of the per-token inputs changes nothing."""
    task, mesh, _, rollout, tmp = setup
    mask = rollout["response_mask"].astype(bool)
    poisoned = dict(rollout)
    for key in ("old_logps", "ref_logps", "values"):
        poisoned[key] = np.where(mask, rollout[key], np.nan).astype(np.float32)
    clean_state, clean = _step(task, mesh, tmp, "clean", rollout)
    dirty_state, dirty = _step(task, mesh, tmp, "dirty", poisoned)
    assert all(np.isfinite(v) for v in dirty.values())
    for a, b in zip(jax.tree.leaves(clean_state.params), jax.tree.leaves(dirty_state.params)):
        np.testing.assert_array_equal(a, b)
    assert clean == dirty


def test_nonfinite_score_skips_the_update(setup):
    task, mesh, _, rollout, tmp = setup
    before, _ = _state(task, mesh, tmp, "nan_before")
    before = jax.device_get(before)
    batch = dict(rollout, scores=np.where(np.arange(ROWS) == 2, np.nan, rollout["scores"]).astype(np.float32))
    after, metrics = _step(task, mesh, tmp, "nan", batch)
    assert metrics["skipped"] == 1 and all(np.isfinite(v) for v in metrics.values())
    assert int(after.step) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.frozen)),
                    jax.tree.leaves((after.params, after.opt_state, after.frozen))):
        np.testing.assert_array_equal(a, b)


def _max_param_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in
               zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


def test_sharded_equals_unsharded_and_micro_batch_invariance(setup):
    """Plain SGD, so that the comparison sees the gradients themselves (Adam's first steps move every weight by
    about ±lr whatever the size of its gradient, magnifying float-order noise)."""
    _, mesh, _, rollout, tmp = setup
    sgd = optax.sgd(0.05)
    task = _task(optimizer=sgd)
    reference, ref_metrics = _step(task, mesh, tmp, "unsharded", rollout)
    sharded, sh_metrics = _step(task, helpers.mesh((2, 2, 2)), tmp, "sharded", rollout)
    micro, micro_metrics = _step(_task(grad_accum=2, optimizer=sgd), mesh, tmp, "micro", rollout)
    moved = _max_param_diff(reference, jax.device_get(_state(task, mesh, tmp, "start")[0]))
    assert moved > 1e-3  # the step did update the weights
    assert _max_param_diff(reference, sharded) < 1e-6
    assert _max_param_diff(reference, micro) < 1e-6
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "score", "explained_variance"):
        np.testing.assert_allclose(sh_metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(micro_metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6)


def test_lora_policy_uses_the_base_as_reference_and_its_own_value_lora(setup, tmp_path):
    """With LoRA nothing is copied: the reference is the base with the adapters off (KL exactly 0 at the start),
    the value model the same base with its own LoRA; a step moves both LoRAs and leaves the base untouched."""
    _, mesh, eos_id, _, _ = setup
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    task = _task(lora_config=lora_config, optimizer=optax.sgd(0.05))
    assert set(task.abstract_frozen) == {"policy", "reward", "kl_coef"}
    state, shardings = _state(task, mesh, str(tmp_path), "lora")
    before = jax.device_get(state)
    rollout = _rollout(state, eos_id, lora_config=lora_config)
    np.testing.assert_array_equal(rollout["old_logps"], rollout["ref_logps"])
    assert (rollout["kl"] == 0).all()
    after, metrics = CompiledStep(task.train_step, mesh, shardings)(state, rollout)
    after = jax.device_get(after)
    assert abs(metrics["ratio_first"] - 1.0) < 1e-6
    for a, b in zip(jax.tree.leaves(before.frozen["policy"]), jax.tree.leaves(after.frozen["policy"])):
        np.testing.assert_array_equal(a, b)
    for part in (("policy", "lora"), ("value", "model", "lora")):
        old, new = before.params, after.params
        for key in part:
            old, new = old[key], new[key]
        assert max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new))) > 0


def test_adaptive_kl_controller():
    beta = ppo.adaptive_kl_coef(0.1, 12.0, target=6.0, horizon=1000.0, batch_size=50)
    np.testing.assert_allclose(beta, 0.1 * (1 + 0.2 * 50 / 1000))  # error clipped at +0.2
    np.testing.assert_allclose(ppo.adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=1000.0, batch_size=50),
                               0.1 * (1 - 0.1 * 50 / 1000), rtol=1e-6)
    assert ppo.adaptive_kl_coef(0.1, 12.0, target=0.0, horizon=1000.0, batch_size=50) == 0.1


@pytest.mark.parametrize("kwargs, message", [
    ({"kl_estimator": "k4"}, "kl_estimator"), ({"epochs": 0}, "epochs"), ({"clip_eps": 0.0}, "clip_eps"),
    ({"gamma": 1.5}, "gamma"), ({"missing_eos_penalty": -1.0}, "missing_eos_penalty")])
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(errors.ConfigError, match=message):
        ppo.PpoHyper(**kwargs)


def test_sampling_needs_positive_temperature():
    with pytest.raises(errors.ConfigError, match="temperature"):
        onpolicy.Sampling(temperature=0.0)

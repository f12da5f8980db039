"""flaxalign's GRPO/RLOO math against TRL 1.16 itself, in float64.

TRL keeps this math inside trainer methods. `GRPOTrainer._compute_loss` is called unbound with a stand-in `self` and a
stand-in forward that returns the given per-token log-probs. The GRPO and RLOO advantage code sits in the middle of
`_generate_and_score_completions` (after generation and reward calls), so the exact source lines from the reward sum
to `torch.nan_to_num(advantages)` are cut out of TRL's installed method with `inspect` and run on the given rewards: it
is TRL's own code, and a TRL release that changes those lines fails here loudly instead of silently.

TRL 1.x has no PPO trainer and no `masked_whiten`/`masked_var` (removed with PPO), so GAE, whitening and the PPO
losses are checked only against `rl_reference.py`. torch and trl are imported inside the fixture, not at collection
time: importing trl changes the global state of the test process.
"""

import collections
import inspect
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from tests.losses import rl_reference as ref

pytestmark = pytest.mark.parity

RTOL, ATOL = 1e-6, 1e-12
X = ref.INPUTS


@pytest.fixture(scope="module")
def trl():
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from trl.trainer import grpo_trainer, rloo_trainer

    return types.SimpleNamespace(torch=torch, grpo=grpo_trainer, rloo=rloo_trainer)


def _t(trl, values, dtype=None):
    return trl.torch.tensor(np.asarray(values), dtype=dtype or trl.torch.float64)


def _source_block(method, first, last):
    """The dedented lines of `method` from the line containing `first` through the line containing `last`."""
    lines = inspect.getsource(method).splitlines()
    starts = [i for i, line in enumerate(lines) if first in line]
    ends = [i for i, line in enumerate(lines) if last in line]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], (
        f"TRL's {method.__qualname__} changed: cannot find the block {first!r} … {last!r}")
    return textwrap.dedent("\n".join(lines[starts[0]:ends[0] + 1]))


def _run_block(trl, method, first, last, namespace):
    namespace = {"torch": trl.torch, **namespace}
    code = compile(_source_block(method, first, last), f"<TRL {method.__qualname__}>", "exec")
    exec(code, namespace)  # noqa: S102 -- TRL's own installed source, cut out of its method
    return namespace["advantages"].numpy()


def trl_grpo_advantages(trl, rewards, group_size, scale_rewards):
    stand_in = types.SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards,
                                     reward_weights=trl.torch.ones(1, dtype=trl.torch.float64))
    rewards = _t(trl, rewards)
    return _run_block(trl, trl.grpo.GRPOTrainer._generate_and_score_completions,
                      'if self.multi_objective_aggregation == "sum_then_normalize":',
                      "advantages = torch.nan_to_num(advantages, nan=0.0)",
                      {"self": stand_in, "nanstd": trl.grpo.nanstd, "rewards_per_func": rewards[:, None],
                       "unscorable_mask": trl.torch.zeros(len(rewards), dtype=trl.torch.bool),
                       "num_generations": group_size, "device": "cpu"})


def trl_rloo_advantages(trl, rewards, group_size, *, normalize, beta=0.0, old_logps=None, ref_logps=None, mask=None):
    stand_in = types.SimpleNamespace(reward_weights=trl.torch.ones(1, dtype=trl.torch.float64), reward_clip_range=None,
                                     beta=beta, normalize_advantages=normalize)
    rewards = _t(trl, rewards)
    namespace = {"self": stand_in, "nanstd": trl.rloo.nanstd, "rewards_per_func": rewards[:, None],
                 "unscorable_mask": trl.torch.zeros(len(rewards), dtype=trl.torch.bool),
                 "num_generations": group_size, "device": "cpu", "gather": lambda t: t}
    if beta:
        namespace.update(old_per_token_logps=_t(trl, old_logps), ref_per_token_logps=_t(trl, ref_logps),
                         completion_mask=_t(trl, mask, trl.torch.long))
    return _run_block(trl, trl.rloo.RLOOTrainer._generate_and_score_completions,
                      "# Apply weights to each reward function's output and sum",
                      "advantages = torch.nan_to_num(advantages, nan=0.0)", namespace)


def trl_grpo_loss(trl, logps, old_logps, ref_logps, advantages, mask, *, beta, loss_type, eps, eps_high, max_len):
    """(loss, logged metrics) from `GRPOTrainer._compute_loss` (one process, no accumulation, token-level IS)."""
    torch = trl.torch
    def identity(t, **kw):
        return t

    accelerator = types.SimpleNamespace(reduce=identity, gather=identity, gather_for_metrics=identity, num_processes=1)
    logps = _t(trl, logps)
    stand_in = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False, model=types.SimpleNamespace(
            training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=accelerator,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **kw: (logps, torch.zeros_like(logps), None))
    completion_mask = _t(trl, mask, torch.long)
    inputs = {"prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long),
              "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
              "advantages": _t(trl, advantages), "old_per_token_logps": _t(trl, old_logps),
              "ref_per_token_logps": _t(trl, ref_logps), "num_items_in_batch": completion_mask.sum()}
    loss = trl.grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss.item(), {k: v[-1] for k, v in stand_in._metrics["train"].items()}


def _ours(fn, *args, **kwargs):
    with jax.enable_x64(True):
        args = [None if a is None else jnp.asarray(a) for a in args]
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


@pytest.mark.parametrize("group_size", [2, 3, 6])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(trl, scale_rewards, group_size):
    expected = trl_grpo_advantages(trl, X["seq_rewards"], group_size, scale_rewards)
    ours = _ours(losses.grpo_advantages, X["seq_rewards"], group_size=group_size, scale_rewards=scale_rewards)
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)


def test_grpo_advantages_tied_group_matches_trl(trl):
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    expected = trl_grpo_advantages(trl, rewards, 3, "group")
    np.testing.assert_allclose(_ours(losses.grpo_advantages, rewards, group_size=3), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("group_size", [2, 3, 6])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(trl, normalize, group_size):
    expected = trl_rloo_advantages(trl, X["seq_rewards"], group_size, normalize=normalize)
    ours = _ours(losses.rloo_advantages, X["seq_rewards"], group_size=group_size, normalize=normalize)
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)


def test_rloo_kl_shaped_rewards_match_trl(trl):
    """TRL RLOO with β > 0: r − β·Σ_t m·(old − ref), i.e. the k1 `kl_penalty` summed over real tokens."""
    beta, mask = 0.05, ref.MASK
    expected = trl_rloo_advantages(trl, X["seq_rewards"], 3, normalize=True, beta=beta, old_logps=X["old_logps"],
                                   ref_logps=X["ref_logps"], mask=mask)
    with jax.enable_x64(True):
        kl = jnp.sum(jnp.where(mask, losses.kl_penalty(jnp.asarray(X["old_logps"]), jnp.asarray(X["ref_logps"])), 0),
                     axis=-1)
        ours = np.asarray(losses.rloo_advantages(jnp.asarray(X["seq_rewards"]) - beta * kl, 3, normalize=True))
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, eps_high", [(0.0, None), (0.04, None), (0.04, 0.28)])
def test_grpo_loss_matches_trl(trl, loss_type, beta, eps_high):
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], ref.MASK]
    expected, metrics = trl_grpo_loss(trl, *args, beta=beta, loss_type=loss_type, eps=0.2,
                                      eps_high=0.2 if eps_high is None else eps_high, max_len=10)
    loss_sum, count, ours = _ours(losses.grpo_policy_loss, *args, beta=beta, clip_eps=0.2, clip_eps_high=eps_high,
                                  loss_type=loss_type, max_completion_length=10)
    np.testing.assert_allclose(loss_sum / count, expected, rtol=RTOL, atol=ATOL)
    keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for k in keys:
        np.testing.assert_allclose(ours[k], metrics[k], rtol=RTOL, atol=ATOL, err_msg=k)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


def test_grpo_loss_with_an_empty_completion_matches_trl(trl):
    """A fully masked row (TRL's mask_truncated_completions) still counts as a sequence in `grpo`."""
    mask = ref.MASK.copy()
    mask[2] = False
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], mask]
    for loss_type in ("grpo", "dapo"):
        expected, _ = trl_grpo_loss(trl, *args, beta=0.1, loss_type=loss_type, eps=0.2, eps_high=0.2, max_len=7)
        loss_sum, count, _ = _ours(losses.grpo_policy_loss, *args, beta=0.1, loss_type=loss_type)
        np.testing.assert_allclose(loss_sum / count, expected, rtol=RTOL, atol=ATOL)

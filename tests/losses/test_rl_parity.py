"""flaxalign's GRPO/RLOO math against TRL 1.16 itself, in float64.

TRL keeps this math inside trainer methods. `GRPOTrainer._compute_loss` is called unbound with a stand-in `self` and a
stand-in forward that returns the given per-token log-probs. The GRPO and RLOO advantage code sits in the middle of
`_generate_and_score_completions` (after generation and reward calls), so the exact source lines from the reward sum
to `torch.nan_to_num(advantages)` are cut out of TRL's installed method with `inspect` and run on the given rewards: it
is TRL's own code, and a TRL release that changes those lines fails here loudly instead of silently.

The GRPO family's options run through the same `_compute_loss`: GSPO (importance_sampling_level="sequence"), CISPO
(loss_type="cispo"), `args.delta` and the vLLM importance-sampling correction (the loss times
inputs["importance_sampling_ratio"]); that ratio and its logged metrics are computed by two more blocks cut out of
`_generate_and_score_completions`, and DAPO's overlong penalty is TRL's `get_soft_overlong_punishment`.

TRL 1.x has no PPO trainer and no `masked_whiten`/`masked_var` (removed with PPO), so GAE, whitening and the PPO
losses are checked only against `rl_reference.py`. torch and trl are imported inside the fixture, not at collection
time: importing trl changes the global state of the test process.
"""

import collections
import inspect
import math
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from tests.losses import group_rl_reference as gref
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
    """The dedented lines of `method` from the line containing `first` through the line containing `last`, and on to
    the end of the statement that line is in (the first later line at which the block compiles)."""
    lines = inspect.getsource(method).splitlines()
    starts = [i for i, line in enumerate(lines) if first in line]
    ends = [i for i, line in enumerate(lines) if last in line]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], (
        f"TRL's {method.__qualname__} changed: cannot find the block {first!r} … {last!r}")
    for end in range(ends[0], len(lines)):
        block = textwrap.dedent("\n".join(lines[starts[0]:end + 1]))
        try:
            compile(block, "<block>", "exec")
            return block
        except SyntaxError:
            continue
    raise AssertionError(f"TRL's {method.__qualname__} changed: the block {first!r} … {last!r} never compiles")


def _run_block(trl, method, first, last, namespace, result="advantages"):
    """Run the block in `namespace` (plus torch); return its `result` as NumPy, or the whole namespace for None."""
    namespace = {"torch": trl.torch, **namespace}
    code = compile(_source_block(method, first, last), f"<TRL {method.__qualname__}>", "exec")
    exec(code, namespace)  # noqa: S102 -- TRL's own installed source, cut out of its method
    return namespace if result is None else namespace[result].numpy()


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


def _identity(t, **kw):
    return t


def trl_grpo_loss(trl, logps, old_logps, ref_logps, advantages, mask, *, beta, loss_type, eps, eps_high, max_len,
                  importance_sampling_level="token", delta=None, is_weights=None, grad=False):
    """(loss, logged metrics) from `GRPOTrainer._compute_loss` (one process, no accumulation), and with `grad` the
    loss's gradient w.r.t. the per-token log-probs (torch autograd). `is_weights` turns on the vLLM
    importance-sampling correction with those weights as inputs["importance_sampling_ratio"]."""
    torch = trl.torch
    accelerator = types.SimpleNamespace(reduce=_identity, gather=_identity, gather_for_metrics=_identity,
                                        num_processes=1)
    logps = _t(trl, logps).requires_grad_(grad)
    stand_in = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=importance_sampling_level,
        beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=is_weights is not None,
        vllm_importance_sampling_correction=is_weights is not None, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=accelerator,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **kw: (logps, torch.zeros_like(logps), None))
    completion_mask = _t(trl, mask, torch.long)
    inputs = {"prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long),
              "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
              "advantages": _t(trl, advantages), "old_per_token_logps": _t(trl, old_logps),
              "ref_per_token_logps": _t(trl, ref_logps), "num_items_in_batch": completion_mask.sum()}
    if is_weights is not None:
        inputs["importance_sampling_ratio"] = _t(trl, is_weights)
    loss = trl.grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)
    metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items()}
    if not grad:
        return loss.item(), metrics
    loss.backward()
    return loss.item(), metrics, logps.grad.numpy()


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


# ------------------------------------------------------------------------------------------------------------------
# The GRPO family's options: GSPO, CISPO, δ, the vLLM importance-sampling correction
# ------------------------------------------------------------------------------------------------------------------

CLIP_FLAGS = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]


def _trl_flags(ours, args, keys, **kwargs):
    """Our flag metrics as TRL logs them. TRL's `global_masked_mean` averages a `[B, T]` flag over real tokens (ours
    too) but a `[B, 1]` one over sequences: under importance_sampling_level="sequence" with `[B]` advantages, where
    ours carries each sequence's flag on its tokens. Then: each row alone (whose token mean of its sequence's flag is
    the flag), and the mean over rows."""
    if kwargs.get("importance_sampling_level", "token") == "token" or np.ndim(args[3]) == 2:
        return {k: ours[k] for k in keys}
    rows = [_ours(losses.grpo_policy_loss, *[None if a is None else a[b:b + 1] for a in args], **kwargs)[2]
            for b in range(len(args[0]))]
    return {k: np.mean([row[k] for row in rows]) for k in keys}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("adv", ["seq_advantages", "advantages"])
def test_gspo_matches_trl(trl, adv, beta, loss_type):
    """GSPO: TRL importance_sampling_level="sequence" (its paper's setting is loss_type="grpo"). ε small enough that
    whole sequences clip (with sequence advantages: rows 0 high, 5 low)."""
    args = [X["logps"], X["old_logps"], X["ref_logps"], X[adv], ref.MASK]
    expected, metrics = trl_grpo_loss(trl, *args, beta=beta, loss_type=loss_type, eps=0.05, eps_high=0.02, max_len=7,
                                      importance_sampling_level="sequence")
    kwargs = dict(beta=beta, clip_eps=0.05, clip_eps_high=0.02, loss_type=loss_type,
                  importance_sampling_level="sequence")
    loss_sum, count, ours = _ours(losses.grpo_policy_loss, *args, **kwargs)
    np.testing.assert_allclose(loss_sum / count, expected, rtol=RTOL, atol=ATOL)
    if beta:
        np.testing.assert_allclose(ours["kl"], metrics["kl"], rtol=RTOL, atol=ATOL)
    for k, v in _trl_flags(ours, args, CLIP_FLAGS, **kwargs).items():
        np.testing.assert_allclose(v, metrics[k], rtol=RTOL, atol=ATOL, err_msg=k)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    if adv == "seq_advantages":  # one sequence of six each
        np.testing.assert_allclose([metrics["clip_ratio/low_mean"], metrics["clip_ratio/high_mean"]], [1 / 6] * 2)
    token_level, _ = trl_grpo_loss(trl, *args, beta=beta, loss_type=loss_type, eps=0.05, eps_high=0.02, max_len=7)
    assert abs(token_level - expected) > 1e-3 * abs(expected)


@pytest.mark.parametrize("level, cap", [("token", 1.2), ("sequence", 1.02)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("adv", ["seq_advantages", "advantages"])
def test_cispo_matches_trl(trl, adv, beta, level, cap):
    """CISPO: TRL loss_type="cispo" with epsilon_high = w_max is our policy_loss="cispo" with loss_type="dapo"."""
    args = [X["logps"], X["old_logps"], X["ref_logps"], X[adv], ref.MASK]
    expected, metrics = trl_grpo_loss(trl, *args, beta=beta, loss_type="cispo", eps=0.2, eps_high=cap, max_len=7,
                                      importance_sampling_level=level)
    kwargs = dict(beta=beta, policy_loss="cispo", cispo_max_weight=cap, loss_type="dapo",
                  importance_sampling_level=level)
    loss_sum, count, ours = _ours(losses.grpo_policy_loss, *args, **kwargs)
    np.testing.assert_allclose(loss_sum / count, expected, rtol=RTOL, atol=ATOL)
    if beta:
        np.testing.assert_allclose(ours["kl"], metrics["kl"], rtol=RTOL, atol=ATOL)
    flags = _trl_flags(ours, args, ["cispo_clip_ratio"], **kwargs)
    np.testing.assert_allclose(flags["cispo_clip_ratio"], metrics["cispo_clip_ratio"], rtol=RTOL, atol=ATOL)
    assert metrics["cispo_clip_ratio"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("delta, eps_high", [(1.3, 0.28), (1.1, 0.2)])
def test_two_sided_delta_matches_trl(trl, delta, eps_high, loss_type):
    """TRL's args.delta. Per-token advantages so that δ binds on tokens with w > δ and A < 0. TRL computes its clip
    flags from the δ-clamped ratio, so they match ours (from the raw ratio) only for δ > 1 + ε_high."""
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["advantages"], ref.MASK]
    expected, metrics = trl_grpo_loss(trl, *args, beta=0.04, loss_type=loss_type, eps=0.2, eps_high=eps_high,
                                      max_len=10, delta=delta)
    loss_sum, count, ours = _ours(losses.grpo_policy_loss, *args, beta=0.04, clip_eps_high=eps_high, delta=delta,
                                  loss_type=loss_type, max_completion_length=10)
    np.testing.assert_allclose(loss_sum / count, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours["kl"], metrics["kl"], rtol=RTOL, atol=ATOL)
    if delta > 1 + eps_high:
        for k in CLIP_FLAGS:
            np.testing.assert_allclose(ours[k], metrics[k], rtol=RTOL, atol=ATOL, err_msg=k)
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    without, _ = trl_grpo_loss(trl, *args, beta=0.04, loss_type=loss_type, eps=0.2, eps_high=eps_high, max_len=10)
    assert abs(without - expected) > 1e-4 * abs(expected)


@pytest.mark.parametrize("weights", ["is_weights", "is_seq_weights"])
@pytest.mark.parametrize("form, loss_type, level", [("clip", "dapo", "token"), ("clip", "grpo", "sequence"),
                                                    ("cispo", "cispo", "token")])
def test_is_weights_match_trl_vllm_correction(trl, form, loss_type, level, weights):
    """TRL multiplies the per-token policy loss (before adding β·KL) by inputs["importance_sampling_ratio"] when
    use_vllm and vllm_importance_sampling_correction are set; ours is `is_weights`, `[B, T]` or `[B, 1]`."""
    args = [X["logps"], X["old_logps"], X["ref_logps"], X["seq_advantages"], ref.MASK]
    eps_high = 1.2 if form == "cispo" else 0.28
    expected, metrics = trl_grpo_loss(trl, *args, beta=0.04, loss_type=loss_type, eps=0.2, eps_high=eps_high,
                                      max_len=7, importance_sampling_level=level, is_weights=gref.EXTRA[weights])
    loss_sum, count, ours = _ours_with_weights(losses.grpo_policy_loss, *args, gref.EXTRA[weights], beta=0.04,
                                               clip_eps_high=eps_high, cispo_max_weight=eps_high, policy_loss=form,
                                               loss_type="dapo" if form == "cispo" else loss_type,
                                               importance_sampling_level=level)
    np.testing.assert_allclose(loss_sum / count, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours["kl"], metrics["kl"], rtol=RTOL, atol=ATOL)
    unweighted, _ = trl_grpo_loss(trl, *args, beta=0.04, loss_type=loss_type, eps=0.2, eps_high=eps_high, max_len=7,
                                  importance_sampling_level=level)
    assert abs(unweighted - expected) > 1e-3 * abs(expected)


def _ours_with_weights(fn, *args, **kwargs):
    """`_ours` with the last positional argument passed as `is_weights`."""
    return _ours(lambda *a: fn(*a[:-1], is_weights=a[-1], **kwargs), *args)


def trl_sampler_correction(trl, old_logps, sampler_logps, mask, *, mode, clip_min, clip_max):
    """(vllm_importance_sampling_ratio, logged sampling metrics) from the two blocks of TRL's
    `_generate_and_score_completions` that compute and log them."""
    method = trl.grpo.GRPOTrainer._generate_and_score_completions
    stand_in = types.SimpleNamespace(
        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max, accelerator=types.SimpleNamespace(gather=_identity),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
    completion_mask = _t(trl, mask, trl.torch.long)
    namespace = {"self": stand_in, "math": math, "old_per_token_logps": _t(trl, old_logps),
                 "sampling_per_token_logps": _t(trl, sampler_logps), "mask": completion_mask}
    namespace = _run_block(trl, method, "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps)",
                           'f"Unknown vLLM importance sampling level', namespace, result=None)
    namespace.update(completion_mask=completion_mask, tool_mask=None, mode="train", device="cpu",
                     nanmin=trl.grpo.nanmin, nanmax=trl.grpo.nanmax)
    namespace = _run_block(trl, method, "delta = torch.abs(old_per_token_logps - sampling_per_token_logps)",
                           '"sampling/importance_sampling_ratio/max"', namespace, result=None)
    return (namespace["vllm_importance_sampling_ratio"].numpy(),
            {k: v[-1] for k, v in stand_in._metrics["train"].items()})


SAMPLER_METRICS = {"sampler/logp_gap_mean": "sampling/sampling_logp_difference/mean",
                   "sampler/logp_gap_max": "sampling/sampling_logp_difference/max",
                   "sampler/is_weight_min": "sampling/importance_sampling_ratio/min",
                   "sampler/is_weight_mean": "sampling/importance_sampling_ratio/mean",
                   "sampler/is_weight_max": "sampling/importance_sampling_ratio/max"}


@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (None, 1.5), (0.8, 1.5)])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_correction_matches_trl(trl, mode, clip_min, clip_max):
    """Our `sampler_correction` weights and metrics are TRL's vllm_importance_sampling_ratio (clip_min None in TRL is
    0.0 here: the weights are ≥ 0 anyway), and multiplying the loss by them is TRL's correction."""
    old, sampler = X["old_logps"], gref.EXTRA["sampler_logps"]
    expected, metrics = trl_sampler_correction(trl, old, sampler, ref.MASK, mode=mode, clip_min=clip_min,
                                               clip_max=clip_max)
    weights, ours = _ours(losses.sampler_correction, old, sampler, ref.MASK, mode=mode,
                          clip_min=0.0 if clip_min is None else clip_min, clip_max=clip_max)
    assert weights.shape == expected.shape
    np.testing.assert_allclose(weights, expected, rtol=RTOL, atol=ATOL)
    assert set(ours) == set(SAMPLER_METRICS)
    for k, trl_key in SAMPLER_METRICS.items():
        np.testing.assert_allclose(ours[k], metrics[trl_key], rtol=RTOL, atol=ATOL, err_msg=k)
    raw, _ = trl_sampler_correction(trl, old, sampler, ref.MASK, mode=mode, clip_min=None, clip_max=math.inf)
    if clip_max < 3:
        assert (raw != expected).any()  # the bounds bind
    args = [X["logps"], old, X["ref_logps"], X["seq_advantages"], ref.MASK]
    loss, _ = trl_grpo_loss(trl, *args, beta=0.04, loss_type="dapo", eps=0.2, eps_high=0.2, max_len=7,
                            is_weights=expected)
    loss_sum, count, _ = _ours_with_weights(losses.grpo_policy_loss, *args, weights, beta=0.04)
    np.testing.assert_allclose(loss_sum / count, loss, rtol=RTOL, atol=ATOL)


GRADIENT_CASES = {  # TRL's keyword arguments, ours, the advantages and sampler weights (None or an EXTRA key)
    "gspo": (dict(loss_type="grpo", eps=0.05, eps_high=0.02, importance_sampling_level="sequence"),
             dict(loss_type="grpo", clip_eps=0.05, clip_eps_high=0.02, importance_sampling_level="sequence"),
             "seq_advantages", None),
    "gspo_token_advantages": (dict(loss_type="dapo", eps=0.05, eps_high=0.02, importance_sampling_level="sequence"),
                              dict(loss_type="dapo", clip_eps=0.05, clip_eps_high=0.02,
                                   importance_sampling_level="sequence"), "advantages", "is_weights"),
    "cispo": (dict(loss_type="cispo", eps=0.2, eps_high=1.2),
              dict(loss_type="dapo", policy_loss="cispo", cispo_max_weight=1.2), "seq_advantages", "is_weights"),
    "cispo_sequence": (dict(loss_type="cispo", eps=0.2, eps_high=1.02, importance_sampling_level="sequence"),
                       dict(loss_type="dapo", policy_loss="cispo", cispo_max_weight=1.02,
                            importance_sampling_level="sequence"), "advantages", "is_seq_weights"),
    "delta": (dict(loss_type="bnpo", eps=0.2, eps_high=0.28, delta=1.3),
              dict(loss_type="bnpo", clip_eps_high=0.28, delta=1.3), "advantages", None),
}


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_gradients_match_trl(trl, name):
    """∂loss/∂logπ from torch autograd through TRL's `_compute_loss` equals ours (jax.grad of loss_sum / count): the
    stop-gradients (CISPO's weight, the sampler weights, old log-probs) and GSPO's sequence weight sit where TRL's
    `.detach()`s and its sequence mean do."""
    trl_kw, our_kw, adv, weights = GRADIENT_CASES[name]
    args = [X["logps"], X["old_logps"], X["ref_logps"], X[adv], ref.MASK]
    is_weights = None if weights is None else gref.EXTRA[weights]
    _, _, expected = trl_grpo_loss(trl, *args, beta=0.04, max_len=7, is_weights=is_weights, grad=True, **trl_kw)
    with jax.enable_x64(True):
        fixed = [jnp.asarray(a) for a in args[1:4]]
        c = None if is_weights is None else jnp.asarray(is_weights)

        def loss(logps):
            loss_sum, count, _ = losses.grpo_policy_loss(logps, *fixed, ref.MASK, beta=0.04, is_weights=c, **our_kw)
            return loss_sum / count

        ours = np.asarray(jax.grad(loss)(jnp.asarray(X["logps"])))
    np.testing.assert_allclose(ours, np.where(ref.MASK, expected, 0), rtol=RTOL, atol=ATOL)
    assert (expected[~ref.MASK] == 0).all() and (expected[ref.MASK] != 0).any()


def test_overlong_penalty_matches_trl(trl):
    """DAPO's soft overlong punishment (Eq. 13): TRL's `get_soft_overlong_punishment` reward function."""
    from trl.rewards import get_soft_overlong_punishment

    lengths = np.arange(0, 26)
    expected = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=6)([[1] * n for n in lengths])
    ours = np.asarray(losses.overlong_penalty(jnp.asarray(lengths), max_length=20, buffer=6))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
    assert (ours < 0).sum() == 11

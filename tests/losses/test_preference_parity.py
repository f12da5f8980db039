"""flaxalign's preference losses against TRL 1.16 itself, in float64.

TRL keeps the loss math inside trainer methods (`DPOTrainer._compute_loss`, `KTOTrainer._compute_loss`,
`RewardTrainer.compute_loss`, `ORPOTrainer`/`CPOTrainer.get_batch_loss_metrics`). Each is called unbound with a
stand-in `self` holding the attributes it reads and a stand-in model whose per-token log-probs sum to the given
per-sequence values, so TRL's own code computes the loss and its logged metrics from the same numbers.

`python -m tests.losses.test_preference_parity` prints the TRL values recorded in `test_preference.py`.
"""

import collections
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import losses
from tests.losses import preference_reference as ref

pytestmark = pytest.mark.parity

torch = CPOTrainer = ORPOTrainer = DPOTrainer = KTOTrainer = RewardTrainer = None  # set by _load_trl


def _load_trl():
    """Imported on first use, not at collection, so a run without the parity extra collects this module with no
    skip (`importorskip` skips only the tests that run)."""
    global torch, CPOTrainer, ORPOTrainer, DPOTrainer, KTOTrainer, RewardTrainer
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.reward_trainer import RewardTrainer


@pytest.fixture(scope="module", autouse=True)
def _trl():
    _load_trl()


RTOL = 1e-6  # float64 on both sides
ORPO_RTOL = 1e-6  # TRL's odds_ratio_loss casts the log-probs to float32 (observed: ~1e-7)


@pytest.fixture(autouse=True)
def torch_float64():
    """TRL builds some constants with `torch.tensor(float)` (e.g. exo_pair's ε): make those float64 too."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _t(values, dtype=None):
    return torch.tensor(values, dtype=dtype or torch.float64)


def _trainer(**attrs):
    """A stand-in trainer: identity gathers on CPU, empty metric stores, training mode, plus `attrs`."""
    identity = lambda t: t
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity)
    metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerator,
                                 aux_loss_enabled=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1, **attrs)


def _lm_outputs(seq_logps, width):
    """What a fused-LM-head forward returns: per-token log-probs `[N, width]` whose rows sum to `seq_logps`."""
    n = len(seq_logps)
    log_probs = torch.zeros(n, width, dtype=torch.float64)
    log_probs[:, 0] = _t(seq_logps)
    zeros = torch.zeros(n, width, dtype=torch.float64)
    return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                 is_top1=torch.zeros(n, width, dtype=torch.bool))


def _completion_mask(lengths, width):
    """`[N, width]`: position 0 is the prompt, then `length` completion tokens."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 1:1 + n] = 1
    return mask


def trl_dpo(pc, pr, rc, rr, len_c, len_r, *, beta, loss_type, eps=0.0, tau=0.05):
    """(loss, metrics) from `DPOTrainer._compute_loss` for summed log-probs and completion lengths."""
    width = max(len_c + len_r) + 1
    trainer = _trainer(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                       loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps,
                       use_weighting=False, args=types.SimpleNamespace(discopop_tau=tau))
    outputs = _lm_outputs(list(pc) + list(pr), width - 1)
    mask = _completion_mask(list(len_c) + list(len_r), width)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": _t(rc), "ref_rejected_logps": _t(rr)}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_kto(logps, ref_logps, desirable, kl_logps, ref_kl_logps, *, beta, w_d=1.0, w_u=1.0):
    """(loss, metrics) from `KTOTrainer._compute_loss` (precomputed reference and KL reference log-probs). The KL
    batch may be larger than the labelled one: TRL only averages it."""
    width, kl_width = 4, 6  # different widths tell the stand-in model which forward it is
    trainer = _trainer(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                       desirable_weight=w_d, undesirable_weight=w_u)
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    by_width = {width: _lm_outputs(logps, width - 1), kl_width: _lm_outputs(kl_logps, kl_width - 1)}
    mask, kl_mask = _completion_mask([2] * len(logps), width), _completion_mask([3] * len(kl_logps), kl_width)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": torch.zeros_like(kl_mask), "KL_attention_mask": torch.ones_like(kl_mask),
              "KL_completion_mask": kl_mask, "label": torch.tensor(desirable, dtype=torch.bool),
              "ref_logps": _t(ref_logps), "ref_KL_logps": _t(ref_kl_logps)}
    loss = KTOTrainer._compute_loss(trainer, lambda input_ids, **kw: by_width[input_ids.shape[1]], inputs, False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_reward(r_chosen, r_rejected, *, margin=None, center=None):
    """(loss, metrics) from `RewardTrainer.compute_loss` with a model that outputs the given rewards."""
    trainer = _trainer(args=types.SimpleNamespace(center_rewards_coefficient=center))
    logits = _t(list(r_chosen) + list(r_rejected))[:, None]
    inputs = {"attention_mask": torch.ones(len(logits), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = _t(margin)
    loss = RewardTrainer.compute_loss(trainer, lambda **kw: types.SimpleNamespace(logits=logits), inputs)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _forward(chosen, rejected, nll):
    """A stand-in `concatenated_forward`: (chosen logps, rejected logps, chosen logits, rejected logits, NLL)."""
    logits = torch.zeros(len(chosen), 2, 3, dtype=torch.float64)
    return lambda model, batch: (_t(chosen), _t(rejected), logits, logits, torch.tensor(nll, dtype=torch.float64))


def trl_orpo(chosen, rejected, nll, *, beta):
    """(loss, metrics) from `ORPOTrainer.get_batch_loss_metrics` with a scalar chosen NLL."""
    trainer = _trainer(beta=beta, concatenated_forward=_forward(chosen, rejected, nll))
    trainer.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trainer, c, r)
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, None, None)
    return loss.item(), metrics


def trl_cpo(chosen, rejected, nll, *, beta, loss_type, eps=0.0, cpo_alpha=1.0, gamma=0.5):
    """(loss, metrics) from `CPOTrainer.get_batch_loss_metrics` (also SimPO: loss_type="simpo", cpo_alpha=0)."""
    trainer = _trainer(beta=beta, loss_type=loss_type, label_smoothing=eps, cpo_alpha=cpo_alpha, simpo_gamma=gamma,
                       alpha=0.0, concatenated_forward=_forward(chosen, rejected, nll))
    trainer.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(trainer, c, r)
    loss, metrics = CPOTrainer.get_batch_loss_metrics(trainer, None, None)
    return loss.item(), metrics


def _f64(fn, *args, **kwargs):
    """Runs a flaxalign loss in float64 and returns (mean loss, per-pair losses, metrics) as NumPy."""
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) if not isinstance(a[0], bool) else jnp.asarray(a) for a in args]
        kwargs = {k: jnp.asarray(v, jnp.float64) if isinstance(v, list) else v for k, v in kwargs.items()}
        per_pair, metrics = fn(*args, **kwargs)
        return float(per_pair.mean()), np.asarray(per_pair), {k: np.asarray(v) for k, v in metrics.items()}


def _ours_dpo(loss_type, beta, eps, **inputs):
    inputs = {**ref.DPO_INPUTS, **ref.DPO_LENGTHS, **inputs}
    args = [inputs.pop(k) for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
    return _f64(losses.dpo_loss, *args, beta=beta, loss_type=loss_type, label_smoothing=eps, **inputs)


def _assert_metric_means(ours, theirs, names, rtol=RTOL):
    for ours_name, trl_name in names.items():
        np.testing.assert_allclose(ours[ours_name].mean(), theirs[trl_name], rtol=rtol, atol=1e-12,
                                   err_msg=ours_name)


DPO_METRICS = {k: k for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")}


@pytest.mark.parametrize("loss_type,beta,eps", ref.DPO_CASES)
def test_dpo_matches_trl(loss_type, beta, eps):
    i = ref.DPO_INPUTS
    trl_loss, trl_metrics = trl_dpo(i["chosen_logps"], i["rejected_logps"], i["ref_chosen_logps"],
                                    i["ref_rejected_logps"], ref.DPO_LENGTHS["chosen_lengths"],
                                    ref.DPO_LENGTHS["rejected_lengths"], beta=beta, loss_type=loss_type, eps=eps)
    mean, per_pair, metrics = _ours_dpo(loss_type, beta, eps)
    np.testing.assert_allclose(mean, trl_loss, rtol=RTOL)
    _assert_metric_means(metrics, trl_metrics, DPO_METRICS)
    if loss_type.startswith("aot"):
        return  # sorted over the batch: only the batch mean is defined per pair
    for k in range(len(per_pair)):  # one pair at a time, TRL's mean is the per-pair loss
        one = {name: [values[k]] for name, values in {**i, **ref.DPO_LENGTHS}.items()}
        pair_loss, _ = trl_dpo(one["chosen_logps"], one["rejected_logps"], one["ref_chosen_logps"],
                               one["ref_rejected_logps"], one["chosen_lengths"], one["rejected_lengths"], beta=beta,
                               loss_type=loss_type, eps=eps)
        np.testing.assert_allclose(per_pair[k], pair_loss, rtol=RTOL)


def test_trl1_sigmoid_ignores_label_smoothing():
    """TRL 1.x's `sigmoid` is plain DPO whatever ε is; flaxalign's `sigmoid` with ε = 0 is that loss (ε > 0 is
    cDPO, TRL ≤ 0.29's behaviour, checked against the formula in the default suite)."""
    i, n = ref.DPO_INPUTS, ref.DPO_LENGTHS
    trl_loss, _ = trl_dpo(*i.values(), n["chosen_lengths"], n["rejected_lengths"], beta=0.1, loss_type="sigmoid",
                          eps=0.2)
    np.testing.assert_allclose(_ours_dpo("sigmoid", 0.1, 0.0)[0], trl_loss, rtol=RTOL)
    assert abs(_ours_dpo("sigmoid", 0.1, 0.2)[0] - trl_loss) > 1e-3


def test_orpo_matches_trl():
    c, r, nll = ref.AVG_INPUTS["chosen"], ref.AVG_INPUTS["rejected"], 0.75
    trl_loss, trl_metrics = trl_orpo(c, r, nll, beta=0.1)
    mean, _, metrics = _f64(losses.orpo_loss, c, r, beta=0.1, chosen_nll=[nll] * len(c))
    np.testing.assert_allclose(mean, trl_loss, rtol=ORPO_RTOL)
    _assert_metric_means(metrics, trl_metrics, {**DPO_METRICS, "log_odds_ratio": "log_odds_ratio",
                                                "log_odds_chosen": "log_odds_chosen", "nll_loss": "nll_loss"},
                         rtol=ORPO_RTOL)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_trl(beta, gamma, eps):
    c, r = ref.AVG_INPUTS["chosen"], ref.AVG_INPUTS["rejected"]
    trl_loss, trl_metrics = trl_cpo(c, r, 0.0, beta=beta, loss_type="simpo", eps=eps, cpo_alpha=0.0, gamma=gamma)
    mean, _, metrics = _f64(losses.simpo_loss, c, r, beta=beta, gamma=gamma, label_smoothing=eps)
    np.testing.assert_allclose(mean, trl_loss, rtol=RTOL)
    _assert_metric_means(metrics, trl_metrics, DPO_METRICS)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_cpo_matches_trl(loss_type, eps):
    # TRL feeds summed log-probs to sigmoid/hinge and per-token averages to ipo
    i = ref.DPO_INPUTS if loss_type != "ipo" else {"chosen_logps": ref.AVG_INPUTS["chosen"],
                                                   "rejected_logps": ref.AVG_INPUTS["rejected"]}
    c, r, nll = i["chosen_logps"], i["rejected_logps"], 1.25
    trl_loss, trl_metrics = trl_cpo(c, r, nll, beta=0.1, loss_type=loss_type, eps=eps, cpo_alpha=0.5)
    mean, _, metrics = _f64(losses.cpo_loss, c, r, beta=0.1, loss_type=loss_type, label_smoothing=eps,
                            cpo_alpha=0.5, chosen_nll=[nll] * len(c))
    np.testing.assert_allclose(mean, trl_loss, rtol=RTOL)
    _assert_metric_means(metrics, trl_metrics, {**DPO_METRICS, "nll_loss": "nll_loss"})


@pytest.mark.parametrize("kl_shift,w_d,w_u,beta", [(0.0, 1.0, 1.0, 0.1), (0.0, 1.5, 0.75, 0.5),
                                                   (-2.0, 1.0, 1.0, 0.5)])
def test_kto_matches_trl(kl_shift, w_d, w_u, beta):
    """kl_shift = −2 makes the mismatched-pair KL estimate negative, so z₀ is clamped to 0."""
    i = dict(ref.KTO_INPUTS)
    i["kl_logps"] = [v + kl_shift for v in i["kl_logps"]]
    trl_loss, trl_metrics = trl_kto(*i.values(), beta=beta, w_d=w_d, w_u=w_u)
    mean, per_example, metrics = _f64(losses.kto_loss, *i.values(), beta=beta, desirable_weight=w_d,
                                      undesirable_weight=w_u)
    np.testing.assert_allclose(mean, trl_loss, rtol=RTOL)
    np.testing.assert_allclose(metrics["kl"], trl_metrics["kl"], rtol=RTOL, atol=1e-12)
    desirable = metrics["desirable"]
    chosen = (metrics["rewards"] * desirable).sum() / desirable.sum()
    rejected = (metrics["rewards"] * (1 - desirable)).sum() / (1 - desirable).sum()
    np.testing.assert_allclose([chosen, rejected, chosen - rejected],
                               [trl_metrics[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")],
                               rtol=RTOL)
    for k in range(len(per_example)):  # one labelled example at a time, the KL term still over the whole batch
        one = [[i[name][k]] for name in ("logps", "ref_logps", "desirable")]
        example_loss, _ = trl_kto(*one, i["kl_logps"], i["ref_kl_logps"], beta=beta, w_d=w_d, w_u=w_u)
        np.testing.assert_allclose(per_example[k], example_loss, rtol=RTOL)


@pytest.mark.parametrize("use_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_reward_matches_trl(use_margin, center):
    i = ref.REWARD_INPUTS
    margin = i["margin"] if use_margin else None
    trl_loss, trl_metrics = trl_reward(i["chosen"], i["rejected"], margin=margin, center=center)
    mean, _, metrics = _f64(losses.bradley_terry_loss, i["chosen"], i["rejected"], margin=margin,
                            center_coef=center or 0.0)
    np.testing.assert_allclose(mean, trl_loss, rtol=RTOL)
    _assert_metric_means(metrics, trl_metrics, {"accuracy": "accuracy", "margin": "margin"})


def recorded_values():
    """The TRL losses that `test_preference.py` hard-codes (rerun after a TRL upgrade; see the module docstring)."""
    i, n = ref.DPO_INPUTS, ref.DPO_LENGTHS
    values = {("dpo",) + case: trl_dpo(*i.values(), n["chosen_lengths"], n["rejected_lengths"], beta=case[1],
                                       loss_type=case[0], eps=case[2])[0] for case in ref.DPO_CASES}
    c, r = ref.AVG_INPUTS["chosen"], ref.AVG_INPUTS["rejected"]
    values["orpo"] = trl_orpo(c, r, 0.75, beta=0.1)[0]
    values["simpo"] = trl_cpo(c, r, 0.0, beta=2.0, loss_type="simpo", cpo_alpha=0.0)[0]
    values["cpo"] = trl_cpo(i["chosen_logps"], i["rejected_logps"], 1.25, beta=0.1, loss_type="sigmoid",
                            cpo_alpha=0.5)[0]
    values["kto"] = trl_kto(*ref.KTO_INPUTS.values(), beta=0.5, w_d=1.5, w_u=0.75)[0]
    rw = ref.REWARD_INPUTS
    values["reward"] = trl_reward(rw["chosen"], rw["rejected"], margin=rw["margin"], center=0.01)[0]
    return values


if __name__ == "__main__":
    _load_trl()
    torch.set_default_dtype(torch.float64)
    for key, value in recorded_values().items():
        print(f"    {key!r}: {value!r},")

"""Preference losses: the DPO family, ORPO, SimPO, CPO, KTO and the Bradley–Terry reward-model loss.

Every function takes per-sequence quantities (completion log-probabilities summed or averaged over tokens, or scalar
rewards), each `[B]`, and returns `(losses [B], metrics)`: one loss per pair (per example for KTO) and a dict of `[B]`
metric arrays (gradients stopped). The caller averages (`losses.mean()` is the TRL loss), so these functions stay
pure, jit-able and dtype-preserving (float32 or float64). Hyper-parameters are Python numbers; they are validated
when concrete.

Semantics follow TRL 1.16 (`DPOTrainer._compute_loss`, `RewardTrainer.compute_loss`, `KTOTrainer._compute_loss`,
`trl.experimental.orpo` / `.cpo`); where TRL 1.x differs from TRL 0.x the docstring says which one is followed.
Notation: h_w = log π(y_w|x) − log π_ref(y_w|x), h_l likewise for the rejected completion, Δ = h_w − h_l, σ the
logistic function, ε the label smoothing, |y| a completion's token count.

The DPO family is a registry (`DPO_LOSSES`, `flaxalign.registry`): a new loss is its function, one `register` line
naming its own hyper-parameters and their defaults (`PairLoss.hyper`), and its test. `configs/dpo.py`'s `loss` block
gets one field per hyper-parameter from `DPO_HYPER_DEFAULTS`, and the DPO stage passes them through unread.
"""

import numbers
import types
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxalign.errors import ConfigError
from flaxalign.registry import Registry

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
_LN2 = 0.6931471805599453


class PreferenceLossError(ConfigError, ValueError):
    """A preference-loss hyper-parameter is invalid (a `ValueError`, and a `ConfigError` for `flaxalign.main`)."""


def _require(ok: bool, message: str):
    if not ok:
        raise PreferenceLossError(message)


def _known(x) -> bool:
    """True for concrete Python/NumPy numbers (checked); traced or array hyper-parameters are not validated."""
    return isinstance(x, numbers.Real)


def _check_beta(beta):
    _require(not _known(beta) or beta > 0, f"beta must be > 0, got {beta}.")


def _smoothed_logistic(x, eps):
    """−(1−ε)·log σ(x) − ε·log σ(−x): the logistic loss with labels flipped with probability ε (cDPO)."""
    return -(1 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def _rewards(chosen, rejected):
    """The metrics every pairwise loss reports: implicit rewards, their margin and the pairwise accuracy."""
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).astype(chosen.dtype)}


# ----------------------------------------------------------------------------------------------------------------
# DPO family (TRL 1.16 `DPOTrainer._compute_loss`, reverse-KL f-divergence)
# ----------------------------------------------------------------------------------------------------------------


class _Pair(NamedTuple):
    chosen: jax.Array  # h_w
    rejected: jax.Array  # h_l
    policy_margin: jax.Array  # log π(y_w|x) − log π(y_l|x)
    ref_margin: jax.Array  # log π_ref(y_w|x) − log π_ref(y_l|x)
    chosen_len: jax.Array | None  # max(|y_w|, 1)
    rejected_len: jax.Array | None


class PairLoss(NamedTuple):
    """A DPO-family entry: `loss(pair, h) -> [B]`, where `h` holds β (`h.beta`) and the entry's own hyper-parameters
    (`hyper`: name → default; the `loss` config block gets one field per name), validated by `check(h)`."""
    loss: Callable
    hyper: dict = {}
    needs_lengths: bool = False
    check: Callable | None = None


DPO_LOSSES = Registry("DPO loss_type", PreferenceLossError)


def _smoothing(h):
    _require(not _known(h.label_smoothing) or 0 <= h.label_smoothing <= 1,
             f"label_smoothing must be in [0, 1], got {h.label_smoothing}.")


def _robust_smoothing(h):
    _smoothing(h)
    _require(not _known(h.label_smoothing) or h.label_smoothing < 0.5,
             f"loss_type 'robust' needs label_smoothing < 0.5, got {h.label_smoothing}.")


def _exo_smoothing(h):
    _require(not _known(h.label_smoothing) or 0 < h.label_smoothing < 1,
             f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (EXO recommends 1e-3), got {h.label_smoothing}.")


SMOOTHED = {"label_smoothing": 0.0}


def _dpo_sigmoid(p, h):
    """DPO (Rafailov et al. 2023), cDPO for ε > 0: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)."""
    return _smoothed_logistic(h.beta * (p.chosen - p.rejected), h.label_smoothing)


def _dpo_robust(p, h):
    """rDPO (Chowdhury et al. 2024): (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)."""
    x, eps = h.beta * (p.chosen - p.rejected), h.label_smoothing
    return (-(1 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1 - 2 * eps)


def _dpo_hinge(p, h):
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − βΔ)."""
    return jax.nn.relu(1 - h.beta * (p.chosen - p.rejected))


def _dpo_ipo(p, h):
    """IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios: (h_w/|y_w| − h_l/|y_l| − 1/(2β))²."""
    return (p.chosen / p.chosen_len - p.rejected / p.rejected_len - 1 / (2 * h.beta)) ** 2


def _dpo_sigmoid_norm(p, h):
    """Length-normalised DPO: −log σ(β·(h_w/|y_w| − h_l/|y_l|))."""
    return -jax.nn.log_sigmoid(h.beta * (p.chosen / p.chosen_len - p.rejected / p.rejected_len))


def _dpo_exo_pair(p, h):
    """EXO-pref (Ji et al. 2024, Eq. 16), KL(p_θ ‖ [1−ε, ε]) with p_θ = [σ(βΔ), σ(−βΔ)]:
    σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)."""
    x, eps = h.beta * (p.chosen - p.rejected), h.label_smoothing
    return (jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-x) * (jax.nn.log_sigmoid(-x) - jnp.log(eps)))


def _dpo_nca_pair(p, h):
    """NCA (Chen et al. 2024): −log σ(βh_w) − ½·log σ(−βh_w) − ½·log σ(−βh_l)."""
    return (-jax.nn.log_sigmoid(h.beta * p.chosen) - 0.5 * jax.nn.log_sigmoid(-h.beta * p.chosen)
            - 0.5 * jax.nn.log_sigmoid(-h.beta * p.rejected))


def _dpo_bco_pair(p, h):
    """Paired BCO (Jung et al. 2024) as in TRL 1.x, without the running reward shift δ: −log σ(βh_w) − log σ(−βh_l)."""
    return -jax.nn.log_sigmoid(h.beta * p.chosen) - jax.nn.log_sigmoid(-h.beta * p.rejected)


def _dpo_sppo_hard(p, h):
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7): (h_w − 1/(2β))² + (h_l + 1/(2β))²."""
    return (p.chosen - 0.5 / h.beta) ** 2 + (p.rejected + 0.5 / h.beta) ** 2


def _dpo_aot(p, h):
    """AOT paired (Melnyk et al. 2024): d = sort_B(log π_w − log π_l) − sort_B(log π_ref,w − log π_ref,l);
    −(1−ε)·log σ(βd) − ε·log σ(−βd). Sorting over the batch makes each entry depend on the whole batch."""
    return _smoothed_logistic(h.beta * (jnp.sort(p.policy_margin) - jnp.sort(p.ref_margin)), h.label_smoothing)


def _dpo_aot_unpaired(p, h):
    """AOT unpaired: d = sort_B(h_w) − sort_B(h_l); −(1−ε)·log σ(βd) − ε·log σ(−βd) (batch-dependent, as `aot`)."""
    return _smoothed_logistic(h.beta * (jnp.sort(p.chosen) - jnp.sort(p.rejected)), h.label_smoothing)


def _dpo_apo_zero(p, h):
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 − σ(βh_w) + σ(βh_l)."""
    return 1 - jax.nn.sigmoid(h.beta * p.chosen) + jax.nn.sigmoid(h.beta * p.rejected)


def _dpo_apo_down(p, h):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(βh_w) + 1 − σ(βΔ)."""
    return jax.nn.sigmoid(h.beta * p.chosen) + 1 - jax.nn.sigmoid(h.beta * (p.chosen - p.rejected))


def _dpo_discopop(p, h):
    """DiscoPOP / LRML (Chan et al. 2024, Eq. 5), x = βΔ, w = σ(x/τ): (1 − w)·(−log σ(x)) + w·exp(−x)."""
    x = h.beta * (p.chosen - p.rejected)
    w = jax.nn.sigmoid(x / h.discopop_tau)
    return (1 - w) * -jax.nn.log_sigmoid(x) + w * jnp.exp(-x)


def _positive_tau(h):
    _require(not _known(h.discopop_tau) or h.discopop_tau > 0, f"discopop_tau must be > 0, got {h.discopop_tau}.")


DPO_LOSSES.register("sigmoid", PairLoss(_dpo_sigmoid, SMOOTHED, check=_smoothing))
DPO_LOSSES.register("robust", PairLoss(_dpo_robust, SMOOTHED, check=_robust_smoothing))
DPO_LOSSES.register("hinge", PairLoss(_dpo_hinge))
DPO_LOSSES.register("ipo", PairLoss(_dpo_ipo, needs_lengths=True))
DPO_LOSSES.register("sigmoid_norm", PairLoss(_dpo_sigmoid_norm, needs_lengths=True))
DPO_LOSSES.register("exo_pair", PairLoss(_dpo_exo_pair, SMOOTHED, check=_exo_smoothing))
DPO_LOSSES.register("nca_pair", PairLoss(_dpo_nca_pair))
DPO_LOSSES.register("bco_pair", PairLoss(_dpo_bco_pair))
DPO_LOSSES.register("sppo_hard", PairLoss(_dpo_sppo_hard))
DPO_LOSSES.register("aot", PairLoss(_dpo_aot, SMOOTHED, check=_smoothing))
DPO_LOSSES.register("aot_unpaired", PairLoss(_dpo_aot_unpaired, SMOOTHED, check=_smoothing))
DPO_LOSSES.register("apo_zero", PairLoss(_dpo_apo_zero))
DPO_LOSSES.register("apo_down", PairLoss(_dpo_apo_down))
DPO_LOSSES.register("discopop", PairLoss(_dpo_discopop, {"discopop_tau": 0.05}, check=_positive_tau))
DPO_LOSS_TYPES = DPO_LOSSES.names
# every DPO-family hyper-parameter and its default (the first entry's, where two share a name)
DPO_HYPER_DEFAULTS = {}
for _, _entry in DPO_LOSSES.items():
    for _name, _default in _entry.hyper.items():
        DPO_HYPER_DEFAULTS.setdefault(_name, _default)


def dpo_hyper(loss_type: str, beta, **hyper) -> types.SimpleNamespace:
    """`loss_type`'s hyper-parameters: β, then its own (`PairLoss.hyper`) from `hyper` or their defaults, validated.
    Names that belong to another DPO-family loss are accepted and ignored; any other name is refused."""
    entry = DPO_LOSSES[loss_type]
    unknown = sorted(set(hyper) - set(DPO_HYPER_DEFAULTS))
    _require(not unknown, f"Unknown DPO hyper-parameter {', '.join(unknown)}; known: {', '.join(DPO_HYPER_DEFAULTS)}.")
    _check_beta(beta)
    h = types.SimpleNamespace(beta=beta, **{name: hyper.get(name, default) for name, default in entry.hyper.items()})
    if entry.check is not None:
        entry.check(h)
    return h


def _token_count(lengths, dtype):
    """max(|y|, 1) in the log-probs' dtype (TRL clamps empty completions to one token)."""
    return None if lengths is None else jnp.maximum(lengths, 1).astype(dtype)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, loss_type="sigmoid",
             chosen_lengths=None, rejected_lengths=None, **hyper):
    """The DPO family on per-pair completion log-probs (each `[B]`, summed over completion tokens).

    h_w = log π(y_w|x) − log π_ref(y_w|x), h_l likewise, Δ = h_w − h_l; `loss_type` picks the per-pair loss in
    `DPO_LOSSES` (the equations are in the `_dpo_<name>` docstrings; e.g. `sigmoid`: −log σ(βΔ)); `hyper` are its own
    hyper-parameters (`label_smoothing`, `discopop_tau`; see `dpo_hyper`). `chosen_lengths`/`rejected_lengths`
    (completion token counts `[B]`, clamped to ≥ 1 as TRL does) are required by `ipo` and `sigmoid_norm`.

    Label smoothing ε is used by `sigmoid` (cDPO, the TRL ≤ 0.29 behaviour; TRL 1.x's `sigmoid` ignores ε, which is
    ε = 0 here), `robust`, `exo_pair` (needs ε > 0; the paper uses 1e-3), `aot` and `aot_unpaired`; the others
    ignore it. `aot`/`aot_unpaired` sort over the batch axis, so each per-pair loss depends on the whole
    (micro-)batch, as in TRL: its mean is the loss. Returns `(losses [B], metrics)` with metrics `rewards/chosen`
    = βh_w, `rewards/rejected` = βh_l, `rewards/margins`, `rewards/accuracies` (1.0 where chosen > rejected).
    """
    h = dpo_hyper(loss_type, beta, **hyper)
    entry = DPO_LOSSES[loss_type]
    _require(not entry.needs_lengths or (chosen_lengths is not None and rejected_lengths is not None),
             f"loss_type {loss_type!r} normalises by completion length: pass chosen_lengths and rejected_lengths.")
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    pair = _Pair(chosen, rejected, chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps,
                 _token_count(chosen_lengths, chosen.dtype), _token_count(rejected_lengths, chosen.dtype))
    return entry.loss(pair, h), _rewards(beta * chosen, beta * rejected)


# ----------------------------------------------------------------------------------------------------------------
# Reference-free pairwise losses: ORPO, SimPO, CPO
# ----------------------------------------------------------------------------------------------------------------


def log1mexp(x):
    """log(1 − eˣ) for x < 0 (Mächler 2012): log(−expm1(x)) for x > −ln 2, else log1p(−eˣ).

    Each branch sees its input replaced by −ln 2 off its own side, so the branch `jnp.where` discards cannot put
    inf/nan into the gradient (e.g. log1p(−eˣ) at x = −1e-8 in float32, where eˣ rounds to 1)."""
    is_near = x > -_LN2
    near = jnp.log(-jnp.expm1(jnp.where(is_near, x, -_LN2)))
    far = jnp.log1p(-jnp.exp(jnp.where(is_near, -_LN2, x)))
    return jnp.where(is_near, near, far)


def orpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=0.1, chosen_nll=None):
    """ORPO (Hong et al. 2024, Eqs. 4–7; TRL `ORPOTrainer.odds_ratio_loss`) on per-token-averaged log-probs `[B]`.

    log odds(y) = log p − log(1 − p) with log p the averaged log-prob, so with c, r the chosen/rejected averages
    L_OR = log σ((c − r) − (log1mexp(c) − log1mexp(r))) and the per-pair loss is chosen_nll − β·L_OR.

    `chosen_nll` `[B]` defaults to −c, the per-sequence mean NLL of the chosen completion. TRL instead uses one token
    mean of the cross-entropy over the whole chosen batch, prompt tokens included; pass that (broadcast) to match
    TRL exactly. TRL casts the log-probs to float32; here the input dtype is kept. Metrics: `rewards/*` (βc, βr),
    `log_odds_ratio` = L_OR, `log_odds_chosen` = the log odds ratio, `nll_loss` = chosen_nll.
    """
    _check_beta(beta)
    c, r = chosen_avg_logps, rejected_avg_logps
    nll = -c if chosen_nll is None else chosen_nll
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = jax.nn.log_sigmoid(log_odds)
    metrics = {**_rewards(beta * c, beta * r), "log_odds_ratio": jax.lax.stop_gradient(ratio),
               "log_odds_chosen": jax.lax.stop_gradient(log_odds), "nll_loss": jax.lax.stop_gradient(nll)}
    return nll - beta * ratio, metrics


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024, Eq. 6; TRL `CPOTrainer` with loss_type="simpo", cpo_alpha=0) on averaged log-probs.

    TRL's form: logits = c − r − γ/β, loss = −(1−ε)·log σ(β·logits) − ε·log σ(−β·logits), i.e. −log σ(β(c − r) − γ)
    for ε = 0 (γ is the target margin in reward units). TRL's CPOTrainer adds cpo_alpha·NLL by default (CPO-SimPO);
    add that to these losses if wanted. Metrics: `rewards/*` = βc, βr.
    """
    _check_beta(beta)
    logits = chosen_avg_logps - rejected_avg_logps - gamma / beta
    losses = _smoothed_logistic(beta * logits, label_smoothing)
    return losses, _rewards(beta * chosen_avg_logps, beta * rejected_avg_logps)


def cpo_loss(chosen_logps, rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=1.0,
             chosen_nll=None):
    """CPO (Xu et al. 2024, Eq. 3; TRL `CPOTrainer.cpo_loss`): a reference-free preference term + α·NLL(chosen).

    With Δ = c − r: `sigmoid` −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), `hinge` max(0, 1 − βΔ), `ipo` (Δ − 1/(2β))².
    As in TRL, `sigmoid`/`hinge` take summed completion log-probs and `ipo` takes per-token averages: the caller
    passes the matching ones. `chosen_nll` `[B]` is required when cpo_alpha ≠ 0, because TRL's NLL is a token mean
    over the chosen batch that cannot be recovered from summed log-probs (pass it broadcast to match TRL; the
    per-sequence mean NLL is the per-pair alternative). Metrics: `rewards/*` = βc, βr, `nll_loss` (0 without NLL).
    """
    _require(loss_type in CPO_LOSS_TYPES,
             f"Unknown CPO loss_type {loss_type!r}; valid ones: {', '.join(CPO_LOSS_TYPES)}.")
    _check_beta(beta)
    _require(chosen_nll is not None or (_known(cpo_alpha) and cpo_alpha == 0),
             "cpo_loss needs chosen_nll (the chosen completions' NLL) when cpo_alpha != 0.")
    delta = chosen_logps - rejected_logps
    preference = {"sigmoid": lambda: _smoothed_logistic(beta * delta, label_smoothing),
                  "hinge": lambda: jax.nn.relu(1 - beta * delta),
                  "ipo": lambda: (delta - 1 / (2 * beta)) ** 2}[loss_type]()
    nll = jnp.zeros_like(delta) if chosen_nll is None else chosen_nll
    metrics = {**_rewards(beta * chosen_logps, beta * rejected_logps), "nll_loss": jax.lax.stop_gradient(nll)}
    return preference + cpo_alpha * nll, metrics


# ----------------------------------------------------------------------------------------------------------------
# Unpaired and reward-model losses: KTO, Bradley–Terry
# ----------------------------------------------------------------------------------------------------------------


def kto_kl(kl_logps, ref_kl_logps):
    """KTO's reference point z₀ = max(0, mean_B(log π(y'|x) − log π_ref(y'|x))), gradient stopped, over mismatched
    (prompt, completion) pairs y' (TRL pairs each prompt with the previous example's completion). Average over more
    examples (e.g. across replicas) before the clamp by passing `kl` to `kto_loss`."""
    return jnp.maximum(jax.lax.stop_gradient(jnp.mean(kl_logps - ref_kl_logps)), 0)


def kto_loss(logps, ref_logps, desirable, kl_logps=None, ref_kl_logps=None, *, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0, kl=None):
    """KTO (Ethayarajh et al. 2024, Eq. 7; TRL `KTOTrainer`, loss_type="kto") on unpaired examples, each `[B]`.

    h = log π(y|x) − log π_ref(y|x) (summed completion log-probs), z₀ = `kto_kl(kl_logps, ref_kl_logps)`, or
    max(0, `kl`) gradient-stopped when `kl` is given (e.g. a mean over a larger batch). Per example:
      desirable:   λ_D·(1 − σ(β(h − z₀)))
      undesirable: λ_U·(1 − σ(β(z₀ − h)))
    The mean over B equals TRL's loss (its `nanmean` over the concatenated desirable/undesirable losses).
    Metrics, each `[B]`: `rewards` = βh, `desirable` (1.0/0.0), `kl` = z₀ broadcast. TRL's `rewards/chosen` is
    Σ rewards·desirable / Σ desirable (likewise for rejected), and `rewards/margins` their difference.
    """
    _check_beta(beta)
    _require(kl is not None or (kl_logps is not None and ref_kl_logps is not None),
             "kto_loss needs kl_logps and ref_kl_logps (mismatched-pair log-probs), or kl.")
    z0 = kto_kl(kl_logps, ref_kl_logps) if kl is None else jnp.maximum(jax.lax.stop_gradient(kl), 0)
    logratio = logps - ref_logps
    desirable = jnp.asarray(desirable).astype(bool)
    losses = jnp.where(desirable, desirable_weight * (1 - jax.nn.sigmoid(beta * (logratio - z0))),
                       undesirable_weight * (1 - jax.nn.sigmoid(beta * (z0 - logratio))))
    metrics = {"rewards": jax.lax.stop_gradient(beta * logratio), "desirable": desirable.astype(logratio.dtype),
               "kl": jnp.broadcast_to(z0, logratio.shape).astype(logratio.dtype)}
    return losses, metrics


def bradley_terry_loss(r_chosen, r_rejected, *, margin=None, center_coef=0.0):
    """Bradley–Terry reward-model loss (Ouyang et al. 2022; TRL `RewardTrainer.compute_loss`) on rewards `[B]`.

    −log σ(r_w − r_l − m) + c·(r_w + r_l)², with m the optional per-pair margin (Llama 2) and c TRL's
    `center_rewards_coefficient` (Eisenstein et al. 2023): TRL adds c·mean_B((r_w + r_l)²), the mean of these
    per-pair terms. Metrics: `accuracy` (1.0 where r_w > r_l) and `margin` = r_w − r_l.
    """
    diff = r_chosen - r_rejected
    shifted = diff if margin is None else diff - margin
    losses = -jax.nn.log_sigmoid(shifted) + center_coef * (r_chosen + r_rejected) ** 2
    diff = jax.lax.stop_gradient(diff)
    return losses, {"accuracy": (diff > 0).astype(diff.dtype), "margin": diff}

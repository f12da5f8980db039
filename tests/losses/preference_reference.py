"""Independent float64 NumPy versions of the preference losses, written from the papers / TRL 1.16 formulas (not from
`flaxalign.losses.preference`). Each returns the per-pair (per-example) losses `[B]`."""

import numpy as np


def logsig(x):
    """log σ(x) = −log(1 + e^{−x})."""
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sig(x):
    return np.exp(logsig(x))


def dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, len_c=None, len_r=None, tau=0.05):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    hw, hl = pc - rc, pr - rr
    x = beta * (hw - hl)
    if loss_type == "sigmoid":  # cDPO for eps > 0
        return -(1 - eps) * logsig(x) - eps * logsig(-x)
    if loss_type == "robust":
        return (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - x)
    if loss_type in ("ipo", "sigmoid_norm"):
        n_c, n_r = np.maximum(np.asarray(len_c, np.float64), 1), np.maximum(np.asarray(len_r, np.float64), 1)
        d = hw / n_c - hl / n_r
        return (d - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -logsig(beta * d)
    if loss_type == "exo_pair":
        return sig(x) * (logsig(x) - np.log(1 - eps)) + sig(-x) * (logsig(-x) - np.log(eps))
    if loss_type == "nca_pair":
        return -logsig(beta * hw) - 0.5 * logsig(-beta * hw) - 0.5 * logsig(-beta * hl)
    if loss_type == "bco_pair":
        return -logsig(beta * hw) - logsig(-beta * hl)
    if loss_type == "sppo_hard":
        return (hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = np.sort(pc - pr) - np.sort(rc - rr)
        else:
            d = np.sort(hw) - np.sort(hl)
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if loss_type == "apo_zero":
        return (1 - sig(beta * hw)) + sig(beta * hl)
    if loss_type == "apo_down":
        return sig(beta * hw) + (1 - sig(x))
    if loss_type == "discopop":
        w = sig(x / tau)
        return (1 - w) * -logsig(x) + w * np.exp(-x)
    raise ValueError(loss_type)


def log1mexp(x):
    """log(1 − eˣ), by the definition, with log1p where it matters; float64."""
    x = np.asarray(x, np.float64)
    return np.where(x < -np.log(2), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def orpo(c, r, *, beta, nll=None):
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    # odds(y) = p / (1 − p), p = exp(average log-prob)
    log_odds = (c - log1mexp(c)) - (r - log1mexp(r))
    nll = -c if nll is None else nll
    return nll - beta * logsig(log_odds), log_odds


def simpo(c, r, *, beta, gamma, eps=0.0):
    x = beta * (np.asarray(c, np.float64) - np.asarray(r, np.float64)) - gamma  # Meng et al. Eq. 6
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def cpo(c, r, *, beta, loss_type, eps=0.0, alpha=1.0, nll=0.0):
    d = np.asarray(c, np.float64) - np.asarray(r, np.float64)
    if loss_type == "sigmoid":
        pref = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    elif loss_type == "hinge":
        pref = np.maximum(0.0, 1 - beta * d)
    else:
        pref = (d - 1 / (2 * beta)) ** 2
    return pref + alpha * np.asarray(nll, np.float64)


def kto(logps, ref_logps, desirable, kl_logps, ref_kl_logps, *, beta, w_d=1.0, w_u=1.0):
    h = np.asarray(logps, np.float64) - np.asarray(ref_logps, np.float64)
    z0 = max(float(np.mean(np.asarray(kl_logps, np.float64) - np.asarray(ref_kl_logps, np.float64))), 0.0)
    loss_d = w_d * (1 - sig(beta * (h - z0)))
    loss_u = w_u * (1 - sig(beta * (z0 - h)))
    return np.where(np.asarray(desirable, bool), loss_d, loss_u), z0


def bradley_terry(rc, rr, *, margin=None, center=0.0):
    rc, rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    m = 0.0 if margin is None else np.asarray(margin, np.float64)
    return -logsig(rc - rr - m) + center * (rc + rr) ** 2


# Fixed inputs shared by the default suite and the TRL parity tests. The policy and reference margins are ordered
# differently (so `aot` differs from `sigmoid`) and the completion lengths differ (so `ipo`/`sigmoid_norm` matter).
DPO_INPUTS = {
    "chosen_logps": [-12.5, -30.25, -7.0, -45.5, -20.0, -3.75],
    "rejected_logps": [-14.0, -28.5, -11.25, -40.0, -26.5, -9.0],
    "ref_chosen_logps": [-13.0, -29.0, -8.5, -44.0, -21.5, -4.0],
    "ref_rejected_logps": [-13.5, -29.5, -10.0, -41.5, -25.0, -8.25],
}
DPO_LENGTHS = {"chosen_lengths": [5, 12, 3, 20, 9, 2], "rejected_lengths": [7, 10, 6, 15, 13, 4]}
# (loss_type, beta, label_smoothing): every DPO loss type; the ones that use label smoothing also with ε > 0
DPO_CASES = [(t, 0.1, 0.0) for t in ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "nca_pair", "bco_pair",
                                     "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop")]
DPO_CASES += [("exo_pair", 0.1, 1e-3), ("robust", 0.5, 0.2), ("aot", 0.5, 0.1), ("aot_unpaired", 0.5, 0.1),
              ("hinge", 0.5, 0.0), ("ipo", 0.5, 0.0), ("discopop", 0.5, 0.0)]
# per-token-averaged log-probs (ORPO/SimPO/CPO-ipo), one of them near 0 where log(1 − p) needs care
AVG_INPUTS = {"chosen": [-0.05, -1.2, -0.7, -2.5, -0.3, -1e-4], "rejected": [-0.4, -1.0, -1.5, -2.0, -0.9, -0.02]}
NLL = [0.8, 1.3, 0.6, 2.2, 0.4, 0.1]
KTO_INPUTS = {
    "logps": [-12.5, -30.25, -7.0, -45.5, -20.0, -3.75],
    "ref_logps": [-13.0, -29.0, -8.5, -44.0, -21.5, -4.0],
    "desirable": [True, False, True, True, False, False],
    "kl_logps": [-15.0, -31.0, -9.5, -47.0, -19.0, -6.0],
    "ref_kl_logps": [-15.5, -30.0, -10.0, -46.0, -20.5, -6.25],
}
REWARD_INPUTS = {"chosen": [1.5, -0.25, 0.75, 2.0, -1.0, 0.1], "rejected": [0.5, 0.5, -0.5, 2.5, -2.0, 0.1],
                 "margin": [0.5, 0.0, 1.0, 0.25, 2.0, 0.0]}

"""Independent float64 references for the GRPO family (`flaxalign.losses.group_rl`), written as plain Python loops from
the equations in its docstrings (GSPO, CISPO, DAPO, INTELLECT-2's δ, truncated importance sampling, REINFORCE++), not
from the JAX code. Like `rl_reference.py` each function walks the real tokens of each row explicitly
(`real(mask_row)`), so padding cannot enter anything, and returns NumPy float64 arrays or Python floats. Also the extra
test inputs (sampler log-probs, sampler-mismatch weights) on top of `rl_reference.INPUTS`."""

import math
import statistics

import numpy as np

from tests.losses.rl_reference import INPUTS, MASK, B, T, _aggregate, _token_mean, real

# ------------------------------------------------------------------------------------------------------------------
# extra inputs, junk on the padded positions as in rl_reference
# ------------------------------------------------------------------------------------------------------------------


def _extra_inputs(seed=1):
    rng = np.random.default_rng(seed)
    junk = rng.uniform(300, 900, (B, T))

    def tok(values):
        return np.where(MASK, values, junk)

    return {
        # a sampler whose log-probs differ from the learner's old ones by ~0.3 nats per token: token weights in
        # about [0.5, 2], sequence weights (products over up to 7 tokens) much wider
        "sampler_logps": tok(INPUTS["old_logps"] + rng.normal(0, 0.3, (B, T))),
        "is_weights": tok(rng.uniform(0.3, 2.0, (B, T))),
        "is_seq_weights": rng.uniform(0.3, 2.0, (B, 1)),
        # a per-token KL for REINFORCE++'s reward, dense: tests put their own junk where their mask is 0
        "kl": rng.normal(0.05, 0.2, (B, T)),
    }


EXTRA = _extra_inputs()


# ------------------------------------------------------------------------------------------------------------------
# The policy loss: importance level × form × sampler weights + β·k3, aggregated
# ------------------------------------------------------------------------------------------------------------------


def _advantage(advantages, b, t):
    return float(advantages[b]) if np.ndim(advantages) == 1 else float(advantages[b, t])


def _is_weight(is_weights, b, t):
    if is_weights is None:
        return 1.0
    return float(is_weights[b, 0]) if np.shape(is_weights)[1] == 1 else float(is_weights[b, t])


def log_weights(logps, old_logps, mask, level):
    """{(b, t): log w} on real tokens: token: logπ − logπ_old; sequence (GSPO): the row's mean of that over its
    real tokens, the same for each of them."""
    out = {}
    for b in range(len(mask)):
        idx = real(mask[b])
        diffs = [float(logps[b, t]) - float(old_logps[b, t]) for t in idx]
        seq = sum(diffs) / max(len(idx), 1)
        for t, d in zip(idx, diffs):
            out[b, t] = d if level == "token" else seq
    return out


def _clip_terms(w, adv, eps_low, eps_high, delta):
    """(unclipped term, clipped term) of −min(min(w, δ)·A, clip(w, 1 − ε_low, 1 + ε_high)·A)."""
    unclipped = w if delta is None else min(w, delta)
    return unclipped * adv, min(max(w, 1 - eps_low), 1 + eps_high) * adv


def policy_loss(logps, old_logps, ref_logps, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, beta=0.0,
                loss_type="dapo", max_completion_length=None, policy_loss="clip", importance_sampling_level="token",
                delta=None, cispo_max_weight=5.0, is_weights=None):
    """(loss_sum, count, metrics) of the GRPO family per real token
      clip:  ℓ = c·(−min(min(w, δ)·A, clip(w, 1 − ε_low, 1 + ε_high)·A)) + β·k3
      cispo: ℓ = c·(−min(w, w_max)·A·logπ) + β·k3
    with w per `importance_sampling_level`, c the sampler-mismatch weight, k3 = e^{ref − logπ} − (ref − logπ) − 1;
    aggregated per loss_type (grpo: Σ_b row means over B; bnpo, dapo: Σ over the real tokens; dr_grpo: Σ over B·L)."""
    n_rows, width = np.shape(logps)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    lw = log_weights(logps, old_logps, mask, importance_sampling_level)
    per_token = [[0.0] * width for _ in range(n_rows)]
    names = ("low", "high", "region") if policy_loss == "clip" else ("cispo",)
    flags = {k: [[0.0] * width for _ in range(n_rows)] for k in (*names, "kl")}
    for b in range(n_rows):
        for t in real(mask[b]):
            w, adv = math.exp(lw[b, t]), _advantage(advantages, b, t)
            if policy_loss == "clip":
                loss = -min(*_clip_terms(w, adv, clip_eps, eps_high, delta))
                low, high = w < 1 - clip_eps and adv < 0, w > 1 + eps_high and adv > 0
                flags["low"][b][t], flags["high"][b][t] = float(low), float(high)
                flags["region"][b][t] = float(low or high)
            else:
                loss = -min(w, cispo_max_weight) * adv * float(logps[b, t])
                flags["cispo"][b][t] = float(w > cispo_max_weight and adv > 0)
            loss *= _is_weight(is_weights, b, t)
            if ref_logps is not None:
                d = float(ref_logps[b, t]) - float(logps[b, t])
                flags["kl"][b][t] = math.exp(d) - d - 1
                loss += beta * flags["kl"][b][t]
            per_token[b][t] = loss
    loss_sum, count = _aggregate(per_token, mask, "sequence" if loss_type == "grpo" else "token")
    if loss_type == "dr_grpo":
        count = float(n_rows * (width if max_completion_length is None else max_completion_length))
    metric_names = {"low": "clip_ratio/low_mean", "high": "clip_ratio/high_mean", "region": "clip_ratio/region_mean",
                    "cispo": "cispo_clip_ratio"}
    metrics = {metric_names[k]: _token_mean(flags[k], mask) for k in names}
    metrics["tokens"] = float(sum(len(real(r)) for r in mask))
    if ref_logps is not None:
        metrics["kl"] = _token_mean(flags["kl"], mask)
    return loss_sum, count, metrics


def _aggregation_weight(mask, b, loss_type, max_completion_length):
    """∂(loss_sum / count)/∂ℓ_bt for a real token of row b."""
    n_rows, width = np.shape(mask)
    if loss_type == "grpo":
        return 1.0 / (n_rows * max(len(real(mask[b])), 1))
    if loss_type == "dr_grpo":
        return 1.0 / (n_rows * (width if max_completion_length is None else max_completion_length))
    return 1.0 / sum(len(real(r)) for r in mask)


def _clip_slope(w, adv, eps_low, eps_high, delta):
    """∂ℓ/∂log w of ℓ = −min(min(w, δ)·A, clip(w)·A): −A·w through whichever term is the smaller (each term's slope
    is w·A where it is not clipped, 0 where it is; a tie averages them, as `jnp.minimum`)."""
    unclipped, clipped = _clip_terms(w, adv, eps_low, eps_high, delta)
    slope_unclipped = -adv * w if delta is None or w < delta else 0.0
    slope_clipped = -adv * w if 1 - eps_low < w < 1 + eps_high else 0.0
    if unclipped < clipped:
        return slope_unclipped
    if clipped < unclipped:
        return slope_clipped
    return 0.5 * (slope_unclipped + slope_clipped)


def policy_loss_grad(logps, old_logps, ref_logps, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, beta=0.0,
                     loss_type="dapo", max_completion_length=None, policy_loss="clip",
                     importance_sampling_level="token", delta=None, cispo_max_weight=5.0, is_weights=None):
    """∂(loss_sum / count)/∂logπ `[B, T]` (0 on padding), by the chain rule written out:
      token clip:     a_bt·c_bt·∂ℓ_bt/∂log w_bt
      sequence clip:  (1/|y_b|)·Σ_t' a_bt'·c_bt'·∂ℓ_bt'/∂log s_b      (log s_b = mean_t (logπ − logπ_old))
      cispo:          −a_bt·c_bt·min(w, w_max)·A_bt                   (the weight is a constant)
    plus β·a_bt·(1 − e^{ref − logπ}) from k3, with a_bt the aggregation weight."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    level = importance_sampling_level
    lw = log_weights(logps, old_logps, mask, level)
    grad = np.zeros(np.shape(logps))
    for b in range(len(mask)):
        idx = real(mask[b])
        a = _aggregation_weight(mask, b, loss_type, max_completion_length)
        for t in idx:
            w, adv, c = math.exp(lw[b, t]), _advantage(advantages, b, t), _is_weight(is_weights, b, t)
            if policy_loss == "cispo":
                grad[b, t] += -a * c * min(w, cispo_max_weight) * adv
            elif level == "token":
                grad[b, t] += a * c * _clip_slope(w, adv, clip_eps, eps_high, delta)
            else:
                slope = a * c * _clip_slope(w, adv, clip_eps, eps_high, delta)
                for t_other in idx:  # log s_b is the mean over the row: every token of it gets 1/|y_b|
                    grad[b, t_other] += slope / len(idx)
            if ref_logps is not None:
                grad[b, t] += beta * a * (1 - math.exp(float(ref_logps[b, t]) - float(logps[b, t])))
    return grad


# ------------------------------------------------------------------------------------------------------------------
# REINFORCE++
# ------------------------------------------------------------------------------------------------------------------


def _whiten_real(values, mask):
    """(x − mean)/sqrt(var + 1e-8) over every real token of the batch, variance unbiased; 0 elsewhere."""
    vals = [values[b][t] for b in range(len(mask)) for t in real(mask[b])]
    mean, var = statistics.fmean(vals), statistics.variance(vals)
    out = np.zeros(np.shape(mask))
    for b in range(len(mask)):
        for t in real(mask[b]):
            out[b, t] = (values[b][t] - mean) / math.sqrt(var + 1e-8)
    return out


def reinforce_pp_advantages(rewards, kl, mask, beta):
    """r_t = −β·kl_t (+ R_b on the row's last real token), G_t = Σ_{s ≥ t, real} r_s, whitened over the batch."""
    returns = [[0.0] * np.shape(mask)[1] for _ in range(len(mask))]
    for b in range(len(mask)):
        idx = real(mask[b])
        to_go = 0.0
        for t in reversed(idx):
            r = -beta * float(kl[b, t]) + (float(rewards[b]) if t == idx[-1] else 0.0)
            to_go += r
            returns[b][t] = to_go
    return _whiten_real(returns, mask)


def reinforce_pp_baseline_advantages(rewards, mask, group_size):
    """R_b − mean of its group on each of row b's real tokens, whitened over the batch."""
    centred = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        centred += [r - statistics.fmean(group) for r in group]
    return _whiten_real([[centred[b]] * np.shape(mask)[1] for b in range(len(mask))], mask)


# ------------------------------------------------------------------------------------------------------------------
# Sampler correction, overlong penalty, informative groups
# ------------------------------------------------------------------------------------------------------------------


def sampler_correction(old_logps, sampler_logps, mask, mode, clip_min, clip_max):
    """(weights, metrics): d_t = old − sampler on real tokens (0 elsewhere); token modes w_t = e^{d_t} `[B, T]`,
    sequence modes w_b = e^{Σ_t d_t} `[B, 1]`; truncate: clip into [C_min, C_max]; mask: 0 outside it. Metrics:
    mean and max of |d_t| over real tokens; min/mean/max of w over real tokens (token) or rows (sequence)."""
    n_rows, width = np.shape(mask)
    gaps = [[float(old_logps[b, t]) - float(sampler_logps[b, t]) if mask[b][t] else 0.0 for t in range(width)]
            for b in range(n_rows)]
    real_gaps = [abs(gaps[b][t]) for b in range(n_rows) for t in real(mask[b])]
    metrics = {"sampler/logp_gap_mean": sum(real_gaps) / len(real_gaps), "sampler/logp_gap_max": max(real_gaps)}
    if mode == "none":
        return None, metrics
    level, how = mode.split("_")

    def corrected(w):
        if how == "truncate":
            return min(max(w, clip_min), clip_max)
        return w if clip_min <= w <= clip_max else 0.0

    if level == "token":
        weights = np.array([[corrected(math.exp(gaps[b][t])) for t in range(width)] for b in range(n_rows)])
        counted = [weights[b, t] for b in range(n_rows) for t in real(mask[b])]
    else:
        weights = np.array([[corrected(math.exp(sum(gaps[b])))] for b in range(n_rows)])
        counted = list(weights[:, 0])
    metrics.update({"sampler/is_weight_mean": sum(counted) / len(counted), "sampler/is_weight_min": min(counted),
                    "sampler/is_weight_max": max(counted)})
    return weights, metrics


def overlong_penalty(lengths, max_length, buffer, factor):
    """DAPO Eq. 13 times `factor`: 0 for |y| ≤ L − C; ((L − C) − |y|)/C for L − C < |y| ≤ L; −1 for |y| > L."""
    out = []
    for n in lengths:
        if n <= max_length - buffer:
            r = 0.0
        elif n <= max_length:
            r = ((max_length - buffer) - n) / buffer
        else:
            r = -1.0
        out.append(factor * r)
    return np.array(out)


def informative_groups(rewards, group_size):
    """Per group: not all of its rewards are equal."""
    return np.array([len(set(float(r) for r in rewards[s:s + group_size])) > 1
                     for s in range(0, len(rewards), group_size)])

"""Independent float64 reference versions of the RL math, written as plain Python loops from the equations (Huang et
al. 2023, TRL 1.16 GRPO/RLOO, TRL ≤ 0.x PPO), not from `flaxalign.losses.rl`. Each function walks the real tokens of
each row explicitly (`real(mask_row)`), so padding cannot enter anything, and returns NumPy float64 arrays or Python
floats. Also the shared test inputs."""

import math
import statistics

import numpy as np

# ------------------------------------------------------------------------------------------------------------------
# inputs: B = 6 rows of T = 7 response tokens; lengths 7 (EOS in the last column), 3, 5, 1, 6, 4; the padded
# positions hold large junk, so a function that lets padding in is far off. GRPO/RLOO groups: G = 3 (2 prompts) or
# G = 2 (3 prompts).
# ------------------------------------------------------------------------------------------------------------------

B, T = 6, 7
LENGTHS = [7, 3, 5, 1, 6, 4]


def prefix_mask(lengths, width):
    return np.array([[t < n for t in range(width)] for n in lengths])


MASK = prefix_mask(LENGTHS, T)
# holes and left padding: rows whose real tokens are not a prefix
IRREGULAR_MASK = np.array([[0, 0, 1, 1, 1, 1, 1],
                           [1, 0, 1, 0, 1, 0, 0],
                           [0, 0, 0, 0, 0, 0, 1],
                           [1, 1, 1, 1, 1, 1, 1],
                           [0, 1, 1, 0, 0, 1, 1],
                           [1, 1, 0, 0, 0, 0, 0]], bool)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    junk = rng.uniform(300, 900, (B, T))

    def tok(values):
        return np.where(MASK, values, junk)

    logps = -rng.gamma(2.0, 0.8, (B, T))
    return {
        "logps": tok(logps),
        "old_logps": tok(logps + rng.normal(0, 0.25, (B, T))),
        "ref_logps": tok(logps + rng.normal(0, 0.4, (B, T))),
        "advantages": tok(rng.normal(0, 1.2, (B, T))),
        "rewards": tok(rng.normal(0, 0.3, (B, T))),
        "values": tok(rng.normal(0.2, 0.8, (B, T))),
        "old_values": tok(rng.normal(0.2, 0.8, (B, T))),
        "returns": tok(rng.normal(0.3, 1.0, (B, T))),
        "scores": rng.normal(0.5, 1.5, B),
        "seq_rewards": rng.normal(1.0, 2.0, B),
        # signs chosen so that both GRPO clip regions occur: row 0 (ρ up to 1.3) is pushed up, row 5 (ρ 0.64) down
        "seq_advantages": np.array([0.9, 1.08, -1.5, 1.36, -0.06, -0.54]),
    }


INPUTS = _inputs()


def real(mask_row):
    """The indices of a row's real tokens, in order."""
    return [t for t, m in enumerate(mask_row) if m]


# ------------------------------------------------------------------------------------------------------------------
# KL estimators and masked statistics
# ------------------------------------------------------------------------------------------------------------------


def kl(logps, ref_logps, kind):
    """Schulman's estimators of KL(π ‖ π_ref), elementwise: k1 = r, k2 = r²/2, k3 = e^{−r} − 1 + r, r = logp − ref."""
    out = np.zeros(np.shape(logps))
    for idx in np.ndindex(out.shape):
        r = float(logps[idx]) - float(ref_logps[idx])
        out[idx] = {"k1": r, "k2": 0.5 * r * r, "k3": math.exp(-r) - 1 + r}[kind]
    return out


def trl_grpo_k3(logps, ref_logps):
    """TRL 1.16 GRPO's per-token KL as written there: exp(ref − logp) − (ref − logp) − 1."""
    d = np.asarray(ref_logps, np.float64) - np.asarray(logps, np.float64)
    return np.exp(d) - d - 1


def masked_values(x, mask):
    return [float(v) for v, m in zip(np.ravel(x), np.ravel(mask)) if m]


def masked_mean(x, mask, axis=None):
    if axis is None:
        vals = masked_values(x, mask)
        return sum(vals) / len(vals)
    x, mask = np.moveaxis(np.asarray(x, np.float64), axis, -1), np.moveaxis(np.asarray(mask), axis, -1)
    out = np.zeros(x.shape[:-1])
    for idx in np.ndindex(out.shape):
        vals = masked_values(x[idx], mask[idx])
        out[idx] = sum(vals) / len(vals) if vals else math.nan
    return out


def masked_var(x, mask, unbiased=True):
    vals = masked_values(x, mask)
    return statistics.variance(vals) if unbiased else statistics.pvariance(vals)


def masked_whiten(x, mask, shift_mean=True, unbiased=True):
    """Only the real positions are defined (the caller masks the rest): here they are 0."""
    vals = masked_values(x, mask)
    mean, var = statistics.fmean(vals), masked_var(x, mask, unbiased)
    out = np.zeros(np.shape(x))
    for idx in np.ndindex(out.shape):
        if mask[idx]:
            out[idx] = (float(x[idx]) - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out


# ------------------------------------------------------------------------------------------------------------------
# PPO-RLHF
# ------------------------------------------------------------------------------------------------------------------


def ppo_rewards(scores, logps, ref_logps, mask, kl_coef, kind):
    out = np.zeros(np.shape(logps))
    for b in range(out.shape[0]):
        idx = real(mask[b])
        for t in idx:
            out[b, t] = -kl_coef * kl(np.array([logps[b, t]]), np.array([ref_logps[b, t]]), kind)[0]
        if idx:
            out[b, idx[-1]] += float(scores[b])
    return out


def gae(rewards, values, mask, gamma, lam):
    """The textbook backward loop over each row's real tokens, V = A = 0 after the last one."""
    advantages, returns = np.zeros(np.shape(rewards)), np.zeros(np.shape(rewards))
    for b in range(advantages.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(real(mask[b])):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(values[b, t])
            advantages[b, t] = next_adv
            returns[b, t] = next_adv + float(values[b, t])
    return advantages, returns


def _aggregate(per_token, mask, aggregation):
    """(sum, count): over real tokens, or of per-row means over the B rows (an empty row: 0 over 1)."""
    if aggregation == "token":
        vals = [per_token[b][t] for b in range(len(per_token)) for t in real(mask[b])]
        return sum(vals), float(len(vals))
    total = 0.0
    for b in range(len(per_token)):
        idx = real(mask[b])
        total += sum(per_token[b][t] for t in idx) / max(len(idx), 1)
    return total, float(len(per_token))


def _token_mean(values, mask):
    vals = [values[b][t] for b in range(len(values)) for t in real(mask[b])]
    return sum(vals) / len(vals) if vals else 0.0


def ppo_policy(logps, old_logps, advantages, mask, clip_eps, aggregation):
    n_rows, width = np.shape(logps)
    per_token = [[0.0] * width for _ in range(n_rows)]
    clipped_active = [[0.0] * width for _ in range(n_rows)]
    approx_kl = [[0.0] * width for _ in range(n_rows)]
    ratios = [[0.0] * width for _ in range(n_rows)]
    for b in range(n_rows):
        for t in real(mask[b]):
            diff = float(logps[b, t]) - float(old_logps[b, t])
            ratio, adv = math.exp(diff), float(advantages[b, t])
            surrogate = -adv * ratio
            clipped = -adv * min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            per_token[b][t] = max(surrogate, clipped)
            clipped_active[b][t] = float(clipped > surrogate)
            approx_kl[b][t] = 0.5 * diff * diff
            ratios[b][t] = ratio
    loss_sum, count = _aggregate(per_token, mask, aggregation)
    metrics = {"clipfrac": _token_mean(clipped_active, mask), "approx_kl": _token_mean(approx_kl, mask),
               "ratio_mean": _token_mean(ratios, mask), "tokens": float(sum(len(real(r)) for r in mask))}
    return loss_sum, count, metrics


def ppo_value(values, old_values, returns, mask, clip_range):
    n_rows, width = np.shape(values)
    per_token = [[0.0] * width for _ in range(n_rows)]
    clipped_active = [[0.0] * width for _ in range(n_rows)]
    for b in range(n_rows):
        for t in real(mask[b]):
            v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            v_clipped = min(max(v, v_old - clip_range), v_old + clip_range)
            plain, clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
            per_token[b][t] = 0.5 * max(plain, clipped)
            clipped_active[b][t] = float(clipped > plain)
    loss_sum, count = _aggregate(per_token, mask, "token")
    return loss_sum, count, {"vf_clipfrac": _token_mean(clipped_active, mask), "tokens": count}


# ------------------------------------------------------------------------------------------------------------------
# GRPO / RLOO
# ------------------------------------------------------------------------------------------------------------------


def grpo_advantages(rewards, group_size, scale_rewards):
    rewards = [float(r) for r in rewards]
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = statistics.fmean(group)
        std = {"group": statistics.stdev(group) if len(group) > 1 else 0.0, "batch": batch_std, "none": None}
        for r in group:
            s = std[scale_rewards]
            out.append(r - mean if s is None else (r - mean) / (s + 1e-4))
    return np.array(out)


def rloo_advantages(rewards, group_size, normalize):
    rewards = [float(r) for r in rewards]
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            out.append(r - statistics.fmean(others) if others else 0.0)
    if normalize:
        mean, std = statistics.fmean(out), statistics.stdev(out)
        out = [(a - mean) / (std + 1e-4) for a in out]
    return np.array(out)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps, clip_eps_high, beta, loss_type,
              max_completion_length=None):
    n_rows, width = np.shape(logps)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token = [[0.0] * width for _ in range(n_rows)]
    flags = {k: [[0.0] * width for _ in range(n_rows)] for k in ("low", "high", "region", "kl")}
    for b in range(n_rows):
        for t in real(mask[b]):
            adv = float(advantages[b]) if np.ndim(advantages) == 1 else float(advantages[b, t])
            ratio = math.exp(float(logps[b, t]) - float(old_logps[b, t]))
            clipped = min(max(ratio, 1 - clip_eps), 1 + eps_high)
            loss = -min(ratio * adv, clipped * adv)
            if ref_logps is not None:
                d = float(ref_logps[b, t]) - float(logps[b, t])
                flags["kl"][b][t] = math.exp(d) - d - 1
                loss += beta * flags["kl"][b][t]
            per_token[b][t] = loss
            low, high = ratio < 1 - clip_eps and adv < 0, ratio > 1 + eps_high and adv > 0
            flags["low"][b][t], flags["high"][b][t], flags["region"][b][t] = float(low), float(high), float(low or high)
    if loss_type == "grpo":
        loss_sum, count = _aggregate(per_token, mask, "sequence")
    else:
        loss_sum, count = _aggregate(per_token, mask, "token")
    if loss_type == "dr_grpo":
        count = float(n_rows * (width if max_completion_length is None else max_completion_length))
    metrics = {"clip_ratio/low_mean": _token_mean(flags["low"], mask),
               "clip_ratio/high_mean": _token_mean(flags["high"], mask),
               "clip_ratio/region_mean": _token_mean(flags["region"], mask),
               "tokens": float(sum(len(real(r)) for r in mask))}
    if ref_logps is not None:
        metrics["kl"] = _token_mean(flags["kl"], mask)
    return loss_sum, count, metrics

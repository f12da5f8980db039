"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping and a weight-decay mask."""

import math
from typing import Any

import jax
import optax

from flaxalign import errors

NO_DECAY_NAMES = ("scale", "bias", "magnitude")  # norm scales, biases and DoRA magnitudes are not decayed


def check_optim(cfg) -> None:
    """Refuses optimizer settings that would train to NaN or not at all, naming the field (`optim.lr`, …)."""
    rules = {  # field: (is the value allowed, what it must be)
        "lr": (lambda v: v > 0, "finite and > 0"), "eps": (lambda v: v > 0, "finite and > 0"),
        "b1": (lambda v: 0 <= v < 1, "in [0, 1)"), "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "weight_decay": (lambda v: v >= 0, "finite and >= 0"), "clip_norm": (lambda v: v >= 0, "finite and >= 0"),
        "final_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "warmup_steps": (lambda v: v >= 0, ">= 0"), "total_steps": (lambda v: v >= 0, ">= 0"),
    }
    for name, (allowed, must_be) in rules.items():
        value = cfg.get(name)
        if value is not None and not (math.isfinite(float(value)) and allowed(value)):
            raise errors.ConfigError(f"optim.{name}={value} must be {must_be}.")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `schedule` decay to `lr·final_lr_fraction`."""
    check_optim(cfg)
    lr, warmup, total = float(cfg.lr), int(cfg.warmup_steps), int(cfg.total_steps)
    decay_steps = max(total - warmup, 1)
    final = lr * float(cfg.final_lr_fraction)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(cfg.final_lr_fraction))
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(lr, final, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise errors.ConfigError(
            f"optim.schedule must be 'cosine', 'linear' or 'constant', not {cfg.schedule!r}.")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for matrices that get weight decay; False for norm scales and biases."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not any(name == n or name.endswith("_" + n) for n in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """`cfg` is the `optim` config block (lr, warmup_steps, total_steps, schedule, b1, b2, eps, weight_decay,
    clip_norm, final_lr_fraction)."""
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                             weight_decay=float(cfg.weight_decay), mask=decay_mask))
    return optax.chain(*parts)

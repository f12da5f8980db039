"""`flaxalign.train.optim` against closed forms written out here: the learning rate of every schedule at the
warmup, decay and past-the-end steps, the RL stages' schedule counted in optimizer updates, which leaves get weight
decay (README: "weight_decay (not on norms/biases)"), three AdamW steps against a NumPy float64 AdamW (global-norm
clipping, bias correction, decoupled decay), and frozen params that get neither updates nor optimizer state."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxalign import models
from flaxalign.peft import lora
from flaxalign.policy import TrainableModel
from flaxalign.stages import onpolicy
from flaxalign.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from flaxalign.train.state import create_state
from flaxalign.train.step import gradient_step
from tests import helpers

LR, WARMUP, TOTAL, FINAL = 3e-3, 10, 110, 0.1


def hand_lr(step: int, *, schedule: str, lr=LR, warmup=WARMUP, total=TOTAL, final=FINAL) -> float:
    """Linear warmup 0 → lr over `warmup` steps, then over the remaining steps a cosine, linear or constant
    decay to lr·final, held there past the end."""
    if step < warmup:
        return lr * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    if schedule == "cosine":
        return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return lr * (1 - (1 - final) * progress)
    return lr


def _cfg(**overrides) -> ml_collections.ConfigDict:
    values = dict(lr=LR, warmup_steps=WARMUP, total_steps=TOTAL, final_lr_fraction=FINAL, schedule="cosine")
    return helpers.optim_config(**{**values, **overrides})


# 0, mid-warmup, last warmup step, warmup end, a quarter, the middle, last step, the end, far past the end
STEPS = [0, 5, 9, 10, 35, 60, 109, 110, 500]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_matches_the_closed_form_at_every_phase(schedule):
    got = [float(learning_rate_schedule(_cfg(schedule=schedule))(step)) for step in STEPS]
    expected = [hand_lr(step, schedule=schedule) for step in STEPS]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)  # float32: measured ≤ 9.4e-8 relative
    assert got[0] == 0.0 and got[3] == pytest.approx(LR)  # the first update has lr 0; warmup ends at the peak


def test_schedule_landmarks_by_hand():
    """The closed form above, checked at points whose values are known without it."""
    cosine, linear = learning_rate_schedule(_cfg(schedule="cosine")), learning_rate_schedule(_cfg(schedule="linear"))
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert float(cosine(mid)) == pytest.approx(LR * (FINAL + 1) / 2, rel=1e-6)  # cos(π/2) = 0
    assert float(linear(mid)) == pytest.approx(LR * (FINAL + 1) / 2, rel=1e-6)
    assert float(cosine(TOTAL)) == float(cosine(10 * TOTAL)) == pytest.approx(LR * FINAL, rel=1e-6)
    assert float(linear(TOTAL)) == pytest.approx(LR * FINAL, rel=1e-6)


def test_without_warmup_the_first_step_has_the_full_rate():
    schedule = learning_rate_schedule(_cfg(warmup_steps=0, schedule="linear", final_lr_fraction=0.0))
    assert float(schedule(0)) == pytest.approx(LR)
    assert float(schedule(TOTAL // 2)) == pytest.approx(LR / 2, rel=1e-6)
    assert abs(float(schedule(TOTAL))) < 1e-7 * LR  # zero up to float32 rounding (see below)


def _applied_rates(optimizer, updates: int) -> np.ndarray:
    """The learning rate each of `updates` updates of the real optimizer applied, read off a one-number param with
    gradient 1: Adam's step is then m̂/(√v̂+ε) = 1/(1+ε), so the update is −lr (weight decay 0, no clipping)."""
    params = {"w": jnp.zeros(())}
    state, update = optimizer.init(params), jax.jit(optimizer.update)
    rates = []
    for _ in range(updates):
        step, state = update({"w": jnp.ones(())}, state, params)
        rates.append(-float(step["w"]))
    return np.array(rates)


def test_the_optimizer_applies_the_schedule_it_reports():
    cfg = _cfg(schedule="cosine", weight_decay=0.0, clip_norm=0.0, total_steps=30, warmup_steps=4)
    rates = _applied_rates(make_optimizer(cfg), 35)
    expected = [hand_lr(t, schedule="cosine", warmup=4, total=30) for t in range(35)]
    np.testing.assert_allclose(rates, expected, rtol=2e-6, atol=1e-12)  # measured 2.4e-7 relative (float32)


def test_rl_schedule_counts_optimizer_updates_not_rl_steps():
    """PPO/GRPO make epochs × minibatches updates per RL step: a linear decay over 10 RL steps × 4 updates reaches
    half the rate at update 20 and zero at update 40 (counted in RL steps it would be zero at update 10)."""
    optim = _cfg(schedule="linear", warmup_steps=0, final_lr_fraction=0.0, weight_decay=0.0, clip_norm=0.0)
    config = ml_collections.ConfigDict({"steps": 10, "optim": optim})
    rates = _applied_rates(onpolicy.update_optimizer(config, updates_per_step=4), 45)
    expected = [hand_lr(t, schedule="linear", warmup=0, total=40, final=0.0) for t in range(45)]
    # at the end lr + (0 − lr)·1 rounds to −4.5e-11 in float32 (1.5e-8 of lr), hence atol
    np.testing.assert_allclose(rates, expected, rtol=2e-6, atol=1e-7 * LR)
    assert rates[20] == pytest.approx(LR / 2, rel=1e-5) and abs(rates[40]) < 1e-7 * LR


def _no_decay_paths(params) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path) for path, decays in flat if not decays}


def test_weight_decay_skips_exactly_the_norm_scales_and_biases_of_the_model():
    _, params, _ = models.abstract_model(helpers.tiny_model_config(qkv_bias=True, tie_embeddings=False))
    assert _no_decay_paths(params) == {
        "final_norm/scale", "layers/attn_norm/scale", "layers/mlp_norm/scale",
        "layers/attn/q_bias", "layers/attn/k_bias", "layers/attn/v_bias"}  # embed, lm_head and kernels decay


def test_weight_decay_of_lora_and_adapter_leaves():
    """LoRA's A and B matrices and the adapters' down/up matrices decay; the adapters' biases do not, nor DoRA's
    magnitude vectors (a per-column norm, treated like a norm scale: optim.NO_DECAY_NAMES)."""
    config = helpers.tiny_model_config(tie_embeddings=False)
    dora = lora.LoraConfig(rank=4, targets=("q", "down", "lm_head"), variant="dora")
    lora_params = TrainableModel(config, dora).abstract_trainable["lora"]
    mask = decay_mask(lora_params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat == {f"{p}/{leaf}": leaf != "magnitude" for p in ("layers/attn/q", "layers/mlp/down", "lm_head")
                    for leaf in ("a", "b", "magnitude")}

    from flaxalign.models import adapters
    _, full, _ = models.abstract_model(helpers.tiny_model_config(adapter_placement="houlsby", adapter_names=("t",)))
    trained, _ = adapters.split_trainable(full)
    assert _no_decay_paths(trained) == {f"layers/adapters/t/{site}/{b}" for site in ("attn", "mlp")
                                        for b in ("down_bias", "up_bias")}


# A tree named like the model's, so the real decay mask applies: decayed (embed, q, lora a) and not (q_bias, scale).
SHAPES = {"embed": (6, 4), "layers": {"attn": {"q": (2, 4, 3), "q_bias": (2, 3)}, "attn_norm": {"scale": (2, 4)}},
          "lora": {"a": (4, 2)}}


def _numpy_adamw(params, grads_per_step, decays, *, lr_at, b1, b2, eps, weight_decay, clip):
    """AdamW in float64, written out: clip the whole gradient to global norm `clip`, Adam moments with bias
    correction, then p ← p − lr_t·(m̂/(√v̂ + ε) + wd·p) with the decay term only where `decays` (decoupled: the decay
    never enters the moments)."""
    p = [np.asarray(x, np.float64) for x in params]
    m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step):
        g = [np.asarray(x, np.float64) for x in grads]
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
        if norm > clip:
            g = [x * clip / norm for x in g]
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** (t + 1)), v[i] / (1 - b2 ** (t + 1))
            p[i] = p[i] - lr_at(t) * (m_hat / (np.sqrt(v_hat) + eps) + (weight_decay * p[i] if decays[i] else 0.0))
    return p


def test_three_adamw_steps_match_numpy_float64():
    """Step 0 has lr 0 (warmup) but moves the moments; the gradients' global norms are ≈ 8.3 and 15.7 (clipped to
    1) then 0.79 (not clipped); wd 0.1 with lr 0.1 moves the decayed leaves visibly. Leaving out the clipping, the
    mask or the warmup offset changes the result by 0.03–0.13; float32 against float64 differs by 1e-7."""
    cfg = helpers.optim_config(lr=0.1, warmup_steps=1, total_steps=6, schedule="cosine", final_lr_fraction=0.1,
                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    rng = np.random.default_rng(0)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=is_shape)
    grad_scales = [1.0, 2.0, 0.08]
    grads = [jax.tree.map(lambda s: (k * rng.normal(size=s)).astype(np.float32), SHAPES, is_leaf=is_shape)
             for k in grad_scales]
    assert optax_global_norm(grads[1]) > 1.0 > optax_global_norm(grads[2])

    optimizer = make_optimizer(cfg)
    state, current, update = optimizer.init(params), jax.tree.map(jnp.asarray, params), jax.jit(optimizer.update)
    for g in grads:
        updates, state = update(g, state, current)
        current = jax.tree.map(lambda p, u: p + u, current, updates)

    leaves, treedef = jax.tree.flatten(params)
    decays = jax.tree.leaves(decay_mask(params))
    assert decays.count(False) == 2  # q_bias and the norm scale
    expected = _numpy_adamw(leaves, [jax.tree.leaves(g) for g in grads], decays, b1=0.9, b2=0.95, eps=1e-8,
                            weight_decay=0.1, clip=1.0,
                            lr_at=lambda t: hand_lr(t, schedule="cosine", lr=0.1, warmup=1, total=6, final=0.1))
    for got, want, start in zip(jax.tree.leaves(current), expected, leaves):
        assert np.abs(want - start).max() > 0.05  # every leaf moved
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)  # measured 1.0e-7


def optax_global_norm(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree)))


def test_frozen_params_get_no_update_and_no_optimizer_state():
    """The train state keeps frozen params beside the trained ones: the optimizer state mirrors only the trained
    tree, and a gradient step whose loss uses both leaves the frozen ones bitwise unchanged."""
    trained = {"lora": {"a": jnp.full((5, 2), 0.1), "b": jnp.full((2, 7), 0.1)}}
    frozen = {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(5, 7)), jnp.float32)}
    optimizer = make_optimizer(helpers.optim_config(warmup_steps=0))
    state = create_state(trained, optimizer, seed=0, frozen=frozen)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted(2 * [(5, 2), (2, 7)])  # Adam's m and v of a and b only

    def loss_fn(params, frozen, batch, rng):
        weight = frozen["kernel"] + params["lora"]["a"] @ params["lora"]["b"]
        return jnp.sum((batch["x"] @ weight) ** 2), (jnp.float32(1.0), {})

    step = jax.jit(lambda s, b: gradient_step(loss_fn, s, b, optimizer=optimizer,
                                              schedule=learning_rate_schedule(helpers.optim_config(warmup_steps=0)),
                                              grad_accum=1))
    before = np.asarray(frozen["kernel"])
    for _ in range(2):
        state, _ = step(state, {"x": jnp.ones((3, 5))})
    np.testing.assert_array_equal(np.asarray(state.frozen["kernel"]), before)
    assert np.abs(np.asarray(state.params["lora"]["a"]) - 0.1).max() > 1e-3  # the trained ones moved


def test_a_lora_task_keeps_optimizer_state_for_the_adapters_only():
    """In the real LoRA task, the optimizer state holds two moments per trained value and nothing for the base."""
    lora_config = lora.LoraConfig(rank=4, targets="all-linear")
    task = helpers.clm_task(helpers.tiny_model_config(), lora_config=lora_config)
    state = jax.eval_shape(lambda p, f: create_state(p, task.optimizer, 0, f), task.abstract_params,
                           task.abstract_frozen)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    optimizer_values = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert optimizer_values == 2 * trained
    assert sum(x.size for x in jax.tree.leaves(state.frozen)) > 5 * trained  # the base is there, untouched

"""DPO-family stage: the step's log-probs and losses against an independent computation, the zero-copy LoRA /
adapter reference, precomputed reference log-probs, micro-batch and sharding invariance, and config errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import errors, models, sharding
from flaxalign.data.batching import left_pad_prompts, unstack_pairs
from flaxalign.losses import preference
from flaxalign.models import adapters
from flaxalign.peft import lora, quant
from flaxalign.policy import TrainableModel
from flaxalign.sampler import generate
from flaxalign.stages import dpo
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledEval, CompiledStep
from tests import helpers, rollout_reference
from tests.config_files import stage_config

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _naive_logps(config, params, batch):
    """Σ completion log-probs of each [chosen; rejected] row from full log-softmax logits (no chunking)."""
    graphdef, _, _ = models.abstract_model(config)
    rows = unstack_pairs(batch)
    logits = models.merge(graphdef, params).logits(rows["inputs"], rows["positions"], rows["segment_ids"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    picked = np.take_along_axis(np.asarray(logp), rows["targets"][..., None], axis=-1)[..., 0]
    return (picked * rows["completion_mask"]).sum(-1)


def _task(method=dpo.Method(), reference="copy", lora_config=None, config=CONFIG, grad_accum=1, init_reference=None,
          quant_config=None, optim=None):
    return dpo.make_task(TrainableModel(config, lora_config, quant_config), optim or helpers.optim_config(), method,
                         reference=reference, grad_accum=grad_accum, chunk_size=16, init_reference=init_reference)


def _state(task, mesh, tmp_path, name="ckpt"):
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(tmp_path, name)))
    return state, shardings


def _other_reference(shardings):
    return models.init_params(CONFIG, 7, shardings)


def test_step_loss_equals_dpo_formula_on_independent_logps(tmp_path):
    """A policy and a different reference: the eval loss and implicit rewards equal −log σ(β Δ) computed from
    full-softmax log-probs in float64."""
    task = _task(init_reference=_other_reference)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    batch = helpers.pair_batch()
    sums = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, batch))
    policy = _naive_logps(CONFIG, state.params, batch)
    ref = _naive_logps(CONFIG, state.frozen, batch)
    (pc, pr), (rc, rr) = np.split(policy, 2), np.split(ref, 2)
    delta = 0.1 * ((pc - rc) - (pr - rr))
    expected = np.log1p(np.exp(-delta))
    assert sums["count"] == 8
    np.testing.assert_allclose(sums["loss"] / 8, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(sums["rewards/margins"] / 8, delta.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums["pref_accuracy"] / 8, (pc > pr).mean())


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "orpo", "simpo"])
def test_length_normalised_losses_use_each_rows_completion_length(tmp_path, loss_type):
    task = _task(dpo.Method(loss_type=loss_type), reference="none" if loss_type in dpo.REFERENCE_FREE else "copy",
                 init_reference=None if loss_type in dpo.REFERENCE_FREE else _other_reference)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    batch = helpers.pair_batch(seed=3)
    sums = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, batch))
    lengths = np.split(unstack_pairs(batch)["completion_mask"].sum(-1), 2)
    assert not np.array_equal(*lengths)  # the case where per-token averaging matters
    policy = np.split(_naive_logps(CONFIG, state.params, batch), 2)
    avg = [p / n for p, n in zip(policy, lengths)]
    if loss_type == "simpo":  # −log σ(β(ā_c − ā_r) − γ), β = 0.1, γ = 0.5
        expected = np.log1p(np.exp(-(0.1 * (avg[0] - avg[1]) - 0.5)))
    elif loss_type == "orpo":  # −ā_c − β log σ(log odds)
        log_odds = (avg[0] - avg[1]) - (np.log(-np.expm1(avg[0])) - np.log(-np.expm1(avg[1])))
        expected = -avg[0] + 0.1 * np.log1p(np.exp(-log_odds))
    else:
        ref = np.split(_naive_logps(CONFIG, state.frozen, batch), 2)
        ref_avg = [r / n for r, n in zip(ref, lengths)]
        delta = (avg[0] - ref_avg[0]) - (avg[1] - ref_avg[1])
        expected = (delta - 1 / (2 * 0.1)) ** 2 if loss_type == "ipo" else np.log1p(np.exp(-0.1 * delta))
    np.testing.assert_allclose(sums["loss"] / 8, expected.mean(), rtol=2e-5)


ZERO_COPY = {
    "lora": dict(lora_config=LORA),
    "adapters": dict(config=dataclasses.replace(CONFIG, adapter_placement="houlsby", adapter_names=("task",),
                                                active_adapter="task")),
    "qlora": dict(lora_config=LORA, quant_config=quant.QuantConfig("nf4")),
}


@pytest.mark.parametrize("kind", ZERO_COPY)
def test_zero_copy_reference_gives_ln2_at_step_zero(tmp_path, kind):
    """The policy's adapters start as the identity, so with the adapters-off reference every log-ratio is 0 (up to
    the rounding of differently fused forward passes, ~1e-7) and the sigmoid loss is ln 2 to a float32 ulp — with
    no reference params beyond the frozen base (for QLoRA: the quantized base, a quarter of the float32 bytes)."""
    task = _task(reference="base", **ZERO_COPY[kind])
    policy_config = ZERO_COPY[kind].get("config", CONFIG)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    base = models.abstract_model(policy_config)[1]
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        base if kind != "adapters" else adapters.split_trainable(base)[1]))
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.frozen))
    if kind == "qlora":  # NF4 layers: 4.5 bits of 32 per quantized weight; embedding and norms stay float32
        assert frozen_bytes < 0.6 * base_bytes
    else:
        assert frozen_bytes == base_bytes  # frozen = one base, no reference copy
    _, metrics = CompiledStep(task.train_step, mesh, shardings)(state, helpers.pair_batch())
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2.0), rtol=2e-7)
    assert abs(float(metrics["rewards/margins"])) < 1e-6


def test_a_tiny_qlora_dpo_run_learns(tmp_path):
    """NF4 base + LoRA r=8, 40 updates on 8 fixed pairs: the training pairs' preference accuracy (by the implicit
    reward) rises from chance to above 0.9 and the loss falls below 0.5, with the quantized base untouched."""
    lora_config = lora.LoraConfig(rank=8, alpha=16.0)
    task = _task(reference="base", lora_config=lora_config, quant_config=quant.QuantConfig("nf4"),
                 optim=helpers.optim_config(lr=2e-2, warmup_steps=0, total_steps=40, schedule="constant"))
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    frozen = jax.tree.map(np.asarray, state.frozen)
    step = CompiledStep(task.train_step, mesh, shardings)
    batch = helpers.pair_batch(num_pairs=8, seed=11)
    history = []
    for _ in range(40):
        state, metrics = step(state, batch)
        history.append((float(metrics["loss"]), float(metrics["rewards/accuracies"])))
    assert history[0][1] <= 0.5 and history[-1][1] > 0.9 and history[-1][0] < 0.5, history[::8]
    for after, before in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(after), before)


def test_precomputed_reference_equals_reference_forward(tmp_path):
    mesh = helpers.mesh((1, 1, 1))
    task = _task(init_reference=_other_reference)
    state, shardings = _state(task, mesh, str(tmp_path))
    batch = helpers.pair_batch(num_pairs=8, seed=5)
    stored = dpo.precompute_reference_logps(batch, weights=state.frozen,
                                            forward=TrainableModel(CONFIG).reference_forward,
                                            mesh=mesh, batch_size=3, chunk_size=16)  # 3 ∤ 8: the wrap-around batch
    np.testing.assert_allclose(stored, np.stack(np.split(_naive_logps(CONFIG, state.frozen, batch), 2), 1),
                               rtol=1e-5)
    pre_task = _task(reference="precomputed")
    pre_state = state.replace(frozen={})
    _, pre_shardings = _state(pre_task, mesh, str(tmp_path), "pre")
    on_the_fly = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, batch))
    precomputed = jax.device_get(CompiledEval(pre_task.eval_step, mesh, pre_shardings)(
        pre_state, {**batch, "ref_logps": stored}))
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(precomputed[key], on_the_fly[key], rtol=1e-5, atol=1e-6)


def test_qlora_precomputed_reference_scores_the_quantized_base(tmp_path):
    """QLoRA with reference="precomputed": the stored log-probs are those of the quantized base with adapters off —
    what the "base" reference computes during training — so at init the loss is ln 2, as with reference="base"
    (a float32 reference would carry the quantisation error into every log-ratio)."""
    mesh = helpers.mesh((1, 1, 1))
    policy = TrainableModel(CONFIG, LORA, quant.QuantConfig("nf4"))
    batch = helpers.pair_batch(num_pairs=8, seed=5)
    data = dataclasses.make_dataclass("Data", ["train", "eval", "stats"])(batch, batch, {"pairs": 8})
    float_init = lambda shardings: jax.device_put(helpers.random_params(CONFIG), shardings)  # noqa: E731
    config = stage_config("dpo", {"data.batch_size": 8})
    ref = dpo.attach_reference_logps(data, workdir=str(tmp_path), reference_path="", policy=policy, mesh=mesh,
                                     config=config, init_base=float_init)
    task = dpo.make_task(policy, helpers.optim_config(), dpo.Method(), reference="precomputed", chunk_size=16,
                         init_base=float_init)
    state, shardings = _state(task, mesh, str(tmp_path))
    sums = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, {**batch, "ref_logps": ref["train"]}))
    np.testing.assert_allclose(sums["loss"] / 8, np.log(2.0), rtol=1e-6)  # separately compiled: ~2.6e-7 apart
    float_ref = dpo.precompute_reference_logps(batch, weights=helpers.random_params(CONFIG), mesh=mesh,
                                               forward=TrainableModel(CONFIG).reference_forward, batch_size=8,
                                               chunk_size=16)
    assert np.abs(float_ref - ref["train"]).max() > 1e-3  # the quantisation error the float reference would add


def _one_update(tmp_path, task_kwargs, batch, grad_accum, shape):
    task = _task(grad_accum=grad_accum, **task_kwargs)
    mesh = helpers.mesh(shape)
    state, shardings = _state(task, mesh, str(tmp_path), f"{grad_accum}-{shape}")
    state, metrics = CompiledStep(task.train_step, mesh, shardings)(state, sharding.global_batch(batch, mesh))
    return jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


CASES = {
    "sigmoid-copy": ({"init_reference": _other_reference}, False),
    "sigmoid-lora": ({"reference": "base", "lora_config": LORA}, False),
    "kto-copy": ({"method": dpo.Method(loss_type="kto"), "init_reference": _other_reference}, True),
}


@pytest.mark.parametrize("case", CASES)
def test_micro_batches_and_sharding_give_the_same_update(tmp_path, case):
    kwargs, kto = CASES[case]
    batch = helpers.pair_batch(num_pairs=8, kto=kto)
    params, metrics = _one_update(tmp_path, kwargs, batch, 1, (1, 1, 1))
    for grad_accum, shape in ((2, (2, 1, 2)), (1, (2, 2, 2)), (4, (2, 1, 1))):
        other_params, other_metrics = _one_update(tmp_path, kwargs, batch, grad_accum, shape)
        for key in ("loss", "grad_norm", "rewards/margins" if not kto else "rewards", "kl" if kto else "loss"):
            np.testing.assert_allclose(other_metrics[key], metrics[key], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{key}: grad_accum={grad_accum} mesh={shape}")
        for a, b in zip(jax.tree.leaves(other_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kto_anchor_is_the_mean_log_ratio_of_mismatched_rows(tmp_path):
    task = _task(dpo.Method(loss_type="kto"), init_reference=_other_reference)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    batch = helpers.pair_batch(kto=True)
    sums = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, batch))
    kl_rows = {k: np.concatenate([v[:, 1:2], v[:, 1:2]], axis=1) for k, v in batch.items() if k != "label"}
    policy = np.split(_naive_logps(CONFIG, state.params, kl_rows), 2)[0]
    ref = np.split(_naive_logps(CONFIG, state.frozen, kl_rows), 2)[0]
    np.testing.assert_allclose(sums["kl"] / sums["count"], max(0.0, (policy - ref).mean()), rtol=1e-4, atol=1e-6)


def test_sampled_kl_is_zero_when_policy_equals_reference(tmp_path):
    task = _task(reference="base", lora_config=LORA)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path))
    prompts = {"input_ids": np.array([[0, 5, 6, 7], [8, 9, 10, 11]], np.int32),
               "attention_mask": np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32),
               "positions": np.array([[0, 0, 1, 2], [0, 1, 2, 3]], np.int32)}
    m = dpo.Models(TrainableModel(CONFIG, LORA), "base", 16)
    out = dpo.SampledKlEval(m, prompts=prompts, mesh=mesh, seed=0, max_new_tokens=6, eos_id=2, pad_id=0)(state)
    assert out["kl"] == 0.0 and out["response_length"] > 0


KL_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]


def _distant_reference(shardings):
    """A reference of another seed and 4× the init scale: its next-token distributions are far from uniform, so
    the KL to the policy is large and differs from position to position."""
    return models.init_params(dataclasses.replace(CONFIG, init_std=0.08), 7, shardings)


def test_sampled_kl_equals_full_softmax_kl_of_each_response(tmp_path):
    """Policy ≠ reference (another seed and init scale): `sampled_kl` sums, over the sampled responses' tokens up
    to and including each EOS, the float64 full-softmax KL(π‖π_ref) of the two models run on each row alone
    (prompt without its left padding, response cut after the EOS). The responses are drawn again with the same
    rng, and their lengths must match the `response_length` it reports."""
    task = _task(init_reference=_distant_reference)
    mesh = helpers.mesh((1, 1, 1))
    state, _ = _state(task, mesh, str(tmp_path))
    graphdef = models.abstract_model(CONFIG)[0]
    prompts = left_pad_prompts(KL_PROMPTS, pad_id=0)
    sample = jax.jit(lambda params, eos_id: generate(models.merge(graphdef, params), prompts, jax.random.PRNGKey(0),
                                                     max_new_tokens=6, eos_id=eos_id, pad_id=0))
    eos_id = int(sample(state.params, np.int32(-1))["response"][0, 2])  # row 0 ends by its third token
    responses = jax.device_get(sample(state.params, np.int32(eos_id)))["response"]
    m = dpo.Models(TrainableModel(CONFIG), "copy", 16)
    # the evaluation's own path (the policy's sampler at temperature 1, rng PRNGKey(seed)); means over the prompts
    out = dpo.SampledKlEval(m, prompts=prompts, mesh=mesh, seed=0, max_new_tokens=6, eos_id=eos_id, pad_id=0)(state)
    out = {k: v * len(KL_PROMPTS) for k, v in out.items()}
    rows = [rollout_reference.unpadded_row(p, r, eos_id) for p, r in zip(KL_PROMPTS, responses)]
    lengths = [len(row) - len(p) for row, p in zip(rows, KL_PROMPTS)]
    assert min(lengths) <= 3 and max(lengths) == 6, lengths  # rows cut at their EOS and rows without one
    assert out["response_length"] == sum(lengths)
    kl = rollout_reference.response_token_kl(CONFIG, jax.device_get(state.params), jax.device_get(state.frozen),
                                             rows, [len(p) for p in KL_PROMPTS])
    expected = sum(row_kl.sum() for row_kl in kl)
    assert expected > 0.1
    np.testing.assert_allclose(float(out["kl"]), expected, rtol=4e-6)  # measured: 3.5e-7 relative


def test_bad_method_settings_fail_with_one_sentence():
    with pytest.raises(errors.ConfigError, match="unknown loss_type 'dpo2'; valid: sigmoid, robust, .*kto"):
        dpo.Method(loss_type="dpo2")
    with pytest.raises(errors.ConfigError, match="beta must be > 0"):
        dpo.Method(beta=0.0)
    with pytest.raises(errors.ConfigError, match="'exo_pair' needs 0 < label_smoothing < 1"):
        dpo.Method(loss_type="exo_pair")
    with pytest.raises(errors.ConfigError, match="discopop_tau must be > 0"):
        dpo.Method(loss_type="discopop", hyper=(("discopop_tau", 0.0),))
    with pytest.raises(errors.ConfigError, match="Unknown DPO hyper-parameter gamma; known: label_smoothing, "):
        dpo.Method(hyper=(("gamma", 1.0),))


def test_the_resume_identity_reads_back_equal_from_json():
    """A checkpoint's metadata is JSON: the identity a resume compares must survive the round trip (a tuple of
    hyper-parameter pairs would come back as lists and refuse every resume). The DPO family's own fields stay flat,
    under the names runs saved before the registry."""
    task = _task(dpo.Method(loss_type="discopop", hyper=(("discopop_tau", 0.1),)))
    identity = task.metadata["resume_identity"]
    assert json.loads(json.dumps(identity)) == identity
    assert identity["loss"]["discopop_tau"] == 0.1 and identity["loss"]["label_smoothing"] == 0.0
    # rpo_alpha joins the identity only when set: runs saved before it existed resume, and turning it on is a change
    assert "rpo_alpha" not in identity["loss"]
    assert _task(dpo.Method(rpo_alpha=0.5)).metadata["resume_identity"]["loss"]["rpo_alpha"] == 0.5


def test_a_new_dpo_family_loss_is_its_function_and_one_registration(monkeypatch):
    """What adding a DPO-family loss with its own hyper-parameter takes: the function and one registry entry in
    `losses/preference.py` (stood in for here by monkeypatching the registry and the defaults its registration fills).
    The config's `loss` block then has the field, `make_method` and `Method` carry it, and `dpo_loss` gets it: no
    stage or config file changes."""
    def scaled_sigmoid(p, h):
        return -jax.nn.log_sigmoid(h.beta * h.scale * (p.chosen - p.rejected))

    monkeypatch.setitem(preference.DPO_LOSSES._entries, "scaled_sigmoid",
                        preference.PairLoss(scaled_sigmoid, {"scale": 2.0}))
    monkeypatch.setitem(preference.DPO_HYPER_DEFAULTS, "scale", 2.0)
    assert stage_config("dpo").loss.scale == 2.0
    method = dpo.make_method(stage_config("dpo", {"loss.loss_type": "scaled_sigmoid", "loss.scale": 3.0}))
    chosen, rejected = jnp.array([-4.0, -2.0]), jnp.array([-3.0, -6.0])
    zeros = jnp.zeros(2)
    ours, _ = preference.dpo_loss(chosen, rejected, zeros, zeros, beta=method.beta, loss_type=method.loss_type,
                                  **method.dpo_hyper)
    expected, _ = preference.dpo_loss(chosen, rejected, zeros, zeros, beta=3.0 * method.beta)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert not np.allclose(ours, preference.dpo_loss(chosen, rejected, zeros, zeros, beta=method.beta)[0])


def test_training_flops_count_the_reference_passes():
    assert dpo.training_passes(dpo.Method(), "copy") == pytest.approx(8 / 6)
    assert dpo.training_passes(dpo.Method(), "precomputed") == 1.0
    assert dpo.training_passes(dpo.Method(loss_type="kto"), "base") == 1.0
    assert jnp.isfinite(dpo.training_passes(dpo.Method(loss_type="orpo"), "none"))


def test_token_kl_equals_the_full_vocabulary_sum():
    from flaxalign.losses.lm import chunked_token_kl

    rng = np.random.default_rng(0)
    h, w = rng.normal(size=(2, 7, 8)).astype(np.float32), rng.normal(size=(8, 11)).astype(np.float32)
    h_ref, w_ref = rng.normal(size=(2, 7, 6)).astype(np.float32), rng.normal(size=(6, 11)).astype(np.float32)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logp, logq = log_softmax(h.astype(np.float64) @ w), log_softmax(h_ref.astype(np.float64) @ w_ref)
    expected = (np.exp(logp) * (logp - logq)).sum(-1)
    np.testing.assert_allclose(np.asarray(chunked_token_kl(h, w, h_ref, w_ref, chunk_size=3)), expected, rtol=1e-5)
    assert float(jnp.max(jnp.abs(chunked_token_kl(h, w, h, w, chunk_size=4)))) == 0.0


def test_rpo_adds_alpha_times_the_chosen_nll_per_token(tmp_path):
    """RPO = the DPO loss + α · (−Σ chosen log-probs / chosen tokens), mean over pairs, from float64 log-probs."""
    task = _task(method=dpo.Method(rpo_alpha=0.5), init_reference=_other_reference)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    batch = helpers.pair_batch()
    sums = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, batch))
    policy, ref = _naive_logps(CONFIG, state.params, batch), _naive_logps(CONFIG, state.frozen, batch)
    (pc, pr), (rc, rr) = np.split(policy, 2), np.split(ref, 2)
    chosen_tokens = unstack_pairs(batch)["completion_mask"].sum(-1)[:len(pc)]
    nll = -pc / chosen_tokens
    expected = np.log1p(np.exp(-0.1 * ((pc - rc) - (pr - rr)))) + 0.5 * nll
    np.testing.assert_allclose(sums["loss"] / 8, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(sums["nll_loss"] / 8, nll.mean(), rtol=1e-5)
    with pytest.raises(errors.ConfigError, match="rpo_alpha"):
        dpo.Method(loss_type="kto", rpo_alpha=1.0)
    with pytest.raises(errors.ConfigError, match="rpo_alpha"):
        dpo.Method(rpo_alpha=-1.0)

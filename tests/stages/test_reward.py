"""Reward model: the score is read at each sequence's last real token, the loss is Bradley–Terry on those scores,
the head's initialisation, LoRA on a frozen backbone without LM head, micro-batch and sharding invariance."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from flaxalign import models, sharding, weights
from flaxalign.data.batching import preference_batch, stack_pairs, unstack_pairs
from flaxalign.models import heads
from flaxalign.peft import lora, quant
from flaxalign.policy import UNUSED_BY_SCALAR, ScalarModel, TrainableModel
from flaxalign.stages import reward
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledEval, CompiledStep
from tests import helpers

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _rm(lora_config=None, quant_config=None, config=CONFIG) -> ScalarModel:
    return ScalarModel(TrainableModel(config, lora_config, quant_config, drop=UNUSED_BY_SCALAR))


def _task(lora_config=None, grad_accum=1, center_coef=0.0, quant_config=None):
    return reward.make_task(_rm(lora_config, quant_config), helpers.optim_config(), grad_accum=grad_accum,
                            center_coef=center_coef)


def _state(task, mesh, tmp_path, name="ckpt"):
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(tmp_path, name)))
    return state, shardings


def test_full_sequences_recover_the_token_sequences():
    pairs = [([1, 5, 6], [7, 8, 2], [9, 2]), ([1, 4], [10, 11, 12, 2], [13, 2])]
    seqs = jax.device_get(reward.full_sequences(unstack_pairs(stack_pairs(preference_batch(pairs, 8, pad_id=0)))))
    for row, tokens in enumerate([p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]):
        n = len(tokens)
        assert list(seqs["tokens"][row, :n]) == tokens and seqs["mask"][row].tolist() == [1] * n + [0] * (9 - n)
        assert list(seqs["positions"][row, :n]) == list(range(n))


def test_score_is_the_head_on_the_last_real_token():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    head = {"kernel": rng.normal(size=4).astype(np.float32), "bias": np.float32(0.5)}
    scores = np.asarray(heads.sequence_scores(hidden, mask, head))
    expected = [hidden[0, 2] @ head["kernel"] + 0.5, hidden[1, 5] @ head["kernel"] + 0.5,
                hidden[2, 0] @ head["kernel"] + 0.5]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_head_initialisation():
    head = heads.init_scalar_head(1023, seed=0)
    assert float(head["bias"]) == 0.0
    assert abs(float(np.std(head["kernel"])) - 1 / 32) < 0.003
    assert not np.any(np.asarray(heads.init_scalar_head(64, seed=0, std=0.0)["kernel"]))


def test_loss_is_bradley_terry_of_independently_computed_scores(tmp_path):
    task = _task(center_coef=0.01)
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path))
    batch = helpers.pair_batch(seed=2)
    batch["margin"] = np.linspace(-1.0, 2.0, 8).astype(np.float32)  # TRL's per-pair margin column
    sums = jax.device_get(CompiledEval(task.eval_step, mesh, shardings)(state, batch))
    rows = unstack_pairs({k: v for k, v in batch.items() if k != "margin"})
    graphdef, _, _ = models.abstract_model(CONFIG)
    scores = []
    for i in range(16):  # one unpadded sequence at a time: no masks involved
        n = int(rows["attention_mask"][i].sum()) + 1
        tokens = np.concatenate([rows["inputs"][i, :1], rows["targets"][i, : n - 1]])[None]
        params = heads.with_unused_lm_head(state.params["model"], CONFIG)
        hidden = np.asarray(models.merge(graphdef, params)(tokens), np.float64)[0, -1]
        scores.append(hidden @ np.asarray(state.params["head"]["kernel"], np.float64)
                      + float(state.params["head"]["bias"]))
    chosen, rejected = np.split(np.array(scores), 2)
    expected = np.log1p(np.exp(-(chosen - rejected - batch["margin"]))) + 0.01 * (chosen + rejected) ** 2
    np.testing.assert_allclose(sums["loss"] / 8, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(sums["accuracy"] / 8, (chosen > rejected).mean())


def test_lora_reward_model_freezes_a_backbone_without_lm_head(tmp_path):
    task = _task(lora_config=LORA)
    state, _ = _state(task, helpers.mesh((1, 1, 1)), str(tmp_path))
    assert "lm_head" not in state.frozen and "embed" in state.frozen
    assert set(state.params) == {"model", "head"} and set(state.params["model"]) == {"lora", "saved"}


def _one_update(tmp_path, lora_config, batch, grad_accum, shape):
    task = _task(lora_config=lora_config, grad_accum=grad_accum)
    mesh = helpers.mesh(shape)
    state, shardings = _state(task, mesh, str(tmp_path), f"{grad_accum}-{shape}")
    state, metrics = CompiledStep(task.train_step, mesh, shardings)(state, sharding.global_batch(batch, mesh))
    return jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


@pytest.mark.parametrize("lora_config", [None, LORA], ids=["full", "lora"])
def test_micro_batches_and_sharding_give_the_same_update(tmp_path, lora_config):
    batch = helpers.pair_batch(num_pairs=8)
    params, metrics = _one_update(tmp_path, lora_config, batch, 1, (1, 1, 1))
    for grad_accum, shape in ((2, (2, 1, 2)), (1, (2, 2, 2)), (4, (2, 1, 1))):
        other_params, other_metrics = _one_update(tmp_path, lora_config, batch, grad_accum, shape)
        for key in ("loss", "grad_norm", "accuracy", "margin"):
            np.testing.assert_allclose(other_metrics[key], metrics[key], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{key}: grad_accum={grad_accum} mesh={shape}")
        for a, b in zip(jax.tree.leaves(other_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


ADAPTERS = dataclasses.replace(CONFIG, adapter_placement="pfeiffer", adapter_names=("rm",), active_adapter="rm")
SAVED_RUNS = {"full": (None, None, CONFIG), "lora": (LORA, None, CONFIG),
              "qlora": (LORA, quant.QuantConfig("nf4"), CONFIG),
              "adapters": (None, None, ADAPTERS)}


@pytest.mark.parametrize("kind", SAVED_RUNS)
def test_trained_reward_model_loads_a_saved_run_for_scoring(tmp_path, kind):
    """What PPO/GRPO/eval load from a reward run (`weights.reward_from`: LoRA merged into the backbone, a quantized
    base dequantized, adapter sets kept with the run's active set) scores like the trained state."""
    lora_config, quant_config, config = SAVED_RUNS[kind]
    rm = _rm(lora_config, quant_config, config)
    task = reward.make_task(rm, helpers.optim_config())
    mesh = helpers.mesh((1, 1, 1))
    state, shardings = _state(task, mesh, str(tmp_path), "train")
    state, _ = CompiledStep(task.train_step, mesh, shardings)(state, helpers.pair_batch(num_pairs=8))
    if kind == "adapters":  # the adapters' up-projections start at 0: give them weight so that they show
        state = state.replace(params=jax.tree.map(lambda x: x + 0.05, state.params))
    run = os.path.join(str(tmp_path), "run")
    checkpointer = Checkpointer(os.path.join(run, "checkpoints"))
    checkpointer.save(1, state, {"batches_consumed": 1}, task.metadata)
    checkpointer.close()

    rm_config, abstract, logical, load = weights.reward_from(run, {}, CONFIG)
    assert rm_config == config
    params = load(sharding.tree_shardings(logical, abstract, mesh))
    seqs = reward.full_sequences(unstack_pairs(helpers.pair_batch(num_pairs=4, seed=3)))
    args = (seqs["tokens"], seqs["mask"], seqs["positions"])
    trained = rm.sequence_scores(state.params, state.frozen, *args)
    loaded = ScalarModel(TrainableModel(rm_config, drop=UNUSED_BY_SCALAR)).sequence_scores(params, {}, *args)
    assert np.std(np.asarray(trained)) > 1e-3  # scores that differ between sequences
    np.testing.assert_allclose(loaded, trained, rtol=1e-4, atol=1e-5)
    if kind == "adapters":  # the adapter sets are in what was loaded, and they change the scores
        off = dataclasses.replace(config, active_adapter="")
        without = ScalarModel(TrainableModel(off, drop=UNUSED_BY_SCALAR)).sequence_scores(params, {}, *args)
        assert np.abs(np.asarray(without) - np.asarray(loaded)).max() > 1e-3

"""Two methods nothing else trains through their stage: a DoRA SFT run and a CPO run of the DPO stage, each built by
the stage's own `build_task` from its config file (the path `flaxalign train` takes), trained a few steps on one
batch, with the structural facts that make them what they are: DoRA's magnitude vectors are trained and saved, CPO
holds no reference model and its loss is the closed form of its paper."""

import os

import jax
import numpy as np
import pytest

from flaxalign import models, sharding
from flaxalign.data.batching import unstack_pairs
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.stages import dpo, sft
from flaxalign.train import checkpoint, loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from tests import helpers
from tests.config_files import stage_config


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer.train(stdlib_corpus(max_chars=100_000), str(path), vocab_size=512).model_path


def _train_on_one_batch(task, mesh, workdir, steps=4):
    """(initial state as numpy, final state, shardings, the batch, per-step losses) of `steps` updates on the task's
    first batch."""
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(workdir, "unused")))
    start = jax.tree.map(np.asarray, state)
    batch = sharding.global_batch(next(task.train_data), mesh)
    step = CompiledStep(task.train_step, mesh, shardings)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return start, state, shardings, batch, losses


def test_dora_sft_trains_its_magnitudes_and_saves_them(tokenizer_path, tmp_path):
    """DoRA (Liu et al. 2024): W' = m ⊙ (W + s·BA) / ‖W + s·BA‖, m starting at ‖W‖. The magnitudes are
    trained params (they move, Adam has moments for them), the base stays bitwise frozen, the loss falls, and
    the checkpoint holds the trained magnitudes and says variant=dora."""
    config = stage_config("sft", {
        "data.tokenizer": tokenizer_path, "data.train": "builtin:arithmetic_sft?n=40", "data.seq_len": 64,
        "data.batch_size": 8, "lora.rank": 4, "lora.variant": "dora", "lora.targets": "layers/attn/(q|v)",
        "optim.warmup_steps": 0})
    mesh = helpers.mesh((1, 1, 1))
    task = sft.build_task(config, str(tmp_path), mesh)
    start, state, shardings, batch, losses = _train_on_one_batch(task, mesh, str(tmp_path))

    adapters = state.params["lora"]["layers"]["attn"]
    assert set(adapters) == {"q", "v"} and all(set(a) == {"a", "b", "magnitude"} for a in adapters.values())
    for name in ("q", "v"):
        before = start.params["lora"]["layers"]["attn"][name]["magnitude"]
        # the magnitudes start as the base's column norms ‖W‖ over the input axis (measured relative error 9e-8)
        kernel = np.asarray(start.frozen["layers"]["attn"][name], np.float64)
        np.testing.assert_allclose(before, np.linalg.norm(kernel, axis=1), rtol=1e-6)
        assert np.abs(np.asarray(adapters[name]["magnitude"]) - before).max() > 0, f"{name} magnitude not trained"
        moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == adapters[name]["magnitude"].shape]
        assert len(moments) == 2, f"Adam's mu and nu of the {name} magnitude"
    for after, before in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(start.frozen)):
        np.testing.assert_array_equal(np.asarray(after), before)  # the base is frozen
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses

    save_dir = str(tmp_path / "run")
    saver = Checkpointer(os.path.join(save_dir, "checkpoints"))
    saver.save(len(losses), state, task.train_data.get_state(), task.metadata)
    saver.close()
    assert checkpoint.read_metadata(save_dir)["lora"]["variant"] == "dora"
    restored = checkpoint.load_params(save_dir, task.abstract_params, shardings.params)
    for name in ("q", "v"):
        np.testing.assert_array_equal(np.asarray(restored["lora"]["layers"]["attn"][name]["magnitude"]),
                                      np.asarray(adapters[name]["magnitude"]))


def _completion_logps(model_config, params, batch):
    """Σ completion log-probs and completion lengths of each [chosen; rejected] row, from full float64
    log-softmax logits (no chunking, no stage code)."""
    graphdef, _, _ = models.abstract_model(model_config)
    rows = {k: np.asarray(v) for k, v in unstack_pairs(jax.device_get(batch)).items()}
    logits = models.merge(graphdef, params).logits(rows["inputs"], rows["positions"], rows["segment_ids"])
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, rows["targets"][..., None], axis=-1)[..., 0]
    return (picked * rows["completion_mask"]).sum(-1), rows["completion_mask"].sum(-1)


def test_cpo_dpo_stage_builds_no_reference_and_its_loss_is_the_paper_formula(tokenizer_path, tmp_path):
    """CPO (Xu et al. 2024): L = −log σ(β(log π(y_c) − log π(y_r))) + α·NLL(y_c), NLL the chosen completion's
    per-token mean; no reference model is built even though `reference` asks for a copy."""
    beta, alpha = 0.1, 1.0
    config = stage_config("dpo", {
        "data.tokenizer": tokenizer_path, "data.train": "builtin:arithmetic_preferences?n=40", "data.seq_len": 48,
        "data.batch_size": 8, "loss.loss_type": "cpo", "loss.beta": beta, "loss.cpo_alpha": alpha,
        "reference": "copy", "optim.lr": 3e-3, "optim.warmup_steps": 0})
    mesh = helpers.mesh((1, 1, 1))
    task = dpo.build_task(config, str(tmp_path), mesh)
    assert task.metadata["reference"] == "none" and task.abstract_frozen == {}
    assert task.eval_extra is None, "the sampled KL to a reference needs a reference"
    start, state, _, batch, losses = _train_on_one_batch(task, mesh, str(tmp_path))
    assert jax.tree.leaves(state.frozen) == []  # one model in memory: the policy

    logps, lengths = _completion_logps(models.ModelConfig.from_dict(task.metadata["model"]), start.params, batch)
    (chosen, rejected), (chosen_len, _) = np.split(logps, 2), np.split(lengths, 2)
    expected = np.log1p(np.exp(-beta * (chosen - rejected))) + alpha * (-chosen / chosen_len)
    # the first step's loss is that of the starting params; measured relative error 3e-8 (float32 chunked
    # log-softmax against float64)
    np.testing.assert_allclose(losses[0], expected.mean(), rtol=1e-6)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses

"""SFT: completion-only and assistant-only loss, LoRA on a frozen base, and the SFT run from a CLM checkpoint."""

import functools

import jax
import numpy as np
import pytest

from flaxalign import models, sharding
from flaxalign.data.batching import pack_sft
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.sft_data import sft_example
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.peft import lora
from flaxalign.policy import TrainableModel
from flaxalign.stages import sft
from tests import helpers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer.train(stdlib_corpus(max_chars=200_000), str(path), vocab_size=512)


def _loss(params, batch, lora_config=None, frozen=None):
    policy = TrainableModel(helpers.tiny_model_config(), lora_config)
    loss_sum, (count, _) = jax.jit(functools.partial(sft.sft_loss, policy=policy, chunk_size=16))(
        params, frozen or {}, batch, None)
    return float(loss_sum), float(count)


def _changed_labels(batch, where):
    """The batch with the target tokens at `where` replaced by other ids."""
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][where] = (changed["targets"][where] + 7) % 500 + 4
    return changed


def _check_only_masked_tokens_count(tokenizer, records, template="plain"):
    examples = [sft_example(r, tokenizer, template) for r in records]
    batch = pack_sft(examples, 128, pad_id=tokenizer.pad_id)
    params = models.init_params(helpers.tiny_model_config(), 0)
    loss, count = _loss(params, batch)
    assert count == sum(sum(mask[1:]) for _, mask in examples)  # each trained token once (the first is never a target)
    outside = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
    assert outside.any()
    assert _loss(params, _changed_labels(batch, outside)) == (loss, count), "non-trained labels changed the loss"
    inside = batch["loss_mask"] > 0
    assert _loss(params, _changed_labels(batch, inside))[0] != loss
    return examples


def test_prompt_tokens_do_not_contribute(tokenizer):
    records = [{"prompt": "What does `len(obj)` do?", "completion": " Return the number of items."},
               {"prompt": "What is 2 + 3?", "completion": " The answer is 5."}]
    examples = _check_only_masked_tokens_count(tokenizer, records)
    ids, mask = examples[0]
    prompt_len = 1 + len(tokenizer.encode(records[0]["prompt"]))  # bos + prompt
    assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len) and ids[-1] == tokenizer.eos_id


def test_multi_turn_only_assistant_tokens_contribute(tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5."},
                {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8."}]
    examples = _check_only_masked_tokens_count(tokenizer, [{"messages": messages}])
    ids, mask = examples[0]
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m and i != tokenizer.eos_id])
    assert trained == " 5. 8."


def _lora_task(rank=4):
    config = helpers.tiny_model_config()
    lora_config = lora.LoraConfig.from_dict(dict(rank=rank, alpha=8.0, targets="all-linear"))
    return sft.make_task(TrainableModel(config, lora_config), helpers.optim_config(warmup_steps=0),
                         chunk_size=16), lora_config


def test_lora_sft_trains_only_the_adapters(tmp_path):
    from flaxalign.train import loop
    from flaxalign.train.checkpoint import Checkpointer
    from flaxalign.train.jit import CompiledStep

    task, lora_config = _lora_task()
    mesh = helpers.mesh((2, 2, 2))
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(str(tmp_path / "ckpt")))
    base = jax.tree.map(np.asarray, state.frozen)
    batch = helpers.packed_batch()
    # at init the adapted model is the base model
    loss_lora, _ = _loss(state.params, batch, lora_config, state.frozen)
    assert loss_lora == _loss(state.frozen, batch)[0]
    step = CompiledStep(task.train_step, mesh, shardings)
    losses = []
    for i in range(3):
        state, metrics = step(state, sharding.global_batch(helpers.packed_batch(seed=i % 1), mesh))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for after, before in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(after), before)  # the base is bitwise unchanged
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(state.params["lora"]) if b.ndim >= 2)
    n_lora = sum(x.size for x in jax.tree.leaves(state.params))
    n_base = sum(x.size for x in jax.tree.leaves(state.frozen))
    assert n_lora < 0.2 * n_base


def test_lora_in_activation_space_equals_lora_merged_into_the_whole_tree():
    config = helpers.tiny_model_config(tie_embeddings=False)
    lora_config = lora.LoraConfig.from_dict(dict(rank=4, alpha=8.0, targets=["q", "v", "down", "lm_head"]))
    _, _, logical = models.abstract_model(config)
    base = models.init_params(config, 0)
    adapters, _ = lora.init_lora(base, logical, lora_config, jax.random.PRNGKey(1))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B ≠ 0, so the adapters change the output
    batch = helpers.packed_batch()
    per_layer = jax.jit(functools.partial(sft.sft_loss, policy=TrainableModel(config, lora_config), chunk_size=16))
    whole_tree = jax.jit(functools.partial(sft.sft_loss, policy=TrainableModel(config), chunk_size=16))
    got, _ = per_layer({"lora": adapters, "saved": {}}, base, batch, None)
    expected, _ = whole_tree(lora.apply_lora(base, adapters, lora_config), {}, batch, None)
    assert got == pytest.approx(float(expected), rel=1e-6)
    assert got != pytest.approx(float(whole_tree(base, {}, batch, None)[0]), rel=1e-5)


def test_modules_to_save_are_trained_fully_beside_the_adapters(tmp_path):
    from flaxalign.train import loop
    from flaxalign.train.checkpoint import Checkpointer
    from flaxalign.train.jit import CompiledStep

    config = helpers.tiny_model_config(tie_embeddings=False)
    lora_config = lora.LoraConfig.from_dict(
        dict(rank=4, alpha=8.0, targets="all-linear", modules_to_save=["lm_head"]))
    task = sft.make_task(TrainableModel(config, lora_config), helpers.optim_config(warmup_steps=0), chunk_size=16)
    mesh = helpers.mesh((2, 2, 2))
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(str(tmp_path / "ckpt")))
    head = np.asarray(state.frozen["lm_head"])
    np.testing.assert_array_equal(np.asarray(state.params["saved"]["lm_head"]), head)  # starts as the base's
    step = CompiledStep(task.train_step, mesh, shardings)
    state, _ = step(state, sharding.global_batch(helpers.packed_batch(), mesh))
    assert np.abs(np.asarray(state.params["saved"]["lm_head"]) - head).max() > 0  # the trained copy moved
    np.testing.assert_array_equal(np.asarray(state.frozen["lm_head"]), head)  # the base did not
    adam_moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == head.shape]
    assert len(adam_moments) == 2  # the optimizer state covers the saved module (mu and nu)


def test_adapter_sft_trains_only_the_adapters(tmp_path):
    from flaxalign.models import adapters
    from flaxalign.train import loop
    from flaxalign.train.checkpoint import Checkpointer
    from flaxalign.train.jit import CompiledStep

    config = helpers.tiny_model_config(adapter_placement="houlsby", adapter_reduction=16,
                                       adapter_names=("task",), active_adapter="task")
    task = sft.make_task(TrainableModel(config), helpers.optim_config(warmup_steps=0), chunk_size=16)
    mesh = helpers.mesh((2, 2, 2))
    state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(str(tmp_path / "ckpt")))
    assert set(state.params["layers"]) == {adapters.ADAPTERS_KEY}
    assert adapters.ADAPTERS_KEY not in state.frozen["layers"]
    base = jax.tree.map(np.asarray, state.frozen)
    plain = models.init_params(helpers.tiny_model_config(), 0)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(plain)):  # the same base weights as without adapters
        np.testing.assert_array_equal(a, np.asarray(b))
    step = CompiledStep(task.train_step, mesh, shardings)
    losses = []
    for _ in range(3):
        state, metrics = step(state, sharding.global_batch(helpers.packed_batch(), mesh))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for after, before in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(after), before)


def test_the_data_line_says_rows_are_packed_and_warns_of_a_tiny_eval_split(tokenizer, tmp_path):
    """16 records with the default 5 % held out: 15 train examples packed several to a row, one eval example —
    fewer rows than a batch, which the log says in a warning line."""
    import json
    import types

    from flaxalign.data.sft_data import build_sft_datasets

    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": f" It is {2 * i}."}) + "\n"
                            for i in range(16)))
    data_cfg = types.SimpleNamespace(train=str(path), eval="", eval_fraction=0.05, chat_template="plain", seq_len=64,
                                     overlong="truncate_prompt_left", max_examples=0, batch_size=8)
    lines = []
    data = build_sft_datasets(data_cfg, tokenizer, log=lines.append)
    rows = data.stats["train_rows"]
    assert 1 < rows < 15  # several examples per row
    summary = lines[-1].splitlines()
    assert summary[0] == (f"data: 15 train examples packed into {rows} rows of 64 tokens (0 truncated, 0 dropped); "
                          "1 eval examples (held out from data.train by data.eval_fraction) in 1 rows")
    assert summary[1].startswith("warning: the eval split fills 1 of the 8 rows of one batch")
    data_cfg.batch_size = 1
    build_sft_datasets(data_cfg, tokenizer, log=lines.append)
    assert "warning" not in lines[-1]

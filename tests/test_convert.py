"""`flaxalign convert` and `init_from=hf:DIR`: a run exported to an HF directory, re-imported as a checkpoint and used
to start a stage gives the same model; reward models travel as `*ForSequenceClassification`; bad input is named."""

import os

import jax
import numpy as np
import pytest

from flaxalign import errors, interop, models, sharding, weights
from flaxalign.convert import convert
from flaxalign.models import heads
from flaxalign.policy import TrainableModel
from flaxalign.stages import lm
from tests import cli_helpers as cli
from tests import helpers

TOKENS = np.array([[5, 17, 99, 3, 41, 8, 250, 11], [7, 7, 300, 2, 0, 0, 0, 0]], np.int32)
MASK = (np.arange(8)[None, :] < np.array([[8], [4]])).astype(np.int32)


def _one_device_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _run_logits(source):
    mesh = _one_device_mesh()
    with jax.set_mesh(mesh):
        config, params = weights.run_weights(source, mesh)
    return np.asarray(interop.apply_lm(config, params, TOKENS, MASK))


@pytest.fixture(scope="module")
def sft_export(sft_demo_run, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("export") / "hf")
    message = convert(sft_demo_run, directory, "hf")
    assert "causal LM" in message
    return directory


@pytest.mark.slow  # the demo's SFT run
def test_hf_export_of_a_run_has_the_run_s_logits_and_tokenizer(sft_demo_run, sft_export):
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(sft_export))
    loaded = interop.load_pretrained(sft_export)
    np.testing.assert_allclose(np.asarray(interop.apply_lm(loaded.config, loaded.params, TOKENS, MASK)),
                               _run_logits(sft_demo_run), atol=1e-5, rtol=0)
    assert weights.metadata(weights.source_of(sft_export))["tokenizer"].endswith("tokenizer.model")


@pytest.mark.slow  # the demo's SFT run
def test_checkpoint_import_of_an_hf_directory_is_a_run_with_the_same_model(sft_export, tmp_path):
    run_dir = str(tmp_path / "ckpt")
    convert(f"hf:{sft_export}", run_dir, "checkpoint")
    np.testing.assert_allclose(_run_logits(run_dir), _run_logits(f"hf:{sft_export}"), atol=1e-6, rtol=0)
    meta = weights.metadata(run_dir)
    assert meta["stage"] == "pretrained" and meta["init_from"] == f"hf:{sft_export}"
    assert os.path.isfile(meta["tokenizer"])


@pytest.mark.slow  # the demo's SFT run
def test_sft_starts_from_an_hf_directory(sft_export, tmp_path):
    workdir = str(tmp_path / "sft_from_hf")
    rc, _, err = cli.run(["--config=configs/sft.py:tiny", f"--workdir={workdir}", f"--config.init_from=hf:{sft_export}",
                          "--config.steps=2", "--config.eval_every=0"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    first = next(row for row in cli.metrics(workdir) if "loss" in row)
    # the exported SFT model already fits the SFT data: its first loss is far below a random model's ln(512) = 6.2
    assert first["loss"] < 4.0, first
    assert weights.metadata(workdir)["init_from"] == f"hf:{sft_export}"
    # the run keeps what its HF source's config.json says beyond the model config (class, ids, windows), so that its
    # own export writes them again (`weights.inherited_metadata`)
    source = weights.metadata(f"hf:{sft_export}")[interop.hf.SOURCE_FIELD]
    assert source["architecture"] == "LlamaForCausalLM" and "eos_token_id" in source
    assert weights.metadata(workdir)[interop.hf.SOURCE_FIELD] == source


def test_reward_model_from_a_sequence_classification_directory(tmp_path):
    config = helpers.tiny_model_config(tie_embeddings=False)
    backbone = {k: v for k, v in helpers.random_params(config).items() if k != "lm_head"}
    head = heads.init_scalar_head(config.d_model, seed=1)
    interop.save_hf(config, backbone, str(tmp_path), score_head=head, pad_token_id=0)
    source = f"hf:{tmp_path}"
    assert weights.metadata(source)["stage"] == "reward"  # usable as PPO's / GRPO's reward_from
    abstract, logical, load = weights.reward_model(source, config)
    mesh = helpers.mesh((2, 1, 1))
    with jax.set_mesh(mesh):
        loaded = load(sharding.tree_shardings(logical, abstract, mesh))
    expected = interop.apply_reward(config, backbone, head, TOKENS, MASK)
    got = interop.apply_reward(config, loaded["model"], loaded["head"], TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6, rtol=0)
    assert jax.tree.structure(loaded["model"]) == jax.tree.structure(abstract["model"])


def test_sequence_classification_directory_converts_to_hf_again(tmp_path):
    config = helpers.tiny_model_config(tie_embeddings=True)
    params = helpers.random_params(config)
    head = heads.init_scalar_head(config.d_model, seed=2)
    interop.save_hf(config, params, str(tmp_path / "rm"), score_head=head, pad_token_id=0)
    exported = str(tmp_path / "rm_again")
    convert(str(tmp_path / "rm"), exported, "hf")  # a bare directory with config.json is an HF model
    loaded = interop.load_pretrained(exported)
    assert loaded.head is not None
    np.testing.assert_allclose(np.asarray(loaded.head["kernel"]), np.asarray(head["kernel"]), atol=0, rtol=0)
    # a destination that holds files is refused in one line unless overwrite is asked for
    with pytest.raises(errors.ConfigError, match=r"--to=.*rm_again is not empty; choose a new directory or pass "
                                                 r"--overwrite"):
        convert(str(tmp_path / "rm"), exported, "hf")
    assert "wrote a *ForSequenceClassification" in convert(str(tmp_path / "rm"), exported, "hf", overwrite=True)
    with pytest.raises(errors.ConfigError, match="is a file"):
        convert(str(tmp_path / "rm"), os.path.join(exported, "config.json"), "hf")
    os.makedirs(tmp_path / "run" / "checkpoints")  # a run directory is never written over, even with overwrite
    with pytest.raises(errors.ConfigError, match="already holds a run's checkpoints; --overwrite replaces files, not"):
        convert(str(tmp_path / "rm"), str(tmp_path / "run"), "checkpoint", overwrite=True)


@pytest.mark.slow  # the demo's SFT run
def test_bad_sources_and_formats_are_named(sft_demo_run, tmp_path):
    with pytest.raises(errors.ConfigError, match="--format='onnx'"):
        convert(sft_demo_run, str(tmp_path / "x"), "onnx")
    with pytest.raises(errors.ConfigError, match="not a LoRA run"):
        convert(sft_demo_run, str(tmp_path / "x"), "peft")
    with pytest.raises(errors.ConfigError, match="already a flaxalign run"):
        convert(sft_demo_run, str(tmp_path / "x"), "checkpoint")
    with pytest.raises(errors.ConfigError, match="is not a directory"):
        convert(f"hf:{tmp_path / 'missing'}", str(tmp_path / "x"), "checkpoint")
    with pytest.raises(errors.ConfigError, match=r"hf:DIR .* or gguf:FILE"):
        weights.parse_source("s3://bucket/model")


def test_convert_cli_errors_are_one_line(tmp_path):
    rc, _, err = cli.run(["--from=/nonexistent/run", f"--to={tmp_path / 'out'}", "--format=hf"], cpu_devices=1,
                         command="convert")
    assert rc == 2 and err.strip().count("\n") == 0 and "/nonexistent/run" in err, err
    rc, _, err = cli.run([f"--to={tmp_path / 'out'}", "--format=hf"], cpu_devices=1, command="convert")
    assert rc == 2 and "--from is required" in err, err


@pytest.mark.slow  # the demo's SFT run
def test_model_configs_agree_between_a_run_and_its_export(sft_demo_run, sft_export):
    run_config = models.ModelConfig.from_dict(weights.metadata(sft_demo_run)["model"])
    assert interop.hf.read_model_config(sft_export).checkpoint_identity() == run_config.checkpoint_identity()


@pytest.mark.slow  # a run trained, saved and read back (10–13 s): the default group is at its 15-min budget
def test_peft_export_of_a_lora_run_reproduces_its_merged_model(tmp_path):
    from flaxalign.interop import peft
    from flaxalign.peft import lora
    from flaxalign.train import loop
    from flaxalign.train.checkpoint import Checkpointer
    from flaxalign.train.jit import CompiledStep

    config = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, variant="rslora")
    task = lm.make_task("sft", TrainableModel(config, lora_config), helpers.optim_config(lr=5e-2), chunk_size=16)
    mesh = helpers.mesh((2, 1, 1))
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    state, shardings, _ = loop.initial_state(task, 0, mesh, checkpointer)
    step = CompiledStep(task.train_step, mesh, shardings)
    for seed in range(3):  # the learning rate warms up from 0, so B leaves zero
        state, _ = step(state, helpers.packed_batch(seed=seed))
    checkpointer.save(3, state, {"batches_consumed": 3}, task.metadata)
    checkpointer.close()

    convert(str(tmp_path / "run"), str(tmp_path / "adapter"), "peft")
    loaded_config, loaded = peft.load_peft_adapter(str(tmp_path / "adapter"), config)
    assert loaded_config.variant == "rslora" and loaded_config.rank == 4
    base = jax.device_get(state.frozen)
    ours = interop.apply_lm(config, lora.apply_lora(base, loaded, loaded_config), TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(ours), _run_logits(str(tmp_path / "run")), atol=2e-5, rtol=0)
    assert not np.allclose(np.asarray(ours), np.asarray(interop.apply_lm(config, base, TOKENS, MASK)), atol=1e-3)


def _lora_run(workdir, config, lora_config, init_from: str, seed: int) -> None:
    """A LoRA SFT run of 3 steps on `init_from` (hf:DIR or checkpoint:DIR), saved with its metadata."""
    from flaxalign.train import loop
    from flaxalign.train.checkpoint import Checkpointer
    from flaxalign.train.jit import CompiledStep

    source = weights.parse_source(init_from)
    task = lm.make_task("sft", TrainableModel(config, lora_config), helpers.optim_config(lr=5e-2), chunk_size=16,
                        init_base=weights.initializer(config, source), metadata={"init_from": init_from})
    mesh = helpers.mesh((2, 1, 1))
    checkpointer = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    state, shardings, _ = loop.initial_state(task, 0, mesh, checkpointer)
    step = CompiledStep(task.train_step, mesh, shardings)
    for i in range(3):  # the learning rate warms up from 0, so B leaves zero
        state, _ = step(state, helpers.packed_batch(seed=seed + i))
    checkpointer.save(3, state, {"batches_consumed": 3}, task.metadata)
    checkpointer.close()


@pytest.mark.slow  # two runs trained, saved and read back (≈ 25 s)
def test_a_lora_run_on_a_lora_run_exports_against_its_parent_or_with_merge_parent_on_the_first_base(tmp_path):
    from flaxalign.interop import peft
    from flaxalign.peft import lora

    config = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    base = helpers.random_params(config, 3)
    interop.save_hf(config, base, str(tmp_path / "base"))
    _lora_run(tmp_path / "first", config, lora.LoraConfig(rank=4, alpha=8.0, variant="rslora"),
              f"hf:{tmp_path / 'base'}", 0)
    _lora_run(tmp_path / "second", config, lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "up")),
              f"checkpoint:{tmp_path / 'first'}", 10)

    alone = convert(str(tmp_path / "second"), str(tmp_path / "alone"), "peft")
    assert f"it applies to the merged weights of the LoRA run {tmp_path / 'first'}" in alone
    with pytest.raises(errors.CheckpointError, match="trained on other base weights than these"):
        peft.load_peft_adapter(str(tmp_path / "alone"), config, base)
    merged_first = jax.device_get(weights.run_weights(str(tmp_path / "first"), _one_device_mesh())[1])
    assert peft.load_peft_adapter(str(tmp_path / "alone"), config, merged_first)[0].rank == 2

    message = convert(str(tmp_path / "second"), str(tmp_path / "joined"), "peft", merge_parent=True)
    assert f"2 chained LoRA runs summed into one adapter on {tmp_path / 'base'}" in message
    joined_config, joined = peft.load_peft_adapter(str(tmp_path / "joined"), config, base)
    assert lora.rank_for("layers/attn/q", joined_config) == 6 and lora.rank_for("layers/attn/k", joined_config) == 4
    ours = interop.apply_lm(config, lora.apply_lora(base, joined, joined_config), TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(ours), _run_logits(str(tmp_path / "second")), atol=2e-5, rtol=0)
    with pytest.raises(errors.ConfigError, match="not on a LoRA run; its adapter already applies to that base"):
        convert(str(tmp_path / "first"), str(tmp_path / "nothing"), "peft", merge_parent=True)


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/nope.py:tiny", "--workdir=/tmp/x"], "config file 'configs/nope.py' does not exist"),
    (["--config=configs/clm.py:tiny", "--workdir=gs://bucket/run"], "--workdir=gs://bucket/run is a URL"),
])
def test_train_refuses_a_missing_config_file_and_a_url_workdir_in_one_line(args, expected):
    rc, _, err = cli.run(args, cpu_devices=1)
    assert rc == 2 and err.strip().count("\n") == 0 and expected in err, err


# ---------------------------------------------------------------------------------------------------------------
# A reward run exported with `flaxalign convert --format=hf`, scored by transformers


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A 3-step `configs/reward.py:tiny` run from a random init (its own SentencePiece tokenizer, trained here on a
    slice of the built-in corpus), with a centring term so that its head bias trains (the Bradley–Terry loss alone
    is blind to the bias). Returns its workdir."""
    from flaxalign.data.corpus import stdlib_corpus
    from flaxalign.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("reward_run")
    tokenizer = Tokenizer.train(stdlib_corpus(max_chars=100_000), str(root / "tok.model"), vocab_size=512)
    workdir = str(root / "run")
    rc, _, err = cli.run(["--config=configs/reward.py:tiny", f"--workdir={workdir}",
                          f"--config.data.tokenizer={tokenizer.model_path}", "--config.steps=3",
                          "--config.eval_every=0", "--config.eval_at_start=False", "--config.data.seq_len=64",
                          "--config.data.batch_size=8", "--config.center_coef=0.5", "--config.optim.warmup_steps=0"],
                         cpu_devices=1, timeout=300)
    assert rc == 0, err[-2000:]
    return workdir


@pytest.fixture(scope="module")
def torch_transformers():
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _right_padded_texts(tokenizer, texts):
    """(tokens, mask) int64: the texts' ids right-padded with the tokenizer's pad id (which no real token is)."""
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    tokens = np.full((len(rows), width), tokenizer.pad_id, np.int64)
    mask = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    assert tokenizer.pad_id not in {t for row in rows for t in row}
    return tokens, mask


@pytest.mark.parity
def test_reward_run_converted_to_hf_scores_in_transformers_as_in_flaxalign(torch_transformers, reward_run,
                                                                          tmp_path):
    """The HF directory of a reward run loads in transformers as LlamaForSequenceClassification (pad id from the
    run's tokenizer) and scores right-padded rows as the run's own weights do in flaxalign, less the head bias
    (HF's score layer has none; config.json keeps it)."""
    torch, transformers = torch_transformers
    from flaxalign.data.tokenizer import load_tokenizer

    exported = str(tmp_path / "hf")
    rc, out, err = cli.run([f"--from={reward_run}", f"--to={exported}", "--format=hf"], cpu_devices=1,
                           command="convert", timeout=300)
    assert rc == 0 and "a *ForSequenceClassification reward model" in out, err[-2000:]
    meta = weights.metadata(reward_run)
    tokenizer = load_tokenizer(meta["tokenizer"])
    tokens, mask = _right_padded_texts(tokenizer, ["What is 7 * 8?", "The answer is 56.", "len(obj) returns",
                                                   "Return a new sorted list from the items in iterable."])
    config = models.ModelConfig.from_dict(meta["model"])
    abstract, logical, load = weights.reward_model(reward_run, config)
    mesh = _one_device_mesh()
    with jax.set_mesh(mesh):
        loaded = load(sharding.tree_shardings(logical, abstract, mesh))
    ours = np.asarray(interop.apply_reward(config, loaded["model"], loaded["head"], tokens, mask))

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        exported, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tokenizer.pad_id
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits[:, 0].numpy()
    bias = float(loaded["head"]["bias"])
    assert abs(bias) > 5e-4, bias  # trained away from 0 (measured 1.3e-3), so dropping or double-counting it shows
    assert np.ptp(ours) > 0.1  # rows score differently: a wrong last-token pick would show
    # float32 on both sides: measured max |difference| 2.4e-7 (bias 0) and 6.3e-7 (this run) on scores of order 1
    np.testing.assert_allclose(theirs + bias, ours, atol=2e-6, rtol=0)

"""PEFT adapter directories without torch: save → load gives back the same LoRA config and params, the files use
PEFT's names and HF's layouts, and bad directories or configs fail with errors that name the problem."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from flaxalign import errors, models
from flaxalign.interop import hf, safetensors_io
from flaxalign.interop import peft as peft_dirs
from flaxalign.peft import lora
from tests import helpers

TIED = helpers.tiny_model_config()
UNTIED = dataclasses.replace(TIED, tie_embeddings=False)
CASES = {
    "lora": (TIED, lora.LoraConfig(rank=4, alpha=16.0, variant="lora")),
    "rslora": (UNTIED, lora.LoraConfig(rank=4, alpha=8.0, variant="rslora", targets=("q", "v", "down", "lm_head"),
                                       dropout=0.05, init="gaussian")),
    "dora": (UNTIED, lora.LoraConfig(rank=4, alpha=16.0, variant="dora", targets=("q", "k", "v", "o", "lm_head"),
                                     rank_pattern={"v": 2}, alpha_pattern={"o": 5.0})),
}


def _random_adapter(model_config, config, seed=0):
    """init_lora's tree with every leaf random (B ≠ 0, magnitude ≠ ‖W‖)."""
    params = helpers.random_params(model_config, seed)
    _, _, logical = models.abstract_model(model_config)
    lora_params, _ = lora.init_lora(params, logical, config, jax.random.key(seed))
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape) + np.asarray(x)).astype(np.float32), lora_params)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{case: (directory, lora_params)} written once per module."""
    out = {}
    for case, (model_config, config) in CASES.items():
        directory = str(tmp_path_factory.mktemp(case))
        lora_params = _random_adapter(model_config, config)
        peft_dirs.save_peft_adapter(directory, model_config, config, lora_params, base_model_name_or_path="tiny")
        out[case] = directory, lora_params
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_then_load_round_trips(saved, case):
    model_config, config = CASES[case]
    directory, lora_params = saved[case]
    loaded_config, loaded = peft_dirs.load_peft_adapter(directory, model_config)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(lora_params)
    for ours, theirs in zip(jax.tree.leaves(lora_params), jax.tree.leaves(loaded)):
        assert theirs.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(theirs), ours)
    abstract = models.abstract_model(model_config)[1:]
    assert lora.target_paths(*abstract, loaded_config) == sorted(lora.target_paths(*abstract, config))


def test_files_use_peft_names_and_hf_layouts(saved):
    directory, lora_params = saved["dora"]
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4,
                                                                                             16.0)
    assert config["target_modules"] == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    assert config["rank_pattern"] == {"v_proj": 2} and config["alpha_pattern"] == {"o_proj": 5.0}
    assert config["use_dora"] and not config["use_rslora"] and config["base_model_name_or_path"] == "tiny"
    tensors = safetensors_io.SafetensorsFiles([os.path.join(directory, "adapter_model.safetensors")])
    prefix = "base_model.model.model.layers.1.self_attn"
    assert tensors.shape(f"{prefix}.q_proj.lora_A.weight") == (4, 64)
    assert tensors.shape(f"{prefix}.q_proj.lora_B.weight") == (64, 4)
    assert tensors.shape(f"{prefix}.v_proj.lora_B.weight") == (32, 2)
    assert tensors.shape(f"{prefix}.o_proj.lora_magnitude_vector") == (64,)
    assert tensors.shape("base_model.model.lm_head.lora_B.weight") == (512, 4)
    assert len(tensors) == 3 * (4 * 2 + 1)
    # PEFT's ΔW = B·A is our A·B in HF's layout, as interop.hf converts the base weight
    for name, spec in [("q_proj", hf.layer_tensors(UNTIED)[0]), ("o_proj", hf.layer_tensors(UNTIED)[3])]:
        ours = lora.low_rank_delta(lora_params["layers"]["attn"][name[0]]["a"][1],
                                   lora_params["layers"]["attn"][name[0]]["b"][1], 0)
        theirs = np.asarray(tensors[f"{prefix}.{name}.lora_B.weight"]) @ np.asarray(
            tensors[f"{prefix}.{name}.lora_A.weight"])
        np.testing.assert_allclose(theirs, spec.to_hf(np.asarray(ours)), atol=1e-6)


# --- export errors ---------------------------------------------------------------------------------------------


def test_save_refuses_what_peft_cannot_express(saved, tmp_path):
    model_config, config = CASES["lora"]
    lora_params = saved["lora"][1]
    with pytest.raises(errors.ConfigError, match="rank > 0"):
        peft_dirs.save_peft_adapter(str(tmp_path), model_config, lora.LoraConfig(rank=0), {})
    with pytest.raises(errors.ConfigError, match="modules_to_save"):
        peft_dirs.save_peft_adapter(str(tmp_path), model_config, dataclasses.replace(
            config, modules_to_save=("embed",)), lora_params)
    with pytest.raises(errors.ConfigError, match=r"layers/mlp/down/a has shape \(2, 192, 4\)"):
        peft_dirs.save_peft_adapter(str(tmp_path), dataclasses.replace(model_config, d_ff=128), config, lora_params)
    with pytest.raises(errors.ConfigError, match=r"\['a', 'b'\], but lora.variant='dora'"):
        peft_dirs.save_peft_adapter(str(tmp_path), model_config, dataclasses.replace(config, variant="dora"),
                                    lora_params)
    bottleneck = helpers.tiny_model_config(adapter_placement="pfeiffer", adapter_names=("task",))
    abstract = models.abstract_model(bottleneck)[1:]
    adapter_config = lora.LoraConfig(rank=2, targets=("adapters/task/mlp/down",))
    adapter_params, _ = lora.init_lora(*abstract, adapter_config, jax.random.key(0))
    with pytest.raises(errors.ConfigError, match="'layers/adapters/task/mlp/down' has no Hugging Face module"):
        peft_dirs.save_peft_adapter(str(tmp_path), bottleneck, adapter_config, adapter_params)
    assert not os.path.exists(tmp_path / "adapter_config.json")


# --- import errors ---------------------------------------------------------------------------------------------


def _copy(saved, case, tmp_path, **config_changes):
    directory = str(tmp_path / case)
    shutil.copytree(saved[case][0], directory)
    file = os.path.join(directory, "adapter_config.json")
    with open(file) as f:
        config = json.load(f)
    with open(file, "w") as f:
        json.dump({**config, **config_changes}, f)
    return directory


def test_load_refuses_missing_files(saved, tmp_path):
    with pytest.raises(errors.CheckpointError, match="does not exist"):
        peft_dirs.load_peft_adapter(str(tmp_path / "nowhere"), TIED)
    with pytest.raises(errors.CheckpointError, match="has no adapter_config.json"):
        peft_dirs.load_peft_adapter(str(tmp_path), TIED)
    directory = _copy(saved, "lora", tmp_path)
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    with pytest.raises(errors.CheckpointError, match="has no adapter_model.safetensors"):
        peft_dirs.load_peft_adapter(directory, TIED)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(errors.CheckpointError, match="not valid JSON"):
        peft_dirs.load_peft_adapter(directory, TIED)


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), "peft_type='IA3'"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(layers_to_transform=[0]), r"layers_to_transform=\[0\]"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_rslora=True, use_dora=True), "use_dora=True with use_rslora=True"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(rank_pattern={"q_proj(": 2}), r"invalid regular expression 'q_proj\('"),
])
def test_load_refuses_unsupported_options(saved, tmp_path, changes, message):
    directory = _copy(saved, "lora", tmp_path, **changes)
    with pytest.raises(errors.CheckpointError, match=message):
        peft_dirs.load_peft_adapter(directory, TIED)


def test_load_refuses_tensors_that_do_not_fit(saved, tmp_path):
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    with pytest.raises(errors.CheckpointError, match=rf"'{q_proj}.lora_A.weight' has shape \(4, 64\), but .* "
                                                     r"needs \(4, 32\)"):
        peft_dirs.load_peft_adapter(saved["lora"][0], dataclasses.replace(TIED, d_model=32, n_heads=2, n_kv_heads=1))
    with pytest.raises(errors.CheckpointError, match="v_proj.lora_A.weight' has shape"):
        peft_dirs.load_peft_adapter(_copy(saved, "dora", tmp_path, rank_pattern={}), UNTIED)
    # a tied model has no lm_head to adapt
    with pytest.raises(errors.CheckpointError, match="'base_model.model.lm_head.lora_A.weight'"):
        peft_dirs.load_peft_adapter(saved["dora"][0], TIED)
    directory = _copy(saved, "lora", tmp_path, target_modules=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(errors.CheckpointError, match="adapts q_proj in 1 of 2 layers"):
        peft_dirs.load_peft_adapter(directory, TIED)
    # a missing tensor, and an adapter on the embedding, are named
    file = os.path.join(_copy(saved, "lora", tmp_path / "more"), "adapter_model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.SafetensorsFiles([file]).items()}
    safetensors_io.write_safetensors(file, {k: v for k, v in tensors.items() if k != f"{q_proj}.lora_B.weight"})
    with pytest.raises(errors.CheckpointError, match=f"no tensor '{q_proj}.lora_B.weight'"):
        peft_dirs.load_peft_adapter(os.path.dirname(file), TIED)
    embed = "base_model.model.model.embed_tokens.lora_embedding_A"
    safetensors_io.write_safetensors(file, {**tensors, embed: np.zeros((4, 512), np.float32)})
    with pytest.raises(errors.CheckpointError, match=f"'{embed}'.*embeddings, norms"):
        peft_dirs.load_peft_adapter(os.path.dirname(file), TIED)


def test_load_ignores_peft_copies_of_the_base_lm_head(saved, tmp_path):
    """PEFT saves `lm_head.base_layer.weight` when lm_head is a target; a copy of the right shape is ignored, and
    one of another vocabulary size is refused."""
    model_config, config = CASES["dora"]
    file = os.path.join(_copy(saved, "dora", tmp_path), "adapter_model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.SafetensorsFiles([file]).items()}
    for vocab, error in [(512, None), (520, "was the vocabulary resized")]:
        copy = {"base_model.model.lm_head.base_layer.weight": np.zeros((vocab, 64), np.float32)}
        safetensors_io.write_safetensors(file, {**tensors, **copy})
        if error is None:
            assert peft_dirs.load_peft_adapter(os.path.dirname(file), model_config)[0] == config
        else:
            with pytest.raises(errors.CheckpointError, match=error):
                peft_dirs.load_peft_adapter(os.path.dirname(file), model_config)


def test_load_reads_peft_target_spellings(saved, tmp_path):
    """Full module names (PEFT's expansion of "all-linear"), a regex string and exclude_modules select the same
    weights as the short names we write."""
    _, config = CASES["lora"]
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    for i, changes in enumerate([dict(target_modules=names), dict(target_modules=r".*layers\.\d+\..*_proj"),
                                 dict(target_modules="all-linear", exclude_modules=["embed_tokens"])]):
        loaded_config, _ = peft_dirs.load_peft_adapter(_copy(saved, "lora", tmp_path / str(i), **changes), TIED)
        assert loaded_config == config
    directory = _copy(saved, "lora", tmp_path / "x", exclude_modules=["down_proj"])
    with pytest.raises(errors.CheckpointError, match="down_proj.lora_A.weight"):  # now an unexpected tensor
        peft_dirs.load_peft_adapter(directory, TIED)


def test_an_adapter_pinned_to_its_base_refuses_other_base_weights(tmp_path):
    model_config, config = CASES["lora"]
    base = helpers.random_params(model_config, 0)
    lora_params = _random_adapter(model_config, config)
    peft_dirs.save_peft_adapter(str(tmp_path), model_config, config, lora_params, base_model_name_or_path="/m/base",
                                base_weights_digest=peft_dirs.base_digest(base))
    assert json.load(open(tmp_path / "adapter_config.json"))["base_model_name_or_path"] == "/m/base"
    as_bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), base)
    for same in (base, as_bf16):  # a bfloat16 copy of the base is the same base
        assert peft_dirs.load_peft_adapter(str(tmp_path), model_config, same)[0] == config
    other = helpers.random_params(model_config, 1)
    with pytest.raises(errors.CheckpointError, match="trained on other base weights than these: load it on /m/base"):
        peft_dirs.load_peft_adapter(str(tmp_path), model_config, other)
    assert peft_dirs.load_peft_adapter(str(tmp_path), model_config)[0] == config  # no base given: nothing to check

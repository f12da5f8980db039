"""Phi-3 without torch: the fused HF tensors (qkv_proj, gate_up_proj) of its table round-trip through numpy and
are read region by region onto a mesh, its config.json mapping round-trips and refuses what flaxalign's Phi-3 does
not compute in one line, PEFT export refuses adapters on fused parts, and LoRA SFT steps train a tiny Phi-3
through its stage (`models.phi3`; against transformers: `test_phi3_parity.py`)."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxalign import errors, models
from flaxalign.interop import hf
from flaxalign.interop import peft as peft_dirs
from flaxalign.models import phi3
from flaxalign.peft import lora
from tests import helpers
from tests.models.test_hf_files import _assert_trees_equal, _Recorded


def _config(**overrides):
    return helpers.tiny_model_config(**{"family": "phi3", "n_layers": 2, "tie_embeddings": False,
                                        "sliding_window": 8, **overrides})


def test_fused_tensors_round_trip_and_hold_llama_s_tensors_as_row_parts():
    config = _config()
    llama = dataclasses.replace(config, family="llama")
    params = helpers.random_params(config)
    state = hf.params_to_hf_state_dict(config, params)
    theirs = hf.params_to_hf_state_dict(llama, params)  # unfused q / k / v / gate / up
    d, f, hd, h, k = config.d_model, config.d_ff, config.head_dim, config.n_heads, config.n_kv_heads
    qkv, gate_up = state["model.layers.1.self_attn.qkv_proj.weight"], state["model.layers.1.mlp.gate_up_proj.weight"]
    assert qkv.shape == ((h + 2 * k) * hd, d) and gate_up.shape == (2 * f, d)
    np.testing.assert_array_equal(qkv, np.concatenate([theirs[f"model.layers.1.self_attn.{n}_proj.weight"]
                                                       for n in "qkv"]))
    np.testing.assert_array_equal(gate_up, np.concatenate([theirs[f"model.layers.1.mlp.{n}_proj.weight"]
                                                           for n in ("gate", "up")]))
    unfused = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
    fused = ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")
    assert set(state) == {name for name in theirs if not name.endswith(unfused)} | {
        f"model.layers.{i}.{name}" for i in range(2) for name in fused}
    _assert_trees_equal(hf.params_from_hf_state_dict(config, state), params)
    with pytest.raises(errors.CheckpointError, match=r"qkv_proj.weight' has shape"):
        hf.params_from_hf_state_dict(config, {**state, "model.layers.0.self_attn.qkv_proj.weight": qkv[:-1]})


@pytest.mark.parametrize("seed", range(2))
def test_read_flax_of_a_fused_part_reads_only_its_rows(seed):
    config = _config(n_kv_heads=2)
    rng = np.random.default_rng(seed)
    state = hf.params_to_hf_state_dict(config, helpers.random_params(config))
    tensors = _Recorded(state)
    for spec in [s for s in hf.layer_tensors(config) if s.rows is not None]:
        name = spec.hf_name.format(i=1)
        whole = spec.to_flax(spec.part(state[name]))
        for _ in range(4):
            index = tuple(slice(*map(int, sorted(rng.choice(n + 1, size=2, replace=False)))) for n in whole.shape)
            tensors.reads.clear()
            np.testing.assert_array_equal(spec.read_flax(tensors, name, index), whole[index], err_msg=f"{name}")
            heads_dim = config.head_dim if spec.path[0] == "attn" else 1
            assert np.prod(tensors.reads[0][1]) <= np.prod(whole[index].shape) * heads_dim


def test_sharded_placement_reads_regions_of_the_fused_tensors():
    config = _config(n_kv_heads=2)
    params = helpers.random_params(config)
    tensors = _Recorded(hf.params_to_hf_state_dict(config, params))
    hf.check_tensors(config, tensors)
    placed = hf.place_params(config, tensors, helpers.mesh((1, 4, 2)))
    _assert_trees_equal(placed, params)
    fused = [(name, shape) for name, shape in tensors.reads if "qkv_proj" in name or "gate_up_proj" in name]
    assert fused and all(np.prod(shape) < np.prod(tensors[name].shape) for name, shape in fused)


def test_config_json_round_trips_and_the_preset_builds():
    config = _config()
    written = hf.hf_config_dict(config, ids={"bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000})
    assert written["architectures"] == ["Phi3ForCausalLM"] and written["sliding_window"] == 8
    assert hf.model_config_from_hf(written) == config
    assert hf.hf_config_dict(config, score=True)["architectures"] == ["Phi3ForSequenceClassification"]
    mini = models.ModelConfig.from_dict(models.preset("phi3_mini"))
    assert mini.family == "phi3" and mini.layer_windows() == (2047,) * 32
    assert 3.7e9 < mini.num_params() < 3.9e9  # Phi-3-mini: 3.8B


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "rope_scaling of type"),
    ("rope_scaling", {"type": "su"}, "rope_scaling of type 'su'"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope_parameters of type 'longrope'"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),  # transformers 4.x spelling
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75},
     "partial_rotary_factor=0.75"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=true"),
])
def test_unsupported_config_fields_are_refused_in_one_line(field, value, match):
    hf_config = {**hf.hf_config_dict(_config()), field: value}
    if field in ("rope_scaling", "partial_rotary_factor"):  # a transformers 4.x config.json: no rope_parameters
        hf_config.pop("rope_parameters")
    with pytest.raises(errors.ConfigError, match=match) as e:
        hf.model_config_from_hf(hf_config)
    assert "\n" not in str(e.value)


def test_export_refuses_what_phi3_cannot_state():
    with pytest.raises(errors.ConfigError, match="q/k/v biases"):
        phi3.config_to_hf(_config(qkv_bias=True), {})
    with pytest.raises(errors.ConfigError, match="windows every layer or none"):
        phi3.config_to_hf(_config(full_attention_layers=(1,)), {})


def test_peft_export_refuses_fused_parts_and_writes_the_others(tmp_path):
    config = _config()
    _, abstract, logical = models.abstract_model(config)
    fused = lora.LoraConfig(rank=2, targets=("q", "o"))
    lora_params, _ = lora.init_lora(abstract, logical, fused, jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"'layers/attn/q' is a part of HF's fused .*qkv_proj") as e:
        peft_dirs.save_peft_adapter(str(tmp_path / "a"), config, fused, lora_params)
    assert "\n" not in str(e.value)
    plain = lora.LoraConfig(rank=2, targets=("o", "down"))
    lora_params, _ = lora.init_lora(abstract, logical, plain, jax.random.key(0))
    peft_dirs.save_peft_adapter(str(tmp_path / "b"), config, plain, lora_params)
    loaded_config, loaded = peft_dirs.load_peft_adapter(str(tmp_path / "b"), config)
    _assert_trees_equal(loaded, jax.tree.map(np.asarray, lora_params))

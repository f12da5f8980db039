"""HF model directories without torch: save_hf → load_pretrained round trips, sharded files, mesh placement,
padding in apply_lm, and one-sentence errors."""

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from flaxalign import errors, interop, models, sharding
from flaxalign.interop import hf, safetensors_io
from tests import helpers


def _config(**overrides):
    return helpers.tiny_model_config(**{"n_layers": 2, **overrides})


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("overrides", [dict(tie_embeddings=False), dict(tie_embeddings=True),
                                       dict(qkv_bias=True, tie_embeddings=False),
                                       dict(rope_theta=500000.0, rope_scaling_factor=8.0, rope_original_max_len=64)])
def test_round_trip_exact(tmp_path, overrides):
    config = _config(**overrides)
    params = helpers.random_params(config)
    interop.save_hf(config, params, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = interop.load_pretrained(str(tmp_path), dtype="float32")
    assert loaded.config == config
    assert loaded.tokenizer is None
    _assert_trees_equal(loaded.params, params)
    assert all(isinstance(x, jax.Array) and x.dtype == np.float32 for x in jax.tree.leaves(loaded.params))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["model_type"] == ("qwen2" if config.qkv_bias else "llama")


def test_sharded_save_has_index_and_loads_back(tmp_path):
    config = _config(tie_embeddings=False)
    params = helpers.random_params(config)
    interop.save_hf(config, params, str(tmp_path), max_shard_bytes=200_000)
    with open(tmp_path / hf.INDEX_FILE) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / hf.SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    _assert_trees_equal(interop.load_pretrained(str(tmp_path)).params, params)


def test_load_onto_mesh_places_shardings(tmp_path):
    config = _config(tie_embeddings=False)
    params = helpers.random_params(config)
    interop.save_hf(config, params, str(tmp_path), max_shard_bytes=300_000)
    mesh = helpers.mesh((2, 1, 1))
    loaded = interop.load_pretrained(str(tmp_path), mesh=mesh)
    _, abstract, logical = models.abstract_model(loaded.config)
    want = sharding.tree_shardings(logical, abstract, mesh)
    for got, expected in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
        assert got.sharding == expected
    _assert_trees_equal(loaded.params, params)


def test_mesh_with_fsdp_shards_layers(tmp_path):
    config = _config(tie_embeddings=True, qkv_bias=True)
    params = helpers.random_params(config)
    interop.save_hf(config, params, str(tmp_path))
    mesh = helpers.mesh((1, 2, 2))
    loaded = interop.load_pretrained(str(tmp_path), mesh=mesh)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(loaded.params))
    _assert_trees_equal(loaded.params, params)


def test_bfloat16_checkpoint_loads(tmp_path):
    config = _config(tie_embeddings=True)
    params = helpers.random_params(config)
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf.params_to_hf_state_dict(config, params).items()}
    safetensors_io.write_safetensors(str(tmp_path / hf.SINGLE_FILE), state)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf.hf_config_dict(config), f)
    loaded = interop.load_pretrained(str(tmp_path))
    want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    _assert_trees_equal(loaded.params, want)


def test_apply_lm_right_padding_matches_unpadded():
    config = _config(tie_embeddings=False)
    params = helpers.random_params(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 7:] = 0
    padded = np.asarray(interop.apply_lm(config, params, tokens, mask))
    assert padded.dtype == np.float32 and padded.shape == (2, 12, config.vocab_size)
    alone = np.asarray(interop.apply_lm(config, params, tokens[1:, :7]))
    np.testing.assert_allclose(padded[1, :7], alone[0], atol=1e-5, rtol=0)
    full = np.asarray(interop.apply_lm(config, params, tokens[:1]))
    np.testing.assert_allclose(padded[0], full[0], atol=1e-5, rtol=0)
    # left padding: same real-token logits
    left = np.concatenate([np.zeros((1, 5), np.int32), tokens[1:, :7]], axis=1)
    left_mask = np.concatenate([np.zeros((1, 5), np.int32), np.ones((1, 7), np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(interop.apply_lm(config, params, left, left_mask))[0, 5:], alone[0],
                               atol=1e-5, rtol=0)


def _one_sentence(error):
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message
    return message


def test_missing_directory(tmp_path):
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path / "nope"))
    assert "does not exist" in _one_sentence(e)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path))
    assert "config.json" in _one_sentence(e)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf.hf_config_dict(_config()), f)
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path))
    assert hf.SINGLE_FILE in _one_sentence(e)


def test_missing_tensor_is_named(tmp_path):
    config = _config(tie_embeddings=False)
    params = helpers.random_params(config)
    state = hf.params_to_hf_state_dict(config, params)
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors_io.write_safetensors(str(tmp_path / hf.SINGLE_FILE), state)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf.hf_config_dict(config), f)
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path))
    assert "'model.layers.1.mlp.up_proj.weight'" in _one_sentence(e)


def test_unsupported_architecture(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**hf.hf_config_dict(_config()), "architectures": ["GPT2LMHeadModel"]}, f)
    with pytest.raises(errors.ConfigError) as e:
        interop.load_pretrained(str(tmp_path))
    assert "GPT2LMHeadModel" in _one_sentence(e)


def test_missing_shard_file(tmp_path):
    config = _config(tie_embeddings=False)
    interop.save_hf(config, helpers.random_params(config), str(tmp_path), max_shard_bytes=200_000)
    with open(tmp_path / hf.INDEX_FILE) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    os.remove(tmp_path / files[1])
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path))
    assert "missing" in _one_sentence(e)

@pytest.mark.parametrize("cut", ["half", "last byte", "in the header", "empty", "not safetensors"])
def test_truncated_or_corrupt_weights_file_is_one_sentence_naming_it(tmp_path, cut):
    config = _config(tie_embeddings=False)
    interop.save_hf(config, helpers.random_params(config), str(tmp_path))
    file = tmp_path / hf.SINGLE_FILE
    data = file.read_bytes()
    keep = {"half": data[:len(data) // 2], "last byte": data[:-1], "in the header": data[:40], "empty": b"",
            "not safetensors": b"this is not a safetensors file at all" * 10}[cut]
    file.write_bytes(keep)
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path))
    assert _one_sentence(e).startswith(f"cannot read safetensors file {str(file)!r}: ")


def test_unsupported_dtype_is_named(tmp_path):
    """float8 tensors (which safetensors' numpy framework cannot hold) are refused naming the tensor and dtype."""
    config = _config(tie_embeddings=True)
    state = hf.params_to_hf_state_dict(config, helpers.random_params(config))
    state["model.norm.weight"] = state["model.norm.weight"].astype(ml_dtypes.float8_e4m3fn)
    safetensors_io.write_safetensors(str(tmp_path / hf.SINGLE_FILE), state)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf.hf_config_dict(config), f)
    with pytest.raises(errors.CheckpointError) as e:
        interop.load_pretrained(str(tmp_path))
    assert _one_sentence(e).startswith("HF tensor 'model.norm.weight' has unsupported safetensors dtype F8_E4M3")


class _Recorded(dict):
    """HF tensors in memory, read the way `hf.place_params` reads files (`shape`, `read(name, index)`), with every
    read's region shape recorded."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.reads = []

    def shape(self, name):
        return self[name].shape

    def read(self, name, index=None):
        value = self[name] if index is None else self[name][index]
        self.reads.append((name, value.shape))
        return value


def test_sharded_load_reads_only_each_devices_region(tmp_path):
    """Onto a mesh, a param's shards are read as regions of the HF tensors: a sharded param is never read whole, and
    the placed params equal the plain load."""
    config = _config(tie_embeddings=False, qkv_bias=True)
    params = helpers.random_params(config)
    mesh = helpers.mesh((1, 2, 2))
    tensors = _Recorded(hf.params_to_hf_state_dict(config, params))
    placed = hf.place_params(config, tensors, mesh)
    _assert_trees_equal(placed, params)
    sharded = set()
    for spec in hf.global_tensors(config) + hf.layer_tensors(config):
        value = placed if "{i}" not in spec.hf_name else placed["layers"]
        for key in spec.path:
            value = value[key]
        if not value.sharding.is_fully_replicated:
            sharded.add(spec.hf_name.replace(".{i}.", ".1."))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= sharded
    for name, shape in tensors.reads:
        if name in sharded:
            assert np.prod(shape) < np.prod(tensors[name].shape), (name, shape)


@pytest.mark.parametrize("seed", range(3))
def test_read_flax_gives_any_region_of_the_flax_layout(seed):
    """`HFTensor.read_flax` of any region (head_dim cuts included, which no sharding rule makes today) equals the
    region of the whole converted tensor, and reads no more of the HF tensor than whole heads around it."""
    config = _config(tie_embeddings=False, qkv_bias=True)
    rng = np.random.default_rng(seed)
    state = hf.params_to_hf_state_dict(config, helpers.random_params(config))
    state["score.weight"] = rng.normal(size=(1, config.d_model)).astype(np.float32)
    tensors = _Recorded(state)
    specs = hf.global_tensors(config) + hf.global_tensors(config, score=True)[-1:] + hf.layer_tensors(config)
    for spec in specs:
        name = spec.hf_name.format(i=1)
        whole = spec.to_flax(state[name])
        for _ in range(4):
            bounds = [sorted(rng.choice(n + 1, size=2, replace=False)) for n in whole.shape]
            index = tuple(slice(int(a), int(b)) for a, b in bounds)
            tensors.reads.clear()
            got = spec.read_flax(tensors, name, index)
            np.testing.assert_array_equal(got, whole[index], err_msg=f"{name} {index}")
            assert got.flags.c_contiguous and got.dtype == np.float32
            heads_dim = config.head_dim if spec.path[-1] in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias") else 1
            assert np.prod(tensors.reads[0][1]) <= np.prod(got.shape) * heads_dim



def test_sliding_windows_map_to_and_from_hf_configs():
    """Mistral's `sliding_window` on every layer, Qwen2's from `max_window_layers` on (or its `layer_types`);
    config.json written back states the same pattern, and one it cannot state is refused in one line."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, vocab_size=128)
    mistral = hf.model_config_from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 16})
    assert mistral.layer_windows() == (16, 16, 16, 16)
    assert hf.model_config_from_hf(hf.hf_config_dict(mistral)) == mistral
    qwen2 = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8, "max_window_layers": 2}
    assert hf.model_config_from_hf(qwen2).layer_windows() == (0, 0, 0, 0)  # use_sliding_window is off by default
    windowed = hf.model_config_from_hf({**qwen2, "use_sliding_window": True})
    assert windowed.layer_windows() == (0, 0, 8, 8)
    written = hf.hf_config_dict(windowed)
    assert written["max_window_layers"] == 2 and written["layer_types"][1:3] == ["full_attention", "sliding_attention"]
    assert hf.model_config_from_hf(written) == windowed
    listed = hf.model_config_from_hf({**qwen2, "use_sliding_window": True,
                                      "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert listed.layer_windows() == (8, 0, 8, 0)
    with pytest.raises(errors.ConfigError, match="layers \\[1, 3\\] attending in full cannot be written so"):
        hf.hf_config_dict(listed)
    assert hf.model_config_from_hf({**base, "architectures": ["LlamaForCausalLM"], "sliding_window": 4}
                                   ).layer_windows() == (0, 0, 0, 0)  # Llama has no windows
    # transformers' defaults and quirks: Mistral ignores layer_types (it windows every layer), a Mistral config
    # without sliding_window gets 4096, and Qwen2's max_window_layers defaults to 28
    ignored = hf.model_config_from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 16,
                                       "layer_types": ["full_attention"] * 4})
    assert ignored.layer_windows() == (16, 16, 16, 16)
    assert hf.model_config_from_hf({**base, "architectures": ["MistralForCausalLM"]}).sliding_window == 4096
    deep = {**base, "num_hidden_layers": 30, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8,
            "use_sliding_window": True}
    assert hf.model_config_from_hf(deep).layer_windows() == (0,) * 28 + (8, 8)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_configs_hf_cannot_state_are_refused_or_normalised_on_export(qkv_bias):
    """A soft cap is refused in one line (no Llama/Mistral/Qwen2 attention has one); a window that no layer uses
    (every layer listed in full_attention_layers) is written as no window."""
    config = helpers.tiny_model_config(n_layers=2, qkv_bias=qkv_bias)
    with pytest.raises(errors.ConfigError, match=r"model.attn_softcap=30.0 cannot be written as a Llama"):
        hf.hf_config_dict(dataclasses.replace(config, attn_softcap=30.0))
    unused = dataclasses.replace(config, sliding_window=8, full_attention_layers=(0, 1))
    written = hf.hf_config_dict(unused)
    assert written["architectures"] == ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
    assert hf.model_config_from_hf(written).layer_windows() == (0, 0)

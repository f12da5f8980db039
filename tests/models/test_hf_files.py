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


# ---------------------------------------------------------------------------------------------------------------
# Lossless export (issue 17 item 5): a model keeps its source's HF class, ids and window spelling

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.02)
_FULL, _SLIDING = "full_attention", "sliding_attention"
# config.json of each family as transformers 5.x (and, for rope scaling, 4.x) spells it; every field given here is
# one an export must write back unchanged. `inferred`: the class written without the source (before issue 17).
FAMILY_CONFIGS = {
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=16, bos_token_id=1, eos_token_id=2,
                                                  pad_token_id=None, tie_word_embeddings=False)),
    "mistral_no_window": ("LlamaForCausalLM", dict(sliding_window=None, bos_token_id=1, eos_token_id=2)),
    "qwen2_windows": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2,
                                               layer_types=[_FULL, _FULL, _SLIDING, _SLIDING],
                                               tie_word_embeddings=True, eos_token_id=[2, 5], pad_token_id=5)),
    # alternating windows: only layer_types (transformers 5) states them; refused without the source
    "qwen2_layer_types": (None, dict(use_sliding_window=True, sliding_window=8, max_window_layers=28,
                                     layer_types=[_SLIDING, _FULL] * 2, bos_token_id=None, eos_token_id=3)),
    "qwen2_no_window": ("Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=None, max_window_layers=28,
                                                 layer_types=[_FULL] * 4, eos_token_id=3)),
    "llama31_v5": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=[1, 7, 9],
        rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64, rope_theta=500000.0))),
    "llama31_v4": ("LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_attention_bias": ("Qwen2ForCausalLM", dict(attention_bias=True, bos_token_id=1, eos_token_id=2)),
}


def _family_config(case):
    arch = {"m": "MistralForCausalLM", "q": "Qwen2ForCausalLM", "l": "LlamaForCausalLM"}[case[0]]
    model_type = {"m": "mistral", "q": "qwen2", "l": "llama"}[case[0]]
    return {"architectures": [arch], "model_type": model_type, **_SHAPE, **FAMILY_CONFIGS[case][1]}


def _assert_written_back(written, source):
    """Every field of `source` is in `written` with its value (a dict field: at least its keys, same values)."""
    for key, value in source.items():
        got = written.get(key)
        if isinstance(value, dict):
            got = {k: got[k] for k in value}
        assert got == value, (key, got, value)


@pytest.mark.parametrize("case", sorted(FAMILY_CONFIGS))
def test_each_family_s_config_round_trips_with_its_class_ids_and_windows(case):
    """config.json → `model_config_from_hf` → `hf_config_dict(source=source_fields(...))` gives the same class and
    model type, the same bos / eos / pad ids, windows spelled as the family spells them, the same rope scaling and
    tie flag, and reads back as the same `ModelConfig`; without the source the class is inferred from the config
    (what every export did before: a windowless Mistral became a Llama, a Llama with q/k/v biases a Qwen2)."""
    source = _family_config(case)
    config = hf.model_config_from_hf(source)
    written = hf.hf_config_dict(config, source=hf.source_fields(source))
    _assert_written_back(written, source)
    assert hf.model_config_from_hf(written) == config
    assert hf.model_config_from_hf(json.loads(json.dumps(written))) == config  # as a file holds it
    inferred = FAMILY_CONFIGS[case][0]
    if inferred is None:
        with pytest.raises(errors.ConfigError, match="attending in full cannot be written so"):
            hf.hf_config_dict(config)
    else:
        assert hf.hf_config_dict(config)["architectures"] == [inferred]
        assert hf.model_config_from_hf(hf.hf_config_dict(config)) == config
    reward = hf.hf_config_dict(config, score=True, source=hf.source_fields(source))
    assert reward["architectures"] == [source["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]


def test_a_source_family_that_cannot_state_the_model_gives_way_and_ids_fill_in():
    """The source's class is kept only where it states the model: a Mistral source of a model with q/k/v biases is
    written as Qwen2, and a Qwen2 source's window spelling is dropped when the windows differ; ids the source does
    not state come from `ids` (the tokenizer's), the source's own win."""
    source = hf.source_fields(_family_config("mistral_window"))
    biased = helpers.tiny_model_config(n_layers=2, qkv_bias=True)
    assert hf.hf_config_dict(biased, source=source)["architectures"] == ["Qwen2ForCausalLM"]
    qwen2 = hf.source_fields(_family_config("qwen2_layer_types"))
    unwindowed = hf.model_config_from_hf({**_family_config("qwen2_layer_types"), "use_sliding_window": False})
    written = hf.hf_config_dict(unwindowed, source=qwen2)
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["use_sliding_window"] is False
    assert hf.model_config_from_hf(written) == unwindowed
    ids = hf.hf_config_dict(unwindowed, source=qwen2, ids={"bos_token_id": 7, "eos_token_id": 8, "pad_token_id": 9})
    assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (7, 3, 9)
    assert hf.gguf_source_fields("qwen2") == {"architecture": "Qwen2ForCausalLM", "model_type": "qwen2"}
    assert hf.gguf_source_fields("phi3") == {"architecture": "Phi3ForCausalLM", "model_type": "phi3"}
    with pytest.raises(errors.ConfigError, match="GGUF architecture 'phi2' has no HF class"):
        hf.gguf_source_fields("phi2")


def test_generation_config_holds_the_eos_ids_and_the_stops():
    assert hf.generation_config_dict({"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0}, [5, 9]) == {
        "bos_token_id": 1, "eos_token_id": [2, 5, 9], "pad_token_id": 0, "_from_model_config": False}
    assert hf.generation_config_dict({"eos_token_id": 2})["eos_token_id"] == 2


def test_save_hf_keeps_a_llama_with_attention_bias_and_its_source_travels_in_metadata(tmp_path):
    """A Llama with `attention_bias` is written as a Llama again (zero o_proj biases, as it was read) with a
    generation_config.json of its ids; `hf:` metadata carries the source fields, and a run started from it
    inherits them (`weights.inherited_metadata`)."""
    import ml_collections

    from flaxalign import weights

    source = _family_config("llama_attention_bias")
    config = hf.model_config_from_hf(source)
    params = helpers.random_params(config)
    written = interop.save_hf(config, params, str(tmp_path / "a"), source=hf.source_fields(source), pad_token_id=4)
    assert written["architectures"] == ["LlamaForCausalLM"] and written["attention_bias"] is True
    state = safetensors_io.SafetensorsFiles([str(tmp_path / "a" / hf.SINGLE_FILE)])
    assert not np.any(state["model.layers.3.self_attn.o_proj.bias"])
    with open(tmp_path / "a" / hf.GENERATION_CONFIG) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 4, "_from_model_config": False}
    loaded = interop.load_pretrained(str(tmp_path / "a"), dtype="float32")
    assert loaded.config == config
    _assert_trees_equal(loaded.params, params)
    meta = weights.metadata(f"hf:{tmp_path / 'a'}")
    assert meta[hf.SOURCE_FIELD] == {**hf.source_fields(source), "pad_token_id": 4}
    run = ml_collections.ConfigDict({"init_from": f"hf:{tmp_path / 'a'}"})
    assert weights.inherited_metadata(run) == {hf.SOURCE_FIELD: meta[hf.SOURCE_FIELD]}
    assert weights.inherited_metadata(ml_collections.ConfigDict({"init_from": ""})) == {}
    interop.save_hf(config, params, str(tmp_path / "a"), score_head={"kernel": params["embed"][0], "bias": 0.0})
    assert not (tmp_path / "a" / hf.GENERATION_CONFIG).exists()  # a reward model has none (an earlier one goes)


def test_gguf_metadata_names_the_hf_class_of_its_architecture(tmp_path):
    from flaxalign import weights
    from tests.interop.test_gguf import write_gguf

    config = _config(tie_embeddings=False)
    path = write_gguf(tmp_path / "tiny.gguf", config, helpers.random_params(config))
    assert weights.metadata(f"gguf:{path}")[hf.SOURCE_FIELD] == {"architecture": "LlamaForCausalLM",
                                                                "model_type": "llama"}

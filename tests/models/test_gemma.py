"""The Gemma family without reference libraries: its param tree and logical axes, its HF state-dict and config.json
round trips (transformers 4 and 5 spellings), one-line refusals, and the KV-cache sampler equal to recomputing the
prefix. Logits against transformers are `test_gemma_parity.py`."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from flaxalign import errors, models, sharding
from flaxalign.data.batching import left_pad_prompts
from flaxalign.interop import gguf_export, hf
from flaxalign.sampler import generate, generate_recompute
from tests import helpers

# Gemma-3-shaped tiny model: layer 1 global, the others windowed with their own RoPE base, q·k/√8, untied
GEMMA = helpers.tiny_model_config(family="gemma", qk_norm=True, n_layers=3, n_kv_heads=1, sliding_window=8,
                                  full_attention_layers=(1,), rope_local_theta=1000.0, query_pre_attn_scalar=8.0,
                                  tie_embeddings=False, rms_eps=1e-6)
_random_params = functools.cache(helpers.random_params)
NORMS = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")


def test_param_tree_and_logical_axes():
    """Llama's linear weights under the same names and axes (so LoRA / QLoRA / sharding apply unchanged), four layer
    norms and q/k norms initialised to 0 (the (1 + w) form), and `num_params` counting them."""
    _, abstract, logical = models.abstract_model(GEMMA)
    llama_abstract = models.abstract_model(dataclasses.replace(GEMMA, family="llama"))[1]
    assert set(abstract["layers"]) == {"attn", "mlp", *NORMS}
    for group in ("attn", "mlp"):
        assert abstract["layers"][group] == llama_abstract["layers"][group]
    assert logical["layers"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
    assert all(logical["layers"][n]["scale"] == ("layers", "norm") for n in NORMS)
    flat_axes = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple))
    assert all(set(axes) <= set(sharding.RULES) for axes in flat_axes)
    params = models.init_params(GEMMA, seed=0)
    scales = [params["final_norm"]["scale"]] + [params["layers"][n]["scale"] for n in NORMS]
    scales += [params["layers"]["attn"][n]["scale"] for n in ("q_norm", "k_norm")]
    assert all(not np.any(np.asarray(s)) for s in scales)
    assert GEMMA.num_params() == sum(x.size for x in jax.tree.leaves(params))


def test_hf_state_dict_round_trip():
    params = _random_params(GEMMA)
    state = hf.params_to_hf_state_dict(GEMMA, params)
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        assert f"model.layers.2.{name}.weight" in state
    np.testing.assert_array_equal(state["model.layers.1.pre_feedforward_layernorm.weight"],
                                  params["layers"]["mlp_norm"]["scale"][1])
    assert "lm_head.weight" in state and len(state) == 3 + GEMMA.n_layers * 13
    back = hf.params_from_hf_state_dict(GEMMA, state)
    jax.tree.map(np.testing.assert_array_equal, back, params)


HF_GEMMA3 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=512, hidden_size=64,
                 intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                 head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=8, sliding_window=8, tie_word_embeddings=False, initializer_range=0.02,
                 final_logit_softcapping=None, attn_logit_softcapping=None)


def test_config_json_round_trips_in_both_transformers_spellings():
    written = hf.hf_config_dict(GEMMA)
    assert written["architectures"] == ["Gemma3ForCausalLM"] and written["query_pre_attn_scalar"] == 8
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert hf.model_config_from_hf(written) == GEMMA
    v5 = {**HF_GEMMA3, "layer_types": written["layer_types"],
          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}
    v4 = {**HF_GEMMA3, "rope_theta": 10000.0, "rope_local_base_freq": 1000.0, "rope_scaling": None,
          "sliding_window_pattern": 2}  # every 2nd layer global: layer 1 of 3
    assert hf.model_config_from_hf(v5) == hf.model_config_from_hf(v4) == GEMMA
    scored = hf.hf_config_dict(GEMMA, score=True)
    assert scored["architectures"] == ["Gemma3TextForSequenceClassification"] and scored["num_labels"] == 1


def test_presets_read_back_from_their_config_json():
    for name, params in (("gemma3_270m", 268_098_176), ("gemma3_1b", 999_885_952)):
        config = models.ModelConfig.from_dict(models.preset(name))
        assert config.query_pre_attn_scalar == 0.0  # 256 = head_dim: stored as the default
        assert config.num_params() == params  # the published sizes (1b: keras-hub's count)
        written = hf.hf_config_dict(config)
        kinds = written["layer_types"]
        assert [i for i, k in enumerate(kinds) if k == "full_attention"] == list(range(5, config.n_layers, 6))
        assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
        assert hf.model_config_from_hf(written) == config


@pytest.mark.parametrize("change, match", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "linear"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "chunked_attention"),
    (dict(architectures=["Gemma2ForCausalLM"], rope_parameters={"rope_type": "linear", "factor": 2.0}),
     "Gemma 2 config has rope.*linear"),
    (dict(architectures=["Gemma4ForCausalLM"]), "Gemma4ForCausalLM.*not supported.*Gemma2ForCausalLM"),
])
def test_unsupported_gemma_configs_are_refused_in_one_line(change, match):
    with pytest.raises(errors.ConfigError, match=match) as caught:
        hf.model_config_from_hf({**HF_GEMMA3, **change})
    assert "\n" not in str(caught.value)


def test_family_validation_and_what_cannot_be_exported():
    with pytest.raises(errors.ConfigError, match=r"model.family must be one of \[.*'gemma'.*\], not 'mamba'"):
        helpers.tiny_model_config(family="mamba")
    with pytest.raises(errors.ConfigError, match="query_pre_attn_scalar must be >= 0"):
        helpers.tiny_model_config(query_pre_attn_scalar=-1.0)
    # without q/k norms it is a Gemma 2, which has one RoPE base
    with pytest.raises(errors.ConfigError, match="Gemma 2 HF model has one RoPE base"):
        hf.hf_config_dict(dataclasses.replace(GEMMA, qk_norm=False))
    with pytest.raises(errors.ConfigError, match="Gemma 3 HF model .q/k norms. has no logit soft caps"):
        hf.hf_config_dict(dataclasses.replace(GEMMA, final_softcap=30.0))
    with pytest.raises(errors.ConfigError, match="model.final_softcap=30.0 cannot be written as a Llama"):
        hf.hf_config_dict(helpers.tiny_model_config(final_softcap=30.0))
    with pytest.raises(errors.ConfigError, match="model.final_softcap must be >= 0"):
        helpers.tiny_model_config(final_softcap=-1.0)
    # a field only another family's class states is named (windowed: written as a Mistral)
    with pytest.raises(errors.ConfigError, match=r"MistralForCausalLM \(read back, it would differ in "
                                                 r"model.rope_local_theta\)"):
        hf.hf_config_dict(helpers.tiny_model_config(rope_local_theta=500.0, sliding_window=4))
    # GGUF: llama.cpp's gemma3 fixes the layer pattern (every 6th layer global), which this one is not
    with pytest.raises(errors.ConfigError, match=r"gemma3 makes every 6th layer global .* \[8, 0, 8\]"):
        gguf_export.check_exportable(GEMMA)
    # a Llama checkpoint's identity is unchanged by the new fields (they are left out at their defaults)
    assert not {"family", "query_pre_attn_scalar", "rope_local_theta"} & set(
        helpers.tiny_model_config().checkpoint_identity())
    assert GEMMA.checkpoint_identity()["family"] == "gemma"


def test_kv_cache_sampling_equals_recomputing_the_prefix():
    """Windowed and global layers with their own RoPE bases through the cache: 10 tokens past the window of 8."""
    graphdef = models.abstract_model(GEMMA)[0]
    batch = left_pad_prompts([[1, 5, 9, 13, 40, 41], [1, 7], [1, 20, 21, 22, 23, 24, 25, 26, 27]], pad_id=0)
    kwargs = dict(max_new_tokens=10, eos_id=2, pad_id=0, temperature=1.0)

    def run(fn):
        return jax.device_get(jax.jit(lambda p, b: fn(models.merge(graphdef, p), b, jax.random.PRNGKey(0), **kwargs))(
            _random_params(GEMMA), batch))

    recomputed = run(generate_recompute)
    for unstacked in (False, True):  # per-layer windows: traced in the layer scan, static in the unstacked layers
        cached = run(functools.partial(generate, unstacked_layers=unstacked))
        np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
        np.testing.assert_allclose(cached["logps"], recomputed["logps"], atol=2e-5)


# Gemma-2-shaped tiny model: no q/k norms, one RoPE base, even layers windowed, both soft caps
GEMMA2 = helpers.tiny_model_config(family="gemma", n_layers=3, sliding_window=8, full_attention_layers=(1,),
                                   query_pre_attn_scalar=8.0, tie_embeddings=True, rms_eps=1e-6, attn_softcap=5.0,
                                   final_softcap=3.0)
HF_GEMMA2 = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=512, hidden_size=64,
                 intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=8, sliding_window=8, initializer_range=0.02, attn_logit_softcapping=5.0,
                 final_logit_softcapping=3.0)


def test_gemma2_config_json_round_trips_in_both_transformers_spellings():
    """Gemma 2's config.json: its class, one RoPE base, the soft caps; Gemma2Config's defaults (tied, every 2nd
    layer global, caps 50 / 30, base 1e4) when fields are absent; null caps = off."""
    written = hf.hf_config_dict(GEMMA2)
    assert written["architectures"] == ["Gemma2ForCausalLM"] and written["model_type"] == "gemma2"
    assert (written["attn_logit_softcapping"], written["final_logit_softcapping"]) == (5.0, 3.0)
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert hf.model_config_from_hf(written) == GEMMA2
    v5 = {**HF_GEMMA2, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    v4 = {**HF_GEMMA2, "rope_theta": 10000.0}  # no layer_types: Gemma2Config's every-other-layer default
    assert hf.model_config_from_hf(v5) == hf.model_config_from_hf(v4) == GEMMA2
    defaults = {k: v for k, v in HF_GEMMA2.items() if k not in ("attn_logit_softcapping", "final_logit_softcapping")}
    assert hf.model_config_from_hf(defaults) == dataclasses.replace(GEMMA2, attn_softcap=50.0, final_softcap=30.0)
    uncapped = hf.model_config_from_hf({**HF_GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (uncapped.attn_softcap, uncapped.final_softcap) == (0.0, 0.0)
    scored = hf.hf_config_dict(GEMMA2, score=True)
    assert scored["architectures"] == ["Gemma2ForSequenceClassification"]
    with pytest.raises(errors.ConfigError, match="no final logit soft cap"):
        gguf_export.check_exportable(dataclasses.replace(GEMMA2, family="llama", attn_softcap=0.0))


def test_gemma2_presets_have_the_published_sizes_and_read_back():
    for name, params in (("gemma2_2b", 2_614_341_888), ("gemma2_9b", 9_241_705_984)):
        config = models.ModelConfig.from_dict(models.preset(name))
        assert config.num_params() == params and not config.qk_norm
        written = hf.hf_config_dict(config)
        assert written["architectures"] == ["Gemma2ForCausalLM"]
        assert [i for i, k in enumerate(written["layer_types"]) if k == "full_attention"] == list(
            range(1, config.n_layers, 2))
        assert hf.model_config_from_hf(written) == config


def test_gemma2_logits_are_soft_capped_and_the_cache_sampler_equals_recomputing():
    """`logits` = cap(h · W) (|logits| < 3 with the cap; the uncapped model's exceed it), and sampling through the
    KV cache with both caps equals recomputing the prefix."""
    params = _random_params(GEMMA2)
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % GEMMA2.vocab_size
    capped = np.asarray(models.merge(models.abstract_model(GEMMA2)[0], params).logits(tokens))
    model = models.merge(models.abstract_model(dataclasses.replace(GEMMA2, final_softcap=0.0))[0], params)
    raw = np.asarray(model.logits(tokens))
    np.testing.assert_allclose(capped, 3.0 * np.tanh(raw / 3.0), atol=1e-5)
    assert np.abs(raw).max() > 3.0 > np.abs(capped).max()
    graphdef = models.abstract_model(GEMMA2)[0]
    batch = left_pad_prompts([[1, 5, 9, 13, 40, 41], [1, 7], [1, 20, 21, 22, 23, 24, 25, 26, 27]], pad_id=0)
    kwargs = dict(max_new_tokens=10, eos_id=2, pad_id=0, temperature=0.7)

    def run(fn):
        return jax.device_get(jax.jit(lambda p, b: fn(models.merge(graphdef, p), b, jax.random.PRNGKey(0), **kwargs))(
            params, batch))

    recomputed = run(generate_recompute)
    for unstacked in (False, True):  # per-layer windows: traced in the layer scan, static in the unstacked layers
        cached = run(functools.partial(generate, unstacked_layers=unstacked))
        np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
        np.testing.assert_allclose(cached["logps"], recomputed["logps"], atol=2e-5)


def test_gemma2_sampler_and_on_policy_log_probs_are_those_of_the_capped_logits_over_t():
    """The sampler's log-probs and the RL stages' recomputed ones (`onpolicy.response_logps`) are
    log softmax(cap(h · W) / T) at the sampled token: T divides after the final soft cap, as in transformers."""
    from flaxalign.stages import onpolicy

    params, temperature = _random_params(GEMMA2), 0.7
    model = models.merge(models.abstract_model(GEMMA2)[0], params)
    batch = left_pad_prompts([[1, 5, 9, 13], [1, 7, 8, 30]], pad_id=0)
    out = jax.device_get(generate(model, batch, jax.random.PRNGKey(3), max_new_tokens=6, eos_id=-1, pad_id=0,
                                  temperature=temperature))
    inputs, mask = out["tokens"][:, :-1], out["mask"][:, :-1]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = np.asarray(model.logits(inputs, positions, mask), np.float64) / temperature
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    prompt_len = batch["input_ids"].shape[1]
    expected = np.take_along_axis(logp[:, prompt_len - 1:], out["response"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logps"], expected, atol=1e-4)
    recomputed, _, head = onpolicy.response_logps(model, out, onpolicy.Policy(None, temperature, chunk_size=4))
    assert (head.softcap, head.temperature) == (3.0, temperature)
    np.testing.assert_allclose(np.asarray(recomputed), expected, atol=1e-4)

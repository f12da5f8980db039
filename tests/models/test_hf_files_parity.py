"""HF model directories written by transformers load into flaxalign with equal logits, and directories written
by `save_hf` load into transformers with equal logits (tiny random float32 models, padded batches included)."""

import os

import numpy as np
import pytest

from flaxalign import interop
from tests import helpers

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4  # float32 on both sides
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128, initializer_range=0.15, rms_norm_eps=1e-5)
CASES = {
    "llama_gqa_tied_theta500k": ("LlamaForCausalLM", "LlamaConfig",
                                 dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2_bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False, rope_theta=50000.0)),
    # window longer than every test sequence: full attention is then what Mistral computes
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=64, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def libs():
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _batch(vocab_size):
    return helpers.right_padded_batch(vocab_size)


def _hf_logits(torch, model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _compare(ours, theirs, mask):
    real = mask.astype(bool)
    assert np.abs(theirs[real]).max() > 0.5  # not two near-zero tensors
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=TOLERANCE, rtol=0)


def _random_model(libs, case, model_cls, config_cls, overrides):
    """A random float32 eager HF model whose norms and q/k/v biases are moved off their 1/0 initial values (a
    Llama's o_proj bias stays zero: flaxalign has none)."""
    torch, transformers = libs
    torch.manual_seed(sum(map(ord, case)))
    hf_config = getattr(transformers, config_cls)(**{**BASE, **overrides}, attn_implementation="eager")
    model = getattr(transformers, model_cls)(hf_config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias") and "o_proj" not in name:
                param.copy_(0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_directory_loads_with_equal_logits(libs, case, tmp_path):
    torch, transformers = libs
    model_cls, config_cls, overrides = CASES[case]
    model = _random_model(libs, case, *CASES[case])
    model.save_pretrained(str(tmp_path), max_shard_size="100KB")  # sharded, with an index file
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = interop.load_pretrained(str(tmp_path), dtype="float32")
    assert loaded.config.tie_embeddings == overrides["tie_word_embeddings"]
    assert loaded.config.qkv_bias == (case == "qwen2_bias")
    if "rope_theta" in overrides:
        assert loaded.config.rope_theta == overrides["rope_theta"]
    tokens, mask = _batch(loaded.config.vocab_size)
    theirs = _hf_logits(torch, model, tokens, mask)
    _compare(interop.apply_lm(loaded.config, loaded.params, tokens, mask), theirs, mask)
    # the padded row's real tokens equal the unpadded sequence run alone
    alone = _hf_logits(torch, model, tokens[1:, :9], mask[1:, :9])
    np.testing.assert_allclose(np.asarray(interop.apply_lm(loaded.config, loaded.params, tokens, mask))[1, :9],
                               alone[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("overrides", [dict(tie_embeddings=True), dict(tie_embeddings=False, qkv_bias=True),
                                       dict(tie_embeddings=False, rope_theta=500000.0, rope_scaling_factor=8.0,
                                            rope_original_max_len=64, n_kv_heads=1),
                                       dict(qk_norm=True, head_dim=24)])
def test_save_hf_loads_in_transformers_with_equal_logits(libs, overrides, tmp_path):
    torch, transformers = libs
    config = helpers.tiny_model_config(**overrides)
    params = helpers.random_params(config)
    interop.save_hf(config, params, str(tmp_path), max_shard_bytes=150_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(model).__name__ == ("Qwen3ForCausalLM" if config.qk_norm else "Qwen2ForCausalLM" if config.qkv_bias
                                    else "LlamaForCausalLM")
    tokens, mask = _batch(config.vocab_size)
    _compare(interop.apply_lm(config, params, tokens, mask), _hf_logits(torch, model, tokens, mask), mask)


def _score_batch(vocab_size):
    """Two rows; the second right-padded with id 0, which no real token uses (HF finds the last non-pad token)."""
    tokens, mask = _batch(vocab_size)
    tokens = np.where(tokens == 0, 1, tokens)
    tokens[1, 9:] = 0
    return tokens, mask


def _hf_scores(torch, model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits
    assert out.shape == (tokens.shape[0], 1)
    return out[:, 0].numpy()


@pytest.mark.parametrize("case", ["llama_gqa_tied_theta500k", "qwen2_bias"])
def test_sequence_classification_directory_loads_as_a_reward_model(libs, case, tmp_path):
    torch, transformers = libs
    _, config_cls, overrides = CASES[case]
    torch.manual_seed(sum(map(ord, case)) + 1)
    hf_config = getattr(transformers, config_cls)(**{**BASE, **overrides}, num_labels=1, pad_token_id=0,
                                                  attn_implementation="eager")
    model = transformers.AutoModelForSequenceClassification.from_config(hf_config).float().eval()
    model.save_pretrained(str(tmp_path))
    loaded = interop.load_pretrained(str(tmp_path), dtype="float32")
    assert loaded.head is not None and "lm_head" not in loaded.params
    tokens, mask = _score_batch(loaded.config.vocab_size)
    theirs = _hf_scores(torch, model, tokens, mask)
    assert np.abs(theirs).max() > 0.05
    ours = interop.apply_reward(loaded.config, loaded.params, loaded.head, tokens, mask)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_reward_model_saved_by_save_hf_scores_equally_in_transformers(libs, tie, tmp_path):
    torch, transformers = libs
    import jax

    config = helpers.tiny_model_config(tie_embeddings=tie)
    backbone = {k: v for k, v in helpers.random_params(config).items() if k != "lm_head"}
    head = {"kernel": 0.3 * jax.random.normal(jax.random.PRNGKey(3), (config.d_model,)), "bias": np.float32(0.25)}
    interop.save_hf(config, backbone, str(tmp_path), score_head=head, pad_token_id=0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    tokens, mask = _score_batch(config.vocab_size)
    ours = np.asarray(interop.apply_reward(config, backbone, head, tokens, mask))
    # HF's score layer has no bias: its scores are ours less the head bias (kept in config.json)
    np.testing.assert_allclose(_hf_scores(torch, model, tokens, mask), ours - 0.25, atol=TOLERANCE, rtol=0)
    reloaded = interop.load_pretrained(str(tmp_path), dtype="float32")
    np.testing.assert_allclose(np.asarray(interop.apply_reward(config, reloaded.params, reloaded.head, tokens, mask)),
                               ours, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Lossless export (issue 17 item 5): HF → flaxalign → HF keeps the class, the forward's config fields and the tensors

WINDOWS = ["sliding_attention", "full_attention"]
ROUND_TRIPS = {
    # windows shorter than the 16-token rows, so that a window lost or moved changes the logits
    "mistral_window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=6, bos_token_id=1, eos_token_id=2)),
    "mistral_no_window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=None, tie_word_embeddings=True)),
    "qwen2_max_window_layers": ("Qwen2ForCausalLM", "Qwen2Config",
                                dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, eos_token_id=7,
                                     pad_token_id=3)),
    "qwen2_layer_types": ("Qwen2ForCausalLM", "Qwen2Config",
                          dict(use_sliding_window=True, sliding_window=5, layer_types=WINDOWS)),
    "llama31_rope": ("LlamaForCausalLM", "LlamaConfig", dict(
        bos_token_id=0, eos_token_id=[1, 5, 9], tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64), rope_theta=500000.0)),
    "llama_attention_bias": ("LlamaForCausalLM", "LlamaConfig", dict(attention_bias=True)),
    "qwen3_window": ("Qwen3ForCausalLM", "Qwen3Config",
                     dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, head_dim=24, eos_token_id=7)),
}
# the transformers config fields that decide the forward pass (and generation's special ids)
FORWARD_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                  "tie_word_embeddings", "rope_parameters", "attention_bias", "mlp_bias", "sliding_window",
                  "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id", "eos_token_id",
                  "pad_token_id")


def _forward_fields(config):
    fields = {name: getattr(config, name, None) for name in FORWARD_FIELDS}
    return {**fields, "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_hf_directory_round_trips_through_flaxalign_losslessly(libs, case, tmp_path):
    """A tiny random Mistral / Qwen2 (windows from max_window_layers or layer_types) / Llama-3.1 (rope scaling, eos
    list) / Llama with attention_bias directory, converted to an HF directory again — directly and through a
    flaxalign run directory (`--format=checkpoint`, whose metadata carries the source's `hf_source`) — loads in
    transformers as the same class with the same forward config fields, the same tensors (the same safetensors
    names) and the same logits; generation_config.json holds its ids."""
    torch, transformers = libs
    from safetensors.numpy import load_file

    from flaxalign.convert import convert

    model = _random_model(libs, case, *ROUND_TRIPS[case])
    source = str(tmp_path / "source")
    model.save_pretrained(source)
    want = load_file(str(tmp_path / "source" / "model.safetensors"))
    tokens, mask = _batch(model.config.vocab_size)
    theirs = _hf_logits(torch, model, tokens, mask)
    run = str(tmp_path / "run")
    convert(source, run, "checkpoint")
    for origin in (source, run):
        exported = str(tmp_path / f"export_of_{os.path.basename(origin)}")
        message = convert(origin, exported, "hf")
        assert f"({type(model).__name__})" in message, message
        again = transformers.AutoModelForCausalLM.from_pretrained(
            exported, attn_implementation="eager", dtype=torch.float32).eval()
        assert type(again) is type(model)
        assert _forward_fields(again.config) == _forward_fields(model.config)
        got = load_file(os.path.join(exported, "model.safetensors"))
        assert got.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        np.testing.assert_allclose(_hf_logits(torch, again, tokens, mask), theirs, atol=1e-5, rtol=0)
        eos = model.config.eos_token_id
        assert again.generation_config.eos_token_id == eos

"""flaxalign logits equal transformers' logits for converted tiny random Llama, Mistral and Qwen2 models."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxalign import models
from flaxalign.interop import hf
from tests import helpers

pytestmark = pytest.mark.parity

torch = transformers = None  # imported by the fixture below, not at collection (no skip when deselected)


@pytest.fixture(scope="module", autouse=True)
def _import_reference_libraries():
    global torch, transformers
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")


TOLERANCE = 1e-4  # float32 on both sides
BATCH, LENGTH = 2, 32
DOC_LENGTHS = (10, 7, 15)  # one packed row of three documents
ATTENTION = ("xla", "blockwise")

# Shared tiny shapes; initializer_range makes q·k scores and logits O(1), so a layout error cannot hide in noise.
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128, initializer_range=0.15, rms_norm_eps=1e-5)

CASES = {
    "llama_gqa_untied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False)),
    # head_dim 32 ≠ d/heads, one kv head (multi-query), tied head
    "llama_tied_mqa": ("LlamaForCausalLM", "LlamaConfig",
                       dict(tie_word_embeddings=True, head_dim=32, num_key_value_heads=1)),
    "qwen2_bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(rope_theta=50000.0, tie_word_embeddings=False)),
    # original length 64 puts the head_dim=16 wavelengths on all three branches of the Llama-3.1 scaling
    "llama3_rope": ("LlamaForCausalLM", "LlamaConfig",
                    dict(rope_theta=10000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0,
                                                               original_max_position_embeddings=64))),
    # window longer than every test sequence: full attention is then what Mistral computes
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=64, tie_word_embeddings=False)),
    # windows shorter than the 32-token rows: each query sees itself and the 7 tokens before it
    "mistral_window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    # Qwen2: layer 0 attends in full, layer 1 (from max_window_layers on) in a window of 6
    "qwen2_window": ("Qwen2ForCausalLM", "Qwen2Config", dict(use_sliding_window=True, sliding_window=6,
                                                              max_window_layers=1, tie_word_embeddings=True)),
    # Qwen3: q/k RMSNorm per head (scales moved off 1 below), head_dim 24 ≠ d/heads, untied
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    # Qwen3 windowed like Qwen2: layer 1 in a window of 6
    "qwen3_window": ("Qwen3ForCausalLM", "Qwen3Config", dict(use_sliding_window=True, sliding_window=6,
                                                              max_window_layers=1, tie_word_embeddings=True)),
}


def _build_hf(case: str):
    """A random float32 eager HF model whose norms and biases are moved off their 1/0 initial values."""
    model_cls, config_cls, overrides = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    hf_config = getattr(transformers, config_cls)(**{**BASE, **overrides}, attn_implementation="eager")
    model = getattr(transformers, model_cls)(hf_config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request) -> str:
    """The CASES key of the model under test."""
    return request.param


@pytest.fixture(scope="module")
def converted(case):
    """(HF model, flaxalign config, flaxalign params) for one case."""
    model = _build_hf(case)
    config = hf.model_config_from_hf(model.config.to_dict())
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    return model, config, hf.params_from_hf_state_dict(config, state)




@pytest.fixture(scope="module")
def flax_runs(converted):
    """(HF model, tokens, {attention: flaxalign logits}) of the packed batch. Both attention implementations run
    in one jit: one compile per case, which is most of this file's time."""
    model, config, params = converted
    tokens, positions, segment_ids = helpers.random_rows_and_a_packed_row(config.vocab_size)
    graphdefs = {impl: models.abstract_model(dataclasses.replace(config, attention=impl))[0] for impl in ATTENTION}
    logits = jax.jit(lambda p: {impl: models.merge(g, p).logits(tokens, positions, segment_ids)
                                for impl, g in graphdefs.items()})
    return model, tokens, jax.tree.map(np.asarray, logits(params))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def test_config_mapping(case, converted):
    model, config, _ = converted
    hf_config = model.config
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.d_ff, config.vocab_size) == (
        hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads,
        hf_config.num_key_value_heads, hf_config.intermediate_size, hf_config.vocab_size)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    assert config.head_dim == head_dim
    assert config.tie_embeddings == hf_config.tie_word_embeddings
    assert config.qkv_bias == isinstance(model, transformers.Qwen2ForCausalLM)
    assert config.qk_norm == isinstance(model, transformers.Qwen3ForCausalLM)
    assert config.rms_eps == hf_config.rms_norm_eps
    windows = {"mistral": (64, 64), "mistral_window": (8, 8), "qwen2_window": (0, 6), "qwen3_window": (0, 6)}
    assert config.layer_windows() == windows.get(case, (0, 0))


@pytest.mark.parametrize("attention", ATTENTION)
def test_logits_match(flax_runs, attention):
    model, tokens, runs = flax_runs
    ours = runs[attention]
    theirs = _hf_logits(model, tokens[:BATCH])
    assert np.abs(theirs).max() > 0.5  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(ours[:BATCH], theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("attention", ATTENTION)
def test_packed_documents_match_separate_runs(flax_runs, attention):
    model, tokens, runs = flax_runs
    ours = runs[attention]
    starts = np.cumsum((0,) + DOC_LENGTHS)
    for start, end in zip(starts[:-1], starts[1:]):
        theirs = _hf_logits(model, tokens[-1:, start:end])
        np.testing.assert_allclose(ours[-1:, start:end], theirs, atol=TOLERANCE, rtol=0)


def test_state_dict_round_trip(converted):
    model, config, params = converted
    back = hf.params_to_hf_state_dict(config, params)
    state = model.state_dict()
    for name, value in back.items():
        np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)
    # the only HF tensor not written back is the tied head, which HF's safetensors files omit as well
    assert set(state) - set(back) == ({"lm_head.weight"} if config.tie_embeddings else set())

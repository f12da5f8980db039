"""A frozen base stored quantized (QLoRA): the NF4 code book is the published one, quantize → dequantize stays
within its error bound, the QLoRA forward equals LoRA over the dequantized base exactly, and what cannot be
quantized is refused in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flaxalign import errors, models
from flaxalign.peft import lora, quant
from flaxalign.policy import TrainableModel
from tests import helpers

# QLoRA (Dettmers et al. 2023), Appendix E / bitsandbytes `get_4bit_type("nf4")`, written out as published.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_code_book_is_the_published_one_and_its_normal_quantile_construction():
    """The 16 levels as published, and — independently — as the QLoRA construction gives them: 8 positive and 7
    negative quantiles of N(0, 1) at evenly spaced probabilities from 0.5 to δ = 1 − ½(1/30 + 1/32) = 0.9677083,
    plus an exact 0, normalised to [−1, 1]."""
    assert list(quant.NF4_CODE) == PUBLISHED_NF4
    offset = 0.9677083
    positive = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(levels / levels.max(), PUBLISHED_NF4, atol=1e-7)


def _weight(shape=(3, 128, 4, 16), seed=0, scale=0.02):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def test_int8_error_is_at_most_half_a_step_per_output_channel():
    w = _weight()
    q = quant.quantize(w, 1, 1, quant.QuantConfig("int8"))
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and q.scales.shape == (3, 4, 16)
    step = np.asarray(jnp.max(jnp.abs(w), axis=1) / 127)  # [L, *out]
    error = np.abs(np.asarray(q.materialize() - w))
    assert np.all(error <= step[:, None] / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(np.abs(np.asarray(q.codes)).max(axis=1) == 127)  # each channel's largest weight hits ±127


def _nf4_bound(w, block):
    """Per weight: half the widest gap between neighbouring NF4 levels, times its block's absmax."""
    half_gap = np.max(np.diff(PUBLISHED_NF4)) / 2
    blocks = np.asarray(w).reshape(w.shape[0], -1, block, *w.shape[2:])
    absmax = np.abs(blocks).max(axis=2, keepdims=True)
    return np.broadcast_to(absmax * half_gap, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_is_within_the_level_spacing_and_hits_levels_exactly(double_quant):
    w = _weight()
    config = quant.QuantConfig("nf4", block_size=64, double_quant=double_quant)
    q = quant.quantize(w, 1, 1, config)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 64, 4, 16)  # two 4-bit codes per byte
    assert q.scales.shape == (3, 2, 4, 16) and q.scales.dtype == (jnp.int8 if double_quant else jnp.float32)
    error = np.abs(np.asarray(q.materialize() - w))
    # double quantisation moves each absmax by at most half of its int8 step: ≤ (range of absmax)/254 per block
    slack = 0.0
    if double_quant:
        absmax = np.abs(np.asarray(w).reshape(3, 2, 64, 4, 16)).max(axis=2)
        slack = np.max(np.abs(absmax - absmax.mean(axis=(1, 2, 3), keepdims=True))) / 254 * 1.0001
    assert np.all(error <= _nf4_bound(w, 64) * (1 + 1e-5) + slack)
    # values that are exactly levels × absmax come back exactly (without double quantisation)
    if not double_quant:
        levels = np.asarray(PUBLISHED_NF4, np.float32)
        index = np.random.default_rng(1).integers(0, 16, size=(1, 128, 8))
        exact = jnp.asarray(levels[index] * 0.5)
        exact = exact.at[:, ::64].set(0.5)  # each block's absmax is 0.5
        np.testing.assert_array_equal(np.asarray(quant.quantize(exact, 1, 1, config).materialize()),
                                      np.asarray(exact))


def test_qlora_forward_equals_lora_over_the_dequantized_base():
    """The QLoRA model (NF4 base dequantized per layer in the scan) and the LoRA model run on the dequantized base
    as a float32 tree agree to float32 rounding — XLA fuses the dequantisation into QLoRA's matmuls, which changes
    the order of a few additions (measured max |Δ| 2.2e-6 on values of order 1 after two layers), so bit equality
    is not expected — while both differ from LoRA on the original float base by the quantisation error, over 10³
    times more."""
    config = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    lora_config = lora.LoraConfig(rank=4, alpha=8.0)
    nf4 = quant.QuantConfig("nf4", double_quant=True)
    params = helpers.random_params(config)
    frozen = quant.quantize_tree(params, models.abstract_model(config)[2], nf4)
    qlora, plain = TrainableModel(config, lora_config, nf4), TrainableModel(config, lora_config)
    trained = jax.tree.map(lambda x: x + 0.03, qlora.init_trainable(None, frozen, None))
    tokens = helpers.packed_batch(batch_size=2)["inputs"]

    @jax.jit
    def outputs(trained, frozen_q, frozen_f):
        a, b = qlora.model(trained, frozen_q), plain.model(trained, frozen_f)
        return a(tokens), b(tokens), a.unembedding(), b.unembedding()

    h_q, h_f, u_q, u_f = outputs(trained, frozen, quant.dequantize_tree(frozen))
    np.testing.assert_allclose(np.asarray(h_q), np.asarray(h_f), rtol=1e-5, atol=1e-5)
    assert not isinstance(frozen["lm_head"], quant.QuantizedWeight)  # the LM head stays float32 ...
    np.testing.assert_array_equal(np.asarray(u_q), np.asarray(params["lm_head"]))  # ... and is used as it is
    quantisation_error = np.abs(np.asarray(h_q) - np.asarray(plain.model(trained, params)(tokens))).max()
    assert quantisation_error > 1e3 * np.abs(np.asarray(h_q) - np.asarray(h_f)).max(), quantisation_error


def test_quantized_base_is_refused_where_it_cannot_be_used():
    nf4 = quant.QuantConfig("nf4")
    config = helpers.tiny_model_config()
    with pytest.raises(errors.ConfigError, match=r"^quantization.base='nf4' stores the frozen base quantized, but "
                                                 r"full fine-tuning trains every weight"):
        TrainableModel(config, None, nf4)
    odd = dataclasses.replace(config, d_ff=96)  # the down projection has 96 inputs: not a multiple of 64
    with pytest.raises(errors.ConfigError, match=r"layers/mlp/down has 96 inputs; use a block_size that divides "
                                                 r"it or quantization.base='int8'"):
        TrainableModel(odd, lora.LoraConfig(rank=4), nf4)
    TrainableModel(odd, lora.LoraConfig(rank=4), quant.QuantConfig("nf4", block_size=32))  # 32 divides 64 and 96
    with pytest.raises(errors.ConfigError, match=r"^quantization.base must be one of \['none', 'int8', 'nf4'\], "
                                                 r"not 'fp4'"):
        quant.QuantConfig("fp4")
    with pytest.raises(errors.ConfigError, match="quantization.double_quant quantizes nf4 block scales"):
        quant.QuantConfig("int8", double_quant=True)
    with pytest.raises(errors.ConfigError, match=r"unknown quantization field\(s\) \['bits'\]"):
        quant.QuantConfig.from_dict({"base": "nf4", "bits": 4})

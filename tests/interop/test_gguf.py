"""GGUF files without torch: dequantisation (gguf.quants behind our shape and type checks; a hand-packed Q4_K block
and a Q4_K tiny Llama loaded exactly), the RoPE row permutation, tiny Llamas written
by flaxalign's GGUF writer (`gguf_export`, on gguf.GGUFWriter) loaded back (F32 exact, Q8_0 within quantisation
error, onto a mesh), the tokenizer built from GGUF metadata, and one-sentence errors for bad files."""

import dataclasses
import json
import os

import gguf
import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers, trainers

from flaxalign import errors, interop, models, sharding
from flaxalign.data import chat, gguf_tokenizer
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.interop import gguf as gguf_io
from flaxalign.interop import gguf_export
from tests import helpers

Q = gguf.GGMLQuantizationType


def write_gguf(path, config, params=None, *, qtype="F32", arch=None, vocab=None, metadata=None, skip=()):
    """Writes flaxalign params as a llama.cpp-style GGUF with flaxalign's own writer (`gguf_export`: HF tensors
    renamed, q/k rows permuted for llama.cpp's RoPE in `llama` files, matrices stored as `qtype`, norms F32), plus
    `vocab` metadata as given (so that tests can write odd vocabularies) and extra `metadata` keys; `skip` leaves HF
    tensors out. `arch`: the file's `general.architecture` (default: the one the export writes for `config`)."""
    arch = arch or gguf_export.gguf_architecture(config)
    def add_metadata(writer):
        gguf_export.add_hyperparameters(writer, config)
        for key, value in (metadata or {}).items():
            writer.add_uint32(key, value) if isinstance(value, int) else writer.add_string(key, value)
        if vocab is not None:
            _add_vocab(writer, **vocab)

    tensors = [] if params is None else gguf_export.gguf_tensors(config, params, qtype)
    gguf_export.write_file(str(path), add_metadata, [t for t in tensors if t.hf_name not in skip], arch=arch)
    return str(path)


def write_and_close(writer):
    """Writes a `gguf.GGUFWriter`'s header, metadata and tensors (added with `add_tensor`), and closes it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocab(writer, template=None, **fields):
    gguf_export.add_vocab(writer, gguf_export.GGUFVocab(**fields), template)


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _config(**overrides):
    return helpers.tiny_model_config(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# Dequantisation


# ggml types a llama.cpp model file may hold, all read (the package also decodes the IQ*, TQ* and FP4 types)
READ_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def test_supported_types_are_those_the_gguf_package_decodes():
    types = gguf_io.supported_types()
    assert set(READ_TYPES) <= set(types)
    assert not {"F64", "I8", "I16", "I32", "I64"} & set(types)  # gguf.quants has no decoder for them
    for name in types:
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q[name]]
        out = gguf_io.dequantize(np.zeros(3 * block_bytes, np.uint8), name, (3, block_values))
        assert out.dtype == np.float32 and out.shape == (3, block_values), name


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q4_0"])
def test_dequantize_gives_float32_of_the_tensor_shape(type_name):
    """Any shape (rows first) of whole blocks per row comes back as float32 of that shape, within the type's error."""
    values = np.random.default_rng(0).normal(size=(3, 2, 64)).astype(np.float32) * 3.0
    raw = {"F32": values, "F16": values.astype(np.float16)}.get(type_name)
    if raw is None:
        raw = gguf.quants.quantize(values, Q[type_name])
    got = gguf_io.dequantize(raw, type_name, (3, 2, 64))
    assert got.dtype == np.float32 and got.shape == (3, 2, 64)
    error = {"F32": 0, "F16": 2.0**-11, "BF16": 2.0**-8, "Q8_0": 1 / 127, "Q5_1": 1 / 15, "Q4_0": 1 / 8}[type_name]
    amax = np.abs(values).max()
    assert np.abs(got - values).max() <= amax * (error + (2.0**-10 if error else 0))


def test_q4_layout_low_nibbles_first():
    block = np.zeros(18, np.uint8)
    block[:2] = np.array([0.5], np.float16).view(np.uint8)
    block[2] = 0x9F  # value 0: low nibble 15 -> (15 - 8) * 0.5; value 16: high nibble 9 -> (9 - 8) * 0.5
    out = gguf_io.dequantize(block, "Q4_0", (32,))
    assert out[0] == 3.5 and out[16] == 0.5 and out[1] == -4.0


def _q4_k_rows(rng, rows, cols):
    """Random Q4_K rows packed by hand as ggml's `block_q4_K` (float16 d and dmin, 12 bytes of eight 6-bit
    sub-block scales and mins, 128 bytes of 4-bit codes), and the float32 values `dequantize_row_q4_K` makes of them:
    d·scale·code − dmin·min per 32-value sub-block, exact here (d and dmin are powers of two)."""
    n = rows * cols // 256
    codes = rng.integers(0, 16, size=(n, 256))
    scales, mins = rng.integers(0, 64, size=(n, 8)), rng.integers(0, 64, size=(n, 8))
    d, dmin = 2.0**-4, 2.0**-5
    packed = np.concatenate([scales[:, :4] | (scales[:, 4:] >> 4) << 6, mins[:, :4] | (mins[:, 4:] >> 4) << 6,
                             (scales[:, 4:] & 0xF) | (mins[:, 4:] & 0xF) << 4], axis=1)
    # 64 values per 32 bytes: the low nibbles are the first 32 (sub-block 2c), the high nibbles the next 32
    qs = np.concatenate([codes[:, 64 * c:64 * c + 32] | codes[:, 64 * c + 32:64 * c + 64] << 4 for c in range(4)],
                        axis=1)
    halves = np.tile(np.array([d, dmin], np.float16).view(np.uint8), (n, 1))
    raw = np.concatenate([halves, packed.astype(np.uint8), qs.astype(np.uint8)], axis=1)
    assert raw.shape[1] == gguf.GGML_QUANT_SIZES[Q.Q4_K][1]
    values = d * np.repeat(scales, 32, axis=1) * codes - dmin * np.repeat(mins, 32, axis=1)
    return raw.reshape(rows, -1), values.reshape(rows, cols).astype(np.float32)


def test_q4_k_block_layout():
    raw, want = _q4_k_rows(np.random.default_rng(4), 3, 512)
    np.testing.assert_array_equal(gguf_io.dequantize(raw, "Q4_K", (3, 512)), want)


def test_k_quant_llama_loads_exactly(tmp_path):
    """A tiny Llama whose matrices are Q4_K (which gguf.quants can decode but not encode: packed by hand) loads to
    exactly the values its blocks hold, q/k rows back in HF order."""
    config = _config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, tie_embeddings=False)
    rng = np.random.default_rng(5)
    path = tmp_path / "q4_k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_export.add_hyperparameters(writer, config)
    state = {}
    for name, value in interop.params_to_hf_state_dict(config, helpers.random_params(config)).items():
        if value.ndim == 2:
            raw, value = _q4_k_rows(rng, *value.shape)  # the values in the file's (llama.cpp's) row order
            writer.add_tensor(gguf_io.gguf_tensor_name(name), raw, raw_dtype=Q.Q4_K)
            heads = {".q_proj.": config.n_heads, ".k_proj.": config.n_kv_heads}
            for key, n in heads.items():
                if key in name:
                    value = gguf_io.unpermute_rope_rows(value, n)
        else:
            writer.add_tensor(gguf_io.gguf_tensor_name(name), value)
        state[name] = value
    write_and_close(writer)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} == {"Q4_K", "F32"}
    loaded = gguf_io.load_gguf(str(path), dtype="float32")
    _assert_trees_equal(loaded.params, interop.params_from_hf_state_dict(config, state))


def test_dequantize_rejects_unsupported_type_and_wrong_size():
    with pytest.raises(ValueError, match=r"^ggml type F64 is not supported; flaxalign reads \['F32', 'F16', "):
        gguf_io.dequantize(np.zeros(8, np.uint8), "F64", (1,))
    with pytest.raises(ValueError, match=r"^35 bytes do not hold shape \(32,\) as Q8_0 \(34 bytes a row\)$"):
        gguf_io.dequantize(np.zeros(35, np.uint8), "Q8_0", (32,))
    with pytest.raises(ValueError, match=r"^shape \(2, 100\) does not have rows of whole 256-value Q4_K blocks$"):
        gguf_io.dequantize(np.zeros(288, np.uint8), "Q4_K", (2, 100))


# ---------------------------------------------------------------------------------------------------------------
# RoPE row permutation


@pytest.mark.parametrize("shape, heads", [((48, 8), 3), ((64,), 4), ((32, 5), 1)])
def test_unpermute_inverts_permute(shape, heads):
    w = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    permuted = gguf_io.permute_rope_rows(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(permuted, heads), w)
    np.testing.assert_array_equal(gguf_io.permute_rope_rows(gguf_io.unpermute_rope_rows(w, heads), heads), w)


def test_permute_interleaves_the_two_halves_of_each_head():
    rows = np.arange(8)  # 2 heads of head_dim 4: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    np.testing.assert_array_equal(gguf_io.permute_rope_rows(rows, 2), [0, 2, 1, 3, 4, 6, 5, 7])


def test_tensor_names_map_to_hf():
    assert gguf_io.hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_io.hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_io.hf_tensor_name("output.weight") == "lm_head.weight"
    assert gguf_io.hf_tensor_name("rope_freqs.weight") is None
    assert gguf_io.hf_tensor_name("blk.0.attn_qkv.weight") is None


# ---------------------------------------------------------------------------------------------------------------
# Qwen2, Qwen3 and Gemma 3 files: llama.cpp's tensor names, no q/k row permutation (NEOX RoPE), Gemma's 1 + w norms


def _write_arch(path, arch, config, params, metadata=(), hyperparameters=True):
    """A GGUF file of `arch` as llama.cpp's convert_hf_to_gguf.py writes one from the HF tensors of `params`:
    renamed (Phi-3's fused q/k/v and gate/up kept whole), q/k rows as they are (Qwen2/3, Gemma and Phi-3 rotate
    halves like HF), every Gemma 2 / 3 norm stored as 1 + w. `metadata`: extra keys, ints as uint32 and floats as
    float32; `hyperparameters=False` leaves out the optional ones (window, rope base) as Gemma 2's converter does."""
    writer = gguf.GGUFWriter(str(path), arch)
    if hyperparameters:
        gguf_export.add_hyperparameters(writer, config)
    else:
        for key in ("context_length", "embedding_length", "feed_forward_length", "block_count",
                    "attention.head_count", "attention.head_count_kv", "attention.key_length"):
            writer.add_uint32(f"{arch}.{key}", {
                "context_length": config.max_seq_len, "embedding_length": config.d_model,
                "feed_forward_length": config.d_ff, "block_count": config.n_layers,
                "attention.head_count": config.n_heads, "attention.head_count_kv": config.n_kv_heads,
                "attention.key_length": config.head_dim}[key])
        writer.add_layer_norm_rms_eps(config.rms_eps)
    for key, value in dict(metadata).items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    for name, value in interop.params_to_hf_state_dict(config, params).items():
        value = np.asarray(value, np.float32)
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        writer.add_tensor(gguf_io.gguf_tensor_name(name, arch), value)
    write_and_close(writer)
    return str(path)


@pytest.mark.parametrize("arch, overrides", [
    ("qwen2", dict(qkv_bias=True, rope_theta=1e6)),
    ("qwen3", dict(qk_norm=True, head_dim=32, tie_embeddings=False)),
])
def test_qwen_files_load_with_their_tensor_names_unpermuted(tmp_path, arch, overrides):
    config = _config(**overrides)
    params = helpers.random_params(config)
    path = _write_arch(tmp_path / f"{arch}.gguf", arch, config, params)
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config == dataclasses.replace(config, init_std=0.02)
    _assert_trees_equal(loaded.params, params)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")


def test_gemma3_file_loads_as_the_gemma_family(tmp_path):
    """Gemma 3's names (ffn_norm is the pre-MLP norm; post_attention_norm, post_ffw_norm, q/k norms), norms stored
    1 + w, and the config llama.cpp implies: every 6th layer global (or `attention.sliding_window_pattern`), local
    RoPE base 10000, q·k scaled by 1/√head_dim."""
    config = _config(family="gemma", qk_norm=True, n_layers=4, sliding_window=8, full_attention_layers=(1, 3),
                     rope_theta=1e6, rope_local_theta=1e4, rms_eps=1e-6)
    # norms away from 0, in steps of 2^-10 so that the file's 1 + w gives w back exactly
    params = jax.tree.map(lambda x: np.round((np.asarray(x) + 0.25) * 1024) / 1024 if x.ndim <= 2 else x,
                          helpers.random_params(config))
    path = _write_arch(tmp_path / "gemma3.gguf", "gemma3", config, params,
                       {"gemma3.attention.sliding_window_pattern": 2})
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.ffn_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight",
            "blk.0.attn_k_norm.weight"} <= names
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config == dataclasses.replace(config, init_std=0.02)
    assert loaded.config.query_pre_attn_scalar == 0.0  # = head_dim
    _assert_trees_equal(loaded.params, params)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 12))
    np.testing.assert_array_equal(np.asarray(interop.apply_lm(loaded.config, loaded.params, tokens)),
                                  np.asarray(interop.apply_lm(config, params, tokens)))
    # without the pattern key: llama.cpp's fixed pattern, every 6th layer global (here: none of the 4)
    path = _write_arch(tmp_path / "plain.gguf", "gemma3", config, params)
    assert gguf_io.read_model_config(path).full_attention_layers == ()
    assert gguf_io.read_model_config(path).layer_windows() == (8, 8, 8, 8)


def _norms_off_zero(params):
    """Norm weights away from 0, in steps of 2^-10, so that a file's 1 + w gives w back exactly."""
    return jax.tree.map(lambda x: np.round((np.asarray(x) + 0.25) * 1024) / 1024 if x.ndim <= 2 else x, params)


def _assert_same_logits(loaded, config, params):
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 12))
    np.testing.assert_array_equal(np.asarray(interop.apply_lm(loaded.config, loaded.params, tokens)),
                                  np.asarray(interop.apply_lm(config, params, tokens)))


def test_gemma2_file_loads_with_its_soft_caps_and_alternating_windows(tmp_path):
    """Gemma 2's converter writes no RoPE base and no q/k norms; llama.cpp reads windows on the even layers (4096
    tokens without the key), the file's soft caps (50 / 30 without them), and scores by 1/√head_dim."""
    config = _config(family="gemma", n_layers=4, sliding_window=8, full_attention_layers=(1, 3), rms_eps=1e-6,
                     attn_softcap=5.0, final_softcap=3.0)
    params = _norms_off_zero(helpers.random_params(config))
    path = _write_arch(tmp_path / "gemma2.gguf", "gemma2", config, params,
                       {"gemma2.attention.sliding_window": 8, "gemma2.attn_logit_softcapping": 5.0,
                        "gemma2.final_logit_softcapping": 3.0}, hyperparameters=False)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.ffn_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    assert "blk.0.attn_q_norm.weight" not in names
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config == dataclasses.replace(config, init_std=0.02)
    _assert_trees_equal(loaded.params, params)
    _assert_same_logits(loaded, config, params)
    defaults = gguf_io.read_model_config(_write_arch(tmp_path / "plain.gguf", "gemma2", config, params,
                                                     hyperparameters=False))
    assert (defaults.sliding_window, defaults.attn_softcap, defaults.final_softcap) == (4096, 50.0, 30.0)
    assert defaults.full_attention_layers == (1, 3) and defaults.rope_theta == 10_000.0


def test_phi3_file_splits_its_fused_tensors_and_windows_every_layer(tmp_path):
    config = _config(family="phi3", n_kv_heads=4, tie_embeddings=False, sliding_window=8)
    params = helpers.random_params(config)
    path = _write_arch(tmp_path / "phi3.gguf", "phi3", config, params)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= names
    assert not names & {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"}
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config == dataclasses.replace(config, init_std=0.02)
    _assert_trees_equal(loaded.params, params)
    _assert_same_logits(loaded, config, params)
    # LongRoPE (the 128k models) is refused in one line
    writer = gguf.GGUFWriter(str(tmp_path / "long.gguf"), "phi3")
    gguf_export.add_hyperparameters(writer, config)
    writer.add_tensor("rope_factors_long.weight", np.ones(config.head_dim // 2, np.float32))
    write_and_close(writer)
    with pytest.raises(errors.ConfigError, match=r"long.gguf' uses LongRoPE scaling \(rope_factors_long"):
        gguf_io.load_gguf(str(tmp_path / "long.gguf"))


def test_gemma3_sentencepiece_tokenizer(tmp_path):
    """A "llama" (SentencePiece) vocabulary of a gemma3 file: BPE merges implied by the vocabulary (earlier tokens
    merge first), byte fallback for unknown characters, spaces as "▁", control tokens whole."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "hell", "hello", "▁w", "or", "▁wor", "ld", "▁world",
              "  "]
    tokens += pieces
    types = [3] * 6 + [6] * 256 + [1] * len(pieces)
    config = _config(family="gemma", qk_norm=True, vocab_size=len(tokens), rope_local_theta=1e4)
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    gguf_export.add_hyperparameters(writer, config)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    write_and_close(writer)
    tokenizer = load_tokenizer(str(path))
    ids = tokenizer.encode("hello world")
    assert [tokens[i] for i in ids] == ["hello", "▁world"]
    assert tokenizer.decode(ids) == "hello world"
    ids = tokenizer.encode("<start_of_turn>hez  é")
    assert [tokens[i] for i in ids] == ["<start_of_turn>", "he", "<0x7A>", "  ", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(ids) == "<start_of_turn>hez  é"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id) == (2, 1, 3, 0)
    # encode adds nothing; the tokenizer.json an HF export writes adds <bos> (add_bos_token absent: true)
    assert tokenizer._tokenizer.encode("hello", add_special_tokens=True).ids == [2, tokens.index("hello")]
    # a SentencePiece vocabulary of another architecture is not built (no reference to match)
    writer = gguf.GGUFWriter(str(tmp_path / "llama_sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_eos_token_id(1)
    write_and_close(writer)
    with pytest.raises(errors.DataError, match=r"SentencePiece \('llama'\) tokenizer for architecture 'llama'"):
        gguf_tokenizer.load_gguf_tokenizer(str(tmp_path / "llama_sp.gguf"))


# ---------------------------------------------------------------------------------------------------------------
# Tiny Llamas written as GGUF


@pytest.mark.parametrize("overrides", [dict(tie_embeddings=True), dict(tie_embeddings=False),
                                       dict(tie_embeddings=False, qkv_bias=True, rope_theta=50000.0)])
def test_f32_round_trip_exact(tmp_path, overrides):
    config = _config(**overrides)
    params = helpers.random_params(config)
    path = write_gguf(tmp_path / "tiny.gguf", config, params)
    loaded = interop.load_pretrained(path, dtype="float32")  # dispatches on the .gguf suffix
    assert loaded.config == dataclasses.replace(config, init_std=0.02)
    assert loaded.tokenizer is None
    _assert_trees_equal(loaded.params, params)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 12))
    np.testing.assert_array_equal(np.asarray(interop.apply_lm(loaded.config, loaded.params, tokens)),
                                  np.asarray(interop.apply_lm(config, params, tokens)))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_quantized_round_trip_within_quantization_error(tmp_path, qtype):
    config = _config(tie_embeddings=False)
    params = helpers.random_params(config)
    path = write_gguf(tmp_path / "tiny.gguf", config, params, qtype=qtype)
    loaded = gguf_io.load_gguf(path, dtype="float32")
    # per value: Q8_0 rounds to half a step of block amax / 127, Q4_0 (scale amax / -8, codes 0..15) is off by at
    # most amax / 8 at the clipped end, F16 rounds relatively by 2^-11; the float16 block scale adds about 2^-11
    error = {"Q8_0": 0.5 / 127, "Q4_0": 1 / 8, "F16": 2.0**-11}[qtype]
    for (path_, got), want in zip(jax.tree_util.tree_flatten_with_path(loaded.params)[0], jax.tree.leaves(params)):
        got, want = np.asarray(got), np.asarray(want)
        bound = np.abs(want).max() * (error + 2.0**-10) + 1e-6
        err = np.abs(got - want).max()
        assert err <= bound, (jax.tree_util.keystr(path_), err, bound)
        if "scale" not in jax.tree_util.keystr(path_) and qtype != "F16":
            assert err > 0  # really quantised
    # and exactly what ggml's reference decoder gives for the stored blocks (q/k rows back in HF order)
    reader = gguf.GGUFReader(path)
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    ref = gguf.quants.dequantize(q.data, q.tensor_type).astype(np.float32)
    ref = gguf_io.unpermute_rope_rows(ref, config.n_heads)
    np.testing.assert_array_equal(np.asarray(loaded.params["layers"]["attn"]["q"][1]),
                                  ref.T.reshape(config.d_model, config.n_heads, config.head_dim))


def test_load_onto_mesh_places_shardings(tmp_path):
    config = _config(tie_embeddings=False)
    params = helpers.random_params(config)
    path = write_gguf(tmp_path / "tiny.gguf", config, params, qtype="Q8_0")
    mesh = helpers.mesh((2, 2, 2))
    plain = gguf_io.load_gguf(path, dtype="float32")
    placed = gguf_io.load_gguf(path, dtype="float32", mesh=mesh)
    _, abstract, logical = models.abstract_model(config)
    want = sharding.tree_shardings(logical, abstract, mesh)
    for got, shard in zip(jax.tree.leaves(placed.params), jax.tree.leaves(want)):
        assert got.sharding == shard
    _assert_trees_equal(placed.params, jax.device_get(plain.params))


def test_read_model_config_reads_metadata_only(tmp_path):
    config = _config()
    path = write_gguf(tmp_path / "tiny.gguf", config, helpers.random_params(config))
    assert gguf_io.read_model_config(path) == dataclasses.replace(config, init_std=0.02)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer from GGUF metadata

SAMPLES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "    def f(x):\n\treturn x ** 2  # indented code, tabs and 12345 digits, x  42\n",
    "  leading and trailing spaces, double  spaces  \n\n\nblank lines",
    "unseen characters: ü, 日本語, 🙂, \x00 and \r\n line ends; I'm sure they'll",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}")


# llama.cpp's own pre-tokenizer regexes, copied as written in ggml-org/llama.cpp src/llama-vocab.cpp
# (llm_tokenizer_bpe, read at commit 00ad355e): LLAMA_VOCAB_PRE_TYPE_LLAMA3 ("llama-bpe") and
# LLAMA_VOCAB_PRE_TYPE_QWEN2 ("qwen2"). They are C string literals, hence the doubled backslashes; llama.cpp
# spells the case-insensitive contractions '[sS]|'[tT]|..., where HF's tokenizer.json spells (?i:'s|'t|...).
# The two differ only in \p{N}{1,3} (digits in runs of up to three) against \p{N} (every digit alone).
LLAMA_CPP_REGEX = {
    "llama-bpe": "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                 "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "qwen2": "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
             "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
}


def _split_pre_tokenizer(regex):
    """What Llama-3's and Qwen2's tokenizer.json hold: the regex split (matches kept as pieces, "Isolated"), then
    the byte-to-character map only (ByteLevel without GPT-2's regex)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _reference_pre_tokenizer(pre):
    """The HF pre-tokenizer that llama.cpp's `pre` type stands for, built without flaxalign's tables."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "gpt2":
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return _split_pre_tokenizer(LLAMA_CPP_REGEX[pre])


def _reference_tokenizer(pre):
    """A byte-level BPE trained with the pre-tokenizer that llama.cpp's `pre` type stands for."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = _reference_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([s * 3 for s in SAMPLES] + ["the quick brown fox 1234 jumps"] * 5, trainer)
    return tokenizer


def _vocab_metadata(reference, pre, **ids):
    model = json.loads(reference.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return dict(tokens=tokens, merges=merges, types=types, pre=pre, **ids)


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama-bpe", "qwen2"])
def test_tokenizer_matches_reference_bpe(tmp_path, pre):
    reference = _reference_tokenizer(pre)
    config = _config(vocab_size=reference.get_vocab_size())
    vocab = _vocab_metadata(reference, pre, bos=1, eos=2, unk=0, pad=2, template=CHATML)
    path = write_gguf(tmp_path / "tok.gguf", config, helpers.random_params(config), vocab=vocab)
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, gguf_tokenizer.GGUFTokenizer) and tokenizer.model_path == path
    for text in SAMPLES:
        want = reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text) == want, text
        assert tokenizer.decode(want) == text
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(s) for s in SAMPLES]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (1, 2, 0)
    # pad == EOS in the file and the embedding has no spare row: pad stays EOS, the vocabulary does not grow
    assert tokenizer.pad_id == 2 and tokenizer.vocab_size == config.vocab_size
    assert tokenizer.token_to_id("<|im_end|>") == 2 and tokenizer.token_to_id("nope-not-a-token") is None
    assert tokenizer.chat_template == CHATML and tokenizer.chat_template_name == "chatml"
    ids = chat.render_chat([{"role": "user", "content": "hi"}], tokenizer, "chatml", add_generation_prompt=True).ids
    assert ids == tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # load_gguf brings the same tokenizer along
    assert gguf_io.load_gguf(path, dtype="float32").tokenizer.encode(SAMPLES[1]) == tokenizer.encode(SAMPLES[1])


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """"smollm" splits every digit off first (llama.cpp's \\p{N} regex), so a space before a number stays with
    preceding spaces; GPT-2's regex alone would give " 42" its own pre-token."""
    reference = _reference_tokenizer("smollm")
    config = _config(vocab_size=reference.get_vocab_size())
    for pre in ("smollm", "gpt2"):
        write_gguf(tmp_path / f"{pre}.gguf", config, vocab=_vocab_metadata(reference, pre, eos=2))
    smollm, gpt2 = (gguf_tokenizer.load_gguf_tokenizer(str(tmp_path / f"{pre}.gguf")) for pre in ("smollm", "gpt2"))
    assert reference.token_to_id("ĠĠ") is not None  # a two-space token exists
    assert [smollm.decode([i]) for i in smollm.encode("x  42")] == ["x", "  ", "4", "2"]
    assert [gpt2.decode([i]) for i in gpt2.encode("x  42")] == ["x", " ", " ", "4", "2"]
    assert smollm.encode("x  42") == reference.encode("x  42").ids


# Texts where the Llama-3 / Qwen2 splits differ from each other or from GPT-2's: digit runs longer than three
# (ASCII, Arabic-Indic and full-width digits are all \p{N}), upper-case contractions followed by letters, runs of
# spaces and tabs, blank lines and CRLF, punctuation before newlines, and letters outside ASCII. All NFC already,
# so Qwen2's NFC normaliser (a normaliser, not part of the pre-tokenizer) would change nothing.
SPLIT_TEXTS = [
    "pi is 3.14159265, the year 2024 and 1234567 apples; 12 345 6789",
    "O'REILLY'S BOOK: DON'TCARE, WE'VE, THEY'LL, I'M, HE'D; don't they'll IT'SELF",
    "a  b   c    d\t\tend   ",
    "line one\nline two\n\n\nafter blanks\r\nwindows.\n\n  indented\n   \n",
    "unicode: naïve café, 日本語のテキスト, ١٢٣٤٥ and ４５６７ digits, 🙂🙂 emoji!!\n",
]


def test_reference_split_regexes_split_as_llama_cpp_intends():
    """The copied llama.cpp regexes, checked by hand: digits in threes (llama-bpe) or alone (qwen2), contractions
    of either case split off, a run of spaces leaves its last space to the next word, newlines kept together."""
    def pieces(pre, text):
        return [piece for piece, _ in pre_tokenizers.Split(
            tokenizers.Regex(LLAMA_CPP_REGEX[pre]), behavior="isolated").pre_tokenize_str(text)]
    assert pieces("llama-bpe", "x 1234567") == ["x", " ", "123", "456", "7"]
    assert pieces("qwen2", "x 1234567") == ["x", " ", "1", "2", "3", "4", "5", "6", "7"]
    for pre in LLAMA_CPP_REGEX:
        assert pieces(pre, "O'REILLY'S I'm") == ["O", "'RE", "ILLY", "'S", " I", "'m"]
        assert pieces(pre, "a   b\n\n c.\n") == ["a", "  ", " b", "\n\n", " c", ".\n"]
        assert pieces(pre, "日本語 ü!!") == ["日本語", " ü", "!!"]


def _boundary_blind_vocabulary():
    """A BPE vocabulary trained with every text as one word, so it holds merges across all the places a
    pre-tokenizer may split: a tokenizer built on it gives different ids when it splits differently."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SPLIT_TEXTS * 4, trainer)
    return tokenizer


def _with_pre_tokenizer(vocabulary, pre_tokenizer):
    tokenizer = tokenizers.Tokenizer.from_str(vocabulary.to_str())
    tokenizer.pre_tokenizer = pre_tokenizer
    return tokenizer


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_pre_tokenizers_match_llama_cpp_regex(tmp_path, pre):
    """A GGUF file with tokenizer.ggml.pre `pre` encodes every text to the ids the same vocabulary gives under
    llama.cpp's regex for that type; the vocabulary is sensitive enough that GPT-2's split, the other type's digit
    rule or case-sensitive contractions would each change some ids (checked here too)."""
    vocabulary = _boundary_blind_vocabulary()
    reference = _with_pre_tokenizer(vocabulary, _reference_pre_tokenizer(pre))
    config = _config(vocab_size=reference.get_vocab_size())
    path = write_gguf(tmp_path / f"{pre}.gguf", config, vocab=_vocab_metadata(reference, pre, eos=2))
    tokenizer = gguf_tokenizer.load_gguf_tokenizer(path)
    for text in SPLIT_TEXTS:
        want = reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text) == want, text
        assert tokenizer.decode(want) == text
    other = {"llama-bpe": "qwen2", "qwen2": "llama-bpe"}[pre]
    case_sensitive = LLAMA_CPP_REGEX[pre].replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
                                                  "'s|'t|'re|'ve|'m|'ll|'d")
    for wrong in (pre_tokenizers.ByteLevel(add_prefix_space=False), _split_pre_tokenizer(LLAMA_CPP_REGEX[other]),
                  _split_pre_tokenizer(case_sensitive)):
        mistaken = _with_pre_tokenizer(vocabulary, wrong)
        assert any(mistaken.encode(t).ids != reference.encode(t).ids for t in SPLIT_TEXTS), wrong


def test_tokenizer_pad_and_errors(tmp_path):
    reference = _reference_tokenizer("gpt2")
    config = _config(vocab_size=reference.get_vocab_size())
    # no pad in a vocabulary-only file (no embedding to fit): "<|pad|>" is added, as HFTokenizer does
    path = write_gguf(tmp_path / "nopad.gguf", config, vocab=_vocab_metadata(reference, "gpt2", eos=2))
    tokenizer = gguf_tokenizer.load_gguf_tokenizer(path)
    assert tokenizer.pad_id == config.vocab_size == tokenizer.vocab_size - 1 and tokenizer.bos_id is None
    assert tokenizer.chat_template is None and tokenizer.chat_template_name is None
    path = write_gguf(tmp_path / "pad.gguf", config, vocab=_vocab_metadata(reference, "gpt2", eos=2, pad=0))
    assert gguf_tokenizer.load_gguf_tokenizer(path).pad_id == 0
    with pytest.raises(errors.DataError, match="has no tokenizer.ggml.eos_token_id"):
        gguf_tokenizer.load_gguf_tokenizer(write_gguf(tmp_path / "noeos.gguf", config,
                                               vocab=_vocab_metadata(reference, "gpt2")))
    with pytest.raises(errors.DataError, match=r"tokenizer.ggml.pre 'mystery'; flaxalign knows"):
        gguf_tokenizer.load_gguf_tokenizer(write_gguf(tmp_path / "pre.gguf", config,
                                               vocab=_vocab_metadata(reference, "mystery", eos=2)))
    with pytest.raises(errors.DataError, match=r"has no tokenizer metadata"):
        load_tokenizer(write_gguf(tmp_path / "none.gguf", config))
    spm_file = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(spm_file), "llama")
    writer.add_tokenizer_model("llama")
    write_and_close(writer)
    with pytest.raises(errors.DataError, match=r"has a SentencePiece \('llama'\) tokenizer for architecture 'llama'; "
                                               r"flaxalign builds those for \['gemma2', 'gemma3'\] only"):
        load_tokenizer(str(spm_file))


# ---------------------------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture()
def tiny_file(tmp_path):
    config = _config()
    return write_gguf(tmp_path / "tiny.gguf", config, helpers.random_params(config)), config


@pytest.mark.parametrize("cut", ["half", "last byte", "in the header", "empty"])
def test_truncated_file_is_a_checkpoint_error(tiny_file, cut):
    path, _ = tiny_file
    with open(path, "rb") as f:
        data = f.read()
    keep = {"half": len(data) // 2, "last byte": len(data) - 1, "in the header": 200, "empty": 0}[cut]
    with open(path, "wb") as f:
        f.write(data[:keep])
    with pytest.raises(errors.CheckpointError, match=r"GGUF file '.*tiny.gguf' is truncated"):
        gguf_io.load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a gguf file at all, just text" * 10)
    with pytest.raises(errors.CheckpointError, match=r"'.*model.gguf' is truncated or not a GGUF file"):
        interop.load_pretrained(str(path))
    with pytest.raises(errors.CheckpointError, match=r"GGUF file '.*missing.gguf' does not exist"):
        gguf_io.load_gguf(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture(tmp_path):
    config = _config()
    path = write_gguf(tmp_path / "phi.gguf", config, arch="phi2")
    with pytest.raises(errors.ConfigError, match=r"^GGUF file '.*phi.gguf' has general.architecture='phi2'; "
                                                 r"flaxalign reads llama, qwen2, qwen3, gemma2, gemma3, phi3\.$"):
        gguf_io.load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    """A type gguf.quants cannot decode (F64 here) is named, with the types that are read."""
    config = _config()
    path = tmp_path / "f64.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_export.add_hyperparameters(writer, config)
    writer.add_tensor("token_embd.weight", np.zeros((config.vocab_size, config.d_model), np.float64))
    write_and_close(writer)
    with pytest.raises(errors.CheckpointError, match=r"GGUF tensor 'token_embd.weight' of '.*f64.gguf' has type "
                                                     r"F64; flaxalign reads \['F32', 'F16', 'Q4_0', "):
        gguf_io.load_gguf(str(path))


def test_missing_unknown_and_unsupported_features(tmp_path):
    config = _config()
    params = helpers.random_params(config)
    path = write_gguf(tmp_path / "a.gguf", config, params, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(errors.CheckpointError, match=r"GGUF file '.*a.gguf' has no tensor 'blk.1.ffn_up.weight'"):
        gguf_io.load_gguf(path)
    path = write_gguf(tmp_path / "b.gguf", config, params, metadata={"llama.rope.scaling.type": "linear"})
    with pytest.raises(errors.ConfigError, match="uses rope scaling"):
        gguf_io.load_gguf(path)
    path = write_gguf(tmp_path / "e.gguf", config, params, metadata={"llama.attention.sliding_window": 4,
                                                                     "llama.attention.sliding_window_pattern": 2})
    with pytest.raises(errors.ConfigError, match="alternates windowed and full attention layers"):
        gguf_io.load_gguf(path)
    path = write_gguf(tmp_path / "c.gguf", config, params, metadata={"llama.expert_count": 8})
    with pytest.raises(errors.ConfigError, match="mixture of experts"):
        gguf_io.load_gguf(path)
    writer_path = tmp_path / "d.gguf"
    writer = gguf.GGUFWriter(str(writer_path), "llama")
    write_and_close(writer)
    with pytest.raises(errors.CheckpointError, match=r"GGUF file '.*d.gguf' has no metadata key 'llama.embedding"):
        gguf_io.load_gguf(str(writer_path))
    writer = gguf.GGUFWriter(str(writer_path), "llama")
    for key, value in dict(block_count=1, embedding_length=64, feed_forward_length=192).items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_tensor("token_embd.weight", np.zeros((512, 64), np.float32))
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((192, 64), np.float32))
    write_and_close(writer)
    with pytest.raises(errors.CheckpointError, match=r"1 tensor\(s\) that flaxalign's llama has no place for, "
                                                     r"e.g. \['blk.0.attn_qkv.weight'\]"):
        gguf_io.load_gguf(str(writer_path))


def test_presets_read_fetched_weights_from_one_place_and_a_missing_file_says_how_to_fetch(tmp_path, monkeypatch):
    """$FLAXALIGN_MODELS (default the repository's .cache/) is where the smollm2 presets look; a missing file
    there names the fetch script and the directory."""
    from flaxalign import config_blocks
    from tests.config_files import CONFIGS, stage_config

    monkeypatch.delenv(config_blocks.MODELS_ENV, raising=False)
    repo = os.path.dirname(CONFIGS)
    assert config_blocks.smollm2_gguf() == os.path.join(repo, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv(config_blocks.MODELS_ENV, str(tmp_path))
    assert config_blocks.smollm2_gguf() == str(tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    for stage in ("sft", "dpo"):
        assert stage_config(stage, preset="smollm2_135m").init_from == f"gguf:{config_blocks.smollm2_gguf()}"
    assert stage_config("eval", preset="smollm2_135m").chat_template == "chatml"
    with pytest.raises(errors.CheckpointError, match=r"does not exist \(launch/fetch_smollm2.sh fetches it; presets "
                                                     r"read fetched weights from \$FLAXALIGN_MODELS, now "):
        gguf_io.load_gguf(config_blocks.smollm2_gguf())
    assert config_blocks.gemma3_gguf() == str(tmp_path / "gemma3" / "gemma-3-270m-q4_k_m.gguf")
    with pytest.raises(errors.CheckpointError, match=r"does not exist \(launch/fetch_gemma3.sh fetches it; presets"):
        gguf_io.load_gguf(config_blocks.gemma3_gguf())
    with pytest.raises(errors.CheckpointError, match=r"does not exist\.$"):  # elsewhere: no hint
        gguf_io.load_gguf("/nonexistent/model.gguf")

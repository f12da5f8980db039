"""GGUF export (`interop.gguf_export`): tiny Llamas written and read back by flaxalign's GGUF reader (F32 exactly,
F16 / BF16 / Q8_0 / Q5 / Q4 within stated bounds per weight and per logit), tied and untied
embeddings, GQA, q/k/v biases; the tokenizer read back encodes as the original (each pre-tokenizer llama.cpp
knows); Llama-3.1 rope factors; refusals in one sentence; atomic writes. The parity group loads the exported
file in transformers (`from_pretrained(..., gguf_file=...)`) and compares logits and token ids."""

import dataclasses
import json
import os

import gguf
import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from flaxalign import errors, interop
from flaxalign.data import chat, gguf_tokenizer
from flaxalign.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from flaxalign.interop import gguf as gguf_io
from flaxalign.interop import gguf_export
from flaxalign.models.llama import rope_frequencies
from tests import helpers
from tests.interop.test_gguf import (
    SAMPLES,
    SPLIT_TEXTS,
    _norms_off_zero,
    _reference_tokenizer,
    _write_arch,
    write_and_close,
)

TOKENS = np.random.default_rng(3).integers(0, 512, size=(2, 12))
TEXTS = SAMPLES + SPLIT_TEXTS


def hf_tokenizer(directory, pre: str = "gpt2", reference=None) -> HFTokenizer:
    """An `HFTokenizer` of a tokenizer.json folder: the reference BPE of llama.cpp's `pre` type, EOS
    "<|endoftext|>" (0), BOS "<|im_start|>" (1), no pad (so `HFTokenizer` adds "<|pad|>" in memory)."""
    os.makedirs(directory, exist_ok=True)
    (reference or _reference_tokenizer(pre)).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>"}, f)
    return load_tokenizer(str(directory))


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def _logits(config, params):
    return np.asarray(interop.apply_lm(config, params, TOKENS))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return hf_tokenizer(tmp_path_factory.mktemp("tok"), "llama-bpe")


# ---------------------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("overrides", [dict(tie_embeddings=True), dict(tie_embeddings=False, qkv_bias=True)])
def test_f32_export_reads_back_as_the_same_model_tokenizer_and_template(tmp_path, tokenizer, overrides):
    config = helpers.tiny_model_config(**overrides)  # GQA: 4 query heads share 2 kv heads
    assert config.n_kv_heads < config.n_heads
    params = helpers.random_params(config)
    path = str(tmp_path / "model.gguf")
    vocab = gguf_export.gguf_vocab(tokenizer, config.vocab_size)
    exported = gguf_export.export_gguf(path, config, params, vocab=vocab, chat_template=chat.JINJA["chatml"],
                                       gguf_type="f32", name="tiny")
    assert exported.fallbacks == () and exported.size == os.path.getsize(path)
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config == config
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), want)  # float32 copies of the same numbers
    np.testing.assert_allclose(_logits(loaded.config, loaded.params), _logits(config, params), atol=1e-4, rtol=0)

    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert ("output.weight" in names) != config.tie_embeddings and ("blk.0.attn_q.bias" in names) == config.qkv_bias
    read = loaded.tokenizer
    for text in TEXTS:
        assert read.encode(text) == tokenizer.encode(text), text
    assert (read.bos_id, read.eos_id, read.unk_id, read.pad_id) == (1, 0, None, tokenizer.pad_id)
    assert read.token_to_id("<|pad|>") == tokenizer.pad_id == tokenizer.vocab_size - 1
    assert read.chat_template == chat.JINJA["chatml"] and read.chat_template_name == "chatml"
    fields = _fields(path)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe" and fields["tokenizer.ggml.add_bos_token"]
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32 and fields["general.name"] == "tiny"
    types = fields["tokenizer.ggml.token_type"]
    assert len(types) == config.vocab_size  # padded to the embedding's rows
    assert [types[i] for i in (0, 1, 2, tokenizer.pad_id)] == [gguf_export.CONTROL] * 4
    assert set(types[tokenizer.vocab_size:]) == {gguf_export.UNUSED} and types[100] == gguf_export.NORMAL


# Per weight, relative to the tensor's largest |value|: F16 / BF16 round to nearest (half an ulp: 2^-11 / 2^-8);
# Q8_0 rounds to half a step of block amax / 127; Q4_0 / Q5_0 (scale amax / -8 or -16) are off by up to one step at
# the clipped end; Q4_1 / Q5_1 round to half a step of (max - min) / 15 or 31; the float16 block scales add ~2^-10.
WEIGHT_ERROR = {"f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 0.5 / 127, "q4_0": 1 / 8, "q4_1": 1 / 15,
                "q5_0": 1 / 16, "q5_1": 1 / 31}
# Max |logit difference| against the float32 model, on 2 x 12 random tokens of this random tiny model (logits up to
# ~4.5; its std-0.12 kernels amplify weight error more than a trained model's would). Measured (untied / tied):
# f16 5.4e-3 / 6.3e-3, bf16 4.8e-2 / 4.4e-2, q8_0 0.11 / 0.12, q5_1 0.92 / 0.91, q5_0 0.98 / 0.93, q4_1 1.6 / 1.8,
# q4_0 1.9 / 2.3; the bounds leave ~2.5x. Below 8 bits the per-weight bounds above are the real check.
LOGIT_ERROR = {"f16": 0.02, "bf16": 0.12, "q8_0": 0.3, "q5_1": 2.5, "q5_0": 2.5, "q4_1": 5.0, "q4_0": 5.0}


def test_each_type_reads_back_within_its_quantisation_error(tmp_path):
    config = helpers.tiny_model_config(tie_embeddings=False)
    params = helpers.random_params(config)
    reference = _logits(config, params)
    hf_state = interop.params_to_hf_state_dict(config, params)
    for gguf_type in WEIGHT_ERROR:
        path = str(tmp_path / f"{gguf_type}.gguf")
        gguf_export.export_gguf(path, config, params, gguf_type=gguf_type)
        reader = gguf.GGUFReader(path)
        matrix_type = gguf_export.GGUF_TYPES[gguf_type][0]
        for tensor in reader.tensors:
            assert tensor.tensor_type.name == (matrix_type if len(tensor.shape) > 1 else "F32"), tensor.name
            # decoded by ggml's reference decoder, q/k rows back in HF order
            got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            hf_name = gguf_io.hf_tensor_name(tensor.name)
            heads = config.n_heads if ".q_proj." in hf_name else config.n_kv_heads if ".k_proj." in hf_name else 0
            got = gguf_io.unpermute_rope_rows(got, heads) if heads else got
            want = hf_state[hf_name]
            error, bound = np.abs(got - want).max(), np.abs(want).max() * (WEIGHT_ERROR[gguf_type] + 2.0**-10)
            assert error <= bound, (gguf_type, tensor.name, error, bound)
            assert error > 0 or len(tensor.shape) == 1, (gguf_type, tensor.name)  # really stored as gguf_type
        loaded = gguf_io.load_gguf(path, dtype="float32")
        gap = np.abs(_logits(loaded.config, loaded.params) - reference).max()
        assert gap <= LOGIT_ERROR[gguf_type], (gguf_type, gap)


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    config = helpers.tiny_model_config(d_ff=200)  # ffn_down rows have 200 values: not whole 32-value blocks
    exported = gguf_export.export_gguf(str(tmp_path / "m.gguf"), config, helpers.random_params(config),
                                       gguf_type="q8_0")
    assert exported.fallbacks == ("blk.0.ffn_down.weight", "blk.1.ffn_down.weight")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_llama31_rope_scaling_is_written_as_llama_cpp_frequency_factors(tmp_path):
    """llama.cpp divides each rotary frequency by `rope_freqs`: plain θ^(-2i/d) / factor must be the scaled
    frequency flaxalign's model rotates with, and all three regimes (kept, divided, smoothed) occur here."""
    config = helpers.tiny_model_config(rope_theta=500000.0, rope_scaling_factor=8.0, rope_original_max_len=64)
    path = str(tmp_path / "scaled.gguf")
    gguf_export.export_gguf(path, config, helpers.random_params(config), gguf_type="f32")
    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    plain = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    np.testing.assert_allclose(plain / factors, np.asarray(rope_frequencies(config)), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    with pytest.raises(errors.ConfigError, match="uses rope scaling"):  # flaxalign's reader refuses such files
        gguf_io.load_gguf(path)


def test_models_llama_cpp_cannot_run_are_refused_before_writing(tmp_path):
    params = helpers.random_params(helpers.tiny_model_config())
    for overrides, message in [(dict(attn_softcap=30.0), "no attention soft cap"),
                               (dict(sliding_window=8, full_attention_layers=(1,)), "mixes windowed and full")]:
        with pytest.raises(errors.ConfigError, match=message):
            gguf_export.export_gguf(str(tmp_path / "m.gguf"), helpers.tiny_model_config(**overrides), params)
    with pytest.raises(errors.ConfigError, match=r"--gguf_type='q4_k' is not one of \['f16', 'bf16'"):
        gguf_export.export_gguf(str(tmp_path / "m.gguf"), helpers.tiny_model_config(), params, gguf_type="q4_k")
    assert os.listdir(tmp_path) == []


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path):
    config = helpers.tiny_model_config()
    params = helpers.random_params(config)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"the previous export")
    huge = jax.tree.map(np.copy, params)
    huge["layers"]["mlp"]["down"][1, 0, 0] = 1e6  # beyond float16, found while the last layers are written
    with pytest.raises(errors.ConfigError, match=r"blk.1.ffn_down.weight has values beyond float16's range .* "
                                                 r"--gguf_type=bf16 or f32"):
        gguf_export.export_gguf(str(path), config, huge, gguf_type="f16")
    assert os.listdir(tmp_path) == ["m.gguf"] and path.read_bytes() == b"the previous export"
    gguf_export.export_gguf(str(path), config, huge, gguf_type="bf16")
    assert gguf_io.read_model_config(str(path)) == config and oct(path.stat().st_mode & 0o777) == "0o644"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def _vocab_only_file(path, vocab, config, template=None) -> str:
    def add_metadata(writer):
        gguf_export.add_hyperparameters(writer, config)
        gguf_export.add_vocab(writer, vocab, template)

    gguf_export.write_file(str(path), add_metadata, [])
    return str(path)


@pytest.mark.parametrize("pre, name", [("gpt2", "gpt-2"), ("smollm", "smollm"), ("llama-bpe", "llama-bpe"),
                                       ("qwen2", "qwen2")])
def test_each_known_pre_tokenizer_is_written_under_llama_cpp_s_name_and_encodes_alike(tmp_path, pre, name):
    original = hf_tokenizer(tmp_path / "hf", pre)
    config = helpers.tiny_model_config(vocab_size=original.vocab_size)
    vocab = gguf_export.gguf_vocab(original, config.vocab_size)
    assert vocab.pre == name and name in gguf_tokenizer.PRE_TOKENIZERS
    read = gguf_tokenizer.load_gguf_tokenizer(_vocab_only_file(tmp_path / "tok.gguf", vocab, config))
    for text in TEXTS:
        assert read.encode(text) == original.encode(text), text
        assert read.decode(read.encode(text)) == text
    # and GGUF -> GGUF: the tokenizer read from the file is written again as the same vocabulary
    assert gguf_export.gguf_vocab(read, config.vocab_size) == vocab


def test_llama3_split_as_its_tokenizer_json_spells_it_is_llama_bpe(tmp_path):
    """Llama-3's tokenizer.json spells the contractions (?i:'s|...), llama.cpp '[sS]|...: the same split."""
    reference = _reference_tokenizer("llama-bpe")
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(gguf_tokenizer.PRE_TOKENIZERS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    original = hf_tokenizer(tmp_path, reference=reference)
    assert gguf_export.gguf_vocab(original, original.vocab_size).pre == "llama-bpe"


def test_tokenizers_gguf_cannot_express_are_refused_in_one_sentence(tmp_path):
    spm = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20] * 5, str(tmp_path / "t.model"),
                          vocab_size=300)
    with pytest.raises(errors.ConfigError, match=r"is a SentencePiece model, which GGUF export cannot write; it "
                                                 r"writes byte-level BPE tokenizers"):
        gguf_export.gguf_vocab(spm, 512)
    reference = _reference_tokenizer("gpt2")
    reference.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(errors.ConfigError, match=r"has a pre-tokenizer that matches none llama.cpp knows "
                                                 r"\(\{\"type\": \"Whitespace\"\}\); GGUF export writes"):
        gguf_export.gguf_vocab(hf_tokenizer(tmp_path / "ws", reference=reference), 512)
    reference = _reference_tokenizer("gpt2")
    reference.normalizer = tokenizers.normalizers.Lowercase()
    with pytest.raises(errors.ConfigError, match=r"normalises text \(Lowercase\), which llama.cpp would not do"):
        gguf_export.gguf_vocab(hf_tokenizer(tmp_path / "lower", reference=reference), 512)
    pieces = [("<|endoftext|>", 0.0), ("<|im_start|>", 0.0), ("a", -1.0)]
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces))
    with pytest.raises(errors.ConfigError, match=r"is a Unigram model of a kind GGUF export cannot write"):
        gguf_export.gguf_vocab(hf_tokenizer(tmp_path / "uni", reference=unigram), 512)
    big = hf_tokenizer(tmp_path / "big")
    with pytest.raises(errors.ConfigError, match=rf"has {big.vocab_size} tokens, but the model's embedding has 400 "
                                                 r"rows; GGUF needs one token per row\."):
        gguf_export.gguf_vocab(big, 400)


# ---------------------------------------------------------------------------------------------------------------
# transformers reads the exported file


@pytest.fixture(scope="module")
def torch_transformers():
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


@pytest.mark.parity
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_exported_file_with_the_same_logits_and_token_ids(torch_transformers, tmp_path,
                                                                                 tied):
    torch, transformers = torch_transformers
    original = hf_tokenizer(tmp_path / "hf", "gpt2")  # transformers builds GPT-2's split for "gpt-2" (not smollm's)
    # no q/k/v biases: transformers' GGUF reader drops a llama file's biases (llama.cpp's llama loads them)
    config = helpers.tiny_model_config(tie_embeddings=tied)
    params = helpers.random_params(config, seed=5)
    gguf_export.export_gguf(str(tmp_path / "model.gguf"), config, params, gguf_type="f32",
                            vocab=gguf_export.gguf_vocab(original, config.vocab_size),
                            chat_template=chat.JINJA["chatml"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                              dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == tied and model.config.num_key_value_heads == config.n_kv_heads
    tokens, mask = helpers.right_padded_batch(config.vocab_size)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = np.asarray(interop.apply_lm(config, params, tokens, mask))
    real = mask.astype(bool)
    assert np.abs(ours[real]).max() > 1.0
    # measured: max |difference| 2.9e-6 tied, 3.1e-6 untied (float32 on both sides, another summation order)
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4, rtol=0)

    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    for text in TEXTS:
        assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == original.encode(text), text
    assert their_tokenizer.eos_token == "<|endoftext|>" and their_tokenizer.bos_token == "<|im_start|>"
    assert their_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                               add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parity
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_transformers_tokenizer_from_the_exported_file_splits_like_the_original(torch_transformers, tmp_path, pre):
    _, transformers = torch_transformers
    original = hf_tokenizer(tmp_path / "hf", pre)
    config = helpers.tiny_model_config(vocab_size=original.vocab_size)
    _vocab_only_file(tmp_path / "tok.gguf", gguf_export.gguf_vocab(original, config.vocab_size), config)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == original.encode(text), text




@pytest.mark.parity  # needs the fetched SmolLM2 file, as the other SmolLM2 tests (no torch)
def test_smollm2_exported_again_is_what_llama_cpp_s_converter_wrote(tmp_path):
    """A real file through `convert`: SmolLM2-135M-Instruct (written by llama.cpp's convert_hf_to_gguf.py and
    llama-quantize; Q4_1, tied, 49,152 tokens, "smollm" split, its own chat template) exported as f32 has the same
    hyper-parameters and tokenizer metadata, key for key, and the same tensors — the values its Q4_1 blocks decode
    to, in the same (permuted) layout."""
    from flaxalign.convert import convert
    from tests.interop.test_gguf_parity import _find_gguf

    original = _find_gguf()
    exported = str(tmp_path / "smollm2.gguf")
    message = convert(original, exported, "gguf", gguf_type="f32")
    assert "(49152 tokens, pre-tokenizer smollm) and the tokenizer's chat template" in message, message
    theirs, ours = gguf.GGUFReader(original), gguf.GGUFReader(exported)
    keys = {k for k in theirs.fields if k.startswith(("llama.", "tokenizer."))}
    # ours adds head_dim (key/value_length) and add_eos_token; add_bos_token is flaxalign's rule (it has a BOS)
    assert {k for k in ours.fields if k.startswith(("llama.", "tokenizer."))} - keys == {
        "llama.attention.key_length", "llama.attention.value_length", "tokenizer.ggml.add_eos_token"}
    assert keys - set(ours.fields) == {"tokenizer.ggml.add_space_prefix"}  # an SPM setting, False here
    for key in sorted(keys - {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token"}):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.add_bos_token"].contents()
    references = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(references)  # (in another order: llama.cpp's is HF's)
    for mine in ours.tensors:
        reference = references[mine.name]
        assert mine.tensor_type.name == "F32", mine.name
        np.testing.assert_array_equal(mine.data, gguf.quants.dequantize(reference.data, reference.tensor_type),
                                      err_msg=mine.name)


# ---------------------------------------------------------------------------------------------------------------
# Other architectures: Qwen3, Gemma 2 / 3, Phi-3 written as llama.cpp's converter writes them


FAMILY_CONFIGS = {  # architecture -> a tiny model of it that llama.cpp can run as it is
    "qwen3": dict(qk_norm=True, head_dim=32, tie_embeddings=False),
    "gemma2": dict(family="gemma", n_layers=4, sliding_window=8, full_attention_layers=(1, 3), attn_softcap=5.0,
                   final_softcap=3.0, rms_eps=1e-6),
    "gemma3": dict(family="gemma", qk_norm=True, n_layers=6, sliding_window=8, full_attention_layers=(5,),
                   rope_theta=1e6, rope_local_theta=1e4, rms_eps=1e-6),
    "phi3": dict(family="phi3", n_kv_heads=4, tie_embeddings=False, sliding_window=8),
}


@pytest.mark.parametrize("arch", FAMILY_CONFIGS)
def test_other_architectures_are_written_as_llama_cpp_s_converter_writes_them(tmp_path, arch):
    """The exported file (f32) holds the tensors a file converted by llama.cpp from the HF checkpoint holds (names,
    Gemma's 1 + w norms, Phi-3's fused tensors, no RoPE row permutation: `test_gguf._write_arch`), under the
    architecture of the model, and reads back as the same model."""
    config = helpers.tiny_model_config(**FAMILY_CONFIGS[arch])
    params = _norms_off_zero(helpers.random_params(config, seed=3))
    assert gguf_export.gguf_architecture(config) == arch
    path = str(tmp_path / "ours.gguf")
    gguf_export.export_gguf(path, config, params, gguf_type="f32")
    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(_write_arch(tmp_path / "theirs.gguf", arch, config, params))
    assert gguf_tokenizer.metadata_value(ours, "general.architecture") == arch
    want = {t.name: np.asarray(t.data) for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(want)
    for tensor in ours.tensors:
        np.testing.assert_array_equal(np.asarray(tensor.data), want[tensor.name], err_msg=tensor.name)
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config == dataclasses.replace(config, init_std=0.02)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    np.testing.assert_array_equal(np.asarray(interop.apply_lm(loaded.config, loaded.params, tokens)),
                                  np.asarray(interop.apply_lm(config, params, tokens)))


@pytest.mark.parametrize("arch, overrides, message", [
    ("gemma2", dict(full_attention_layers=(0, 2)), r"gemma2 windows the even layers .* are \[0, 8, 0, 8\]"),
    ("gemma2", dict(query_pre_attn_scalar=8.0), r"scales q·k by 1/√16 at this size; .*query_pre_attn_scalar=8"),
    ("gemma3", dict(full_attention_layers=(2, 5)), r"every 6th layer global .* \(model.full_attention_layers\)"),
    ("gemma3", dict(rope_local_theta=5e4), r"RoPE base 10000 on its windowed layers; .*rope_local_theta=50000"),
    ("gemma2", dict(rope_local_theta=5e4), r"gemma2 uses RoPE base 10000 on its windowed .*rope_local_theta=50000"),
    ("gemma3", dict(final_softcap=3.0), r"gemma3 architecture has no final logit soft cap \(model.final_softcap\)"),
    ("phi3", dict(head_dim=32), r"phi3 rotates d_model / n_heads dims .* model.head_dim=32"),
    ("qwen3", dict(query_pre_attn_scalar=8.0), r"qwen3 architecture scales q·k by 1/√head_dim with one RoPE base"),
])
def test_what_llama_cpp_computes_otherwise_is_refused_in_one_line(tmp_path, arch, overrides, message):
    config = helpers.tiny_model_config(**{**FAMILY_CONFIGS[arch], **overrides})
    with pytest.raises(errors.ConfigError, match=message) as e:
        gguf_export.export_gguf(str(tmp_path / "m.gguf"), config, helpers.random_params(config))
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_gemma_gguf_vocabulary_is_written_back_as_the_source_states_it(tmp_path):
    """A Gemma model whose tokenizer is its GGUF file's SentencePiece vocabulary exports with that vocabulary:
    tokens, scores and types copied (llama.cpp merges by score), the special ids and add_bos kept, and the file
    reads back to a tokenizer that encodes alike."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + ["▁", "h", "e", "l", "o", "he", "hell", "hello", "▁hello"]
    types = [3] * 6 + [6] * 256 + [1] * 9
    scores = [0.0] * 262 + [-float(i) for i in range(9)]
    config = helpers.tiny_model_config(**FAMILY_CONFIGS["gemma3"], vocab_size=len(tokens) + 3)
    source = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(str(source), "gemma3")
    gguf_export.add_hyperparameters(writer, config)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add, value in ((writer.add_bos_token_id, 2), (writer.add_eos_token_id, 1), (writer.add_unk_token_id, 3),
                       (writer.add_pad_token_id, 0)):
        add(value)
    writer.add_add_space_prefix(False)
    write_and_close(writer)
    tokenizer = load_tokenizer(str(source))
    vocab = gguf_export.gguf_vocab(tokenizer, config.vocab_size)
    assert vocab.model == "llama" and vocab.tokens[:len(tokens)] == tokens and vocab.scores[:len(tokens)] == scores
    assert vocab.tokens[len(tokens):] == [f"[PAD{i}]" for i in range(len(tokens), len(tokens) + 3)]
    path = str(tmp_path / "model.gguf")
    gguf_export.export_gguf(path, config, helpers.random_params(config), vocab=vocab, gguf_type="f32")
    reader = gguf.GGUFReader(path)
    assert gguf_tokenizer.metadata_value(reader, "tokenizer.ggml.add_space_prefix") is False
    assert gguf_tokenizer.metadata_value(reader, "tokenizer.ggml.bos_token_id") == 2
    again = load_tokenizer(path)
    for text in ("hello hello", "<start_of_turn>hello é<end_of_turn>"):
        assert again.encode(text) == tokenizer.encode(text), text

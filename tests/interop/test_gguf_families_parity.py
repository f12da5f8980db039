"""Tiny GGUF files of each non-Llama architecture flaxalign reads — qwen2, qwen3, gemma2, gemma3, phi3 — written as
llama.cpp's convert_hf_to_gguf.py writes them (`test_gguf._write_arch`) and as flaxalign exports them, loaded by
transformers (`gguf_file=`, its
own GGUF reader and tensor renaming) and by flaxalign: the same logits on a right-padded batch. This checks our
tensor tables, the Gemma norms' 1 + w, Phi-3's fused tensors and the windows / soft caps each file implies
against an independent reader. Each config stays inside what transformers' GGUF reader maps: it reads no soft caps
(Gemma 2's defaults 50 / 30 are written), keeps Gemma's query_pre_attn_scalar at 256 and Qwen3's head_dim at 128
(those head sizes here, ≠ d_model / heads), reads no Phi-3 window (the 16 tokens fit in it) and takes Phi-3's pad
id from the tokenizer keys (else 32000, outside the tiny vocabulary)."""

import dataclasses

import numpy as np
import pytest

from flaxalign import interop
from flaxalign.interop import gguf as gguf_io
from flaxalign.interop import gguf_export
from tests import helpers
from tests.interop.test_gguf import _norms_off_zero, _write_arch

pytestmark = pytest.mark.parity

CASES = {
    "qwen2": (dict(qkv_bias=True, rope_theta=1e6), {}),
    "qwen3": (dict(qk_norm=True, head_dim=128, tie_embeddings=False), {}),
    "gemma2": (dict(family="gemma", head_dim=256, sliding_window=8, full_attention_layers=(1,), rms_eps=1e-6,
                    attn_softcap=50.0, final_softcap=30.0),
               {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}),
    "gemma3": (dict(family="gemma", qk_norm=True, head_dim=256, n_layers=6, sliding_window=8,
                    full_attention_layers=(5,), rope_theta=1e6, rope_local_theta=1e4, rms_eps=1e-6), {}),
    "phi3": (dict(family="phi3", n_kv_heads=4, tie_embeddings=False, sliding_window=16),
             {"tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.eos_token_id": 1}),
}


@pytest.fixture(scope="module")
def transformers():
    torch = pytest.importorskip("torch")
    return torch, pytest.importorskip("transformers")


def _exported(path, config, params) -> str:
    """The model as `flaxalign convert --format=gguf` writes it (f32), with a stand-in vocabulary for the ids."""
    vocab = gguf_export.GGUFVocab(tokens=[f"t{i}" for i in range(config.vocab_size)],
                                  types=[gguf_export.NORMAL] * config.vocab_size, merges=[], pre="gpt-2", eos=1, pad=0)
    gguf_export.export_gguf(str(path), config, params, vocab=vocab, gguf_type="f32")
    return str(path)


@pytest.mark.parametrize("writer", ["converter", "export"])
@pytest.mark.parametrize("arch", CASES)
def test_transformers_reads_the_tiny_file_as_we_do(transformers, tmp_path, arch, writer):
    """`converter`: the file as llama.cpp converts the HF checkpoint (what flaxalign reads); `export`: the file
    flaxalign writes (`gguf_export`; qwen2 goes out as `llama`, with its q/k rows permuted)."""
    torch, transformers = transformers
    overrides, metadata = CASES[arch]
    config = helpers.tiny_model_config(**overrides)
    params = _norms_off_zero(helpers.random_params(config, seed=7))
    path = (_write_arch(tmp_path / "model.gguf", arch, config, params, metadata) if writer == "converter" else
            _exported(tmp_path / "model.gguf", config, params))
    ours = gguf_io.load_gguf(path, dtype="float32")
    assert ours.config == dataclasses.replace(config, init_std=0.02)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                              dtype=torch.float32, attn_implementation="eager").eval()
    tokens, mask = helpers.right_padded_batch(config.vocab_size)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
    logits = np.asarray(interop.apply_lm(ours.config, ours.params, tokens, mask))
    real = mask.astype(bool)
    assert np.abs(logits[real]).max() > 0.5
    # measured max |difference|: qwen2 3.8e-6, qwen3 6.7e-6, gemma2 2.0e-5, gemma3 2.1e-5, phi3 4.5e-6 (float32 both
    # sides, other summation orders; Gemma's logits are the largest)
    np.testing.assert_allclose(theirs[real], logits[real], atol=1e-4, rtol=0)

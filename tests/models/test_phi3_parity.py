"""Phi-3 against transformers: tiny random float32 `Phi3ForCausalLM` models (fused qkv_proj / gate_up_proj) converted
to flaxalign give the same logits (both attention implementations, packed rows, a right-padded row; a window
shorter than the rows), the state dict round-trips exactly, `save_hf` writes directories transformers loads as the
same class with the same logits and the same config fields and tensors, a sharded read onto an 8-device
fsdp × tensor mesh gives the same params, and `Phi3ForSequenceClassification` reward models load and save."""

import dataclasses
import os

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
WINDOW = 6  # shorter than every test row: Phi-3 windows every layer (keys > q - window), as Mistral does

# initializer_range makes q·k scores and logits O(1), so a layout error cannot hide in noise
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=128, original_max_position_embeddings=128, initializer_range=0.15,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "gqa_window": dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=WINDOW,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


def _build_hf(case: str, cls: str = "Phi3ForCausalLM", **extra):
    """A random float32 eager HF model whose norm weights are moved off 1."""
    torch.manual_seed(sum(map(ord, case)))
    hf_config = transformers.Phi3Config(**{**BASE, **CASES[case], **extra}, attn_implementation="eager")
    model = getattr(transformers, cls)(hf_config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request) -> str:
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
    """(HF model, tokens, {attention: flaxalign logits}) of the packed batch, both implementations in one jit."""
    model, config, params = converted
    tokens, positions, segment_ids = helpers.random_rows_and_a_packed_row(config.vocab_size)
    graphdefs = {impl: models.abstract_model(dataclasses.replace(config, attention=impl))[0] for impl in ATTENTION}
    logits = jax.jit(lambda p: {impl: models.merge(g, p).logits(tokens, positions, segment_ids)
                                for impl, g in graphdefs.items()})
    return model, tokens, jax.tree.map(np.asarray, logits(params))


def _hf_logits(model, tokens, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(np.asarray(mask, np.int64))}
        return model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs).logits.numpy()


def test_config_mapping(case, converted):
    model, config, _ = converted
    c = model.config
    assert config.family == "phi3" and not config.qk_norm and not config.qkv_bias
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.d_ff) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    assert config.tie_embeddings == c.tie_word_embeddings and config.rms_eps == c.rms_norm_eps
    assert config.sliding_window == (c.sliding_window or 0) and not config.full_attention_layers
    assert config.rope_theta == c.rope_parameters["rope_theta"]


@pytest.mark.parametrize("attention", ATTENTION)
def test_logits_match(flax_runs, attention):
    model, tokens, runs = flax_runs
    theirs = _hf_logits(model, tokens[:BATCH])
    assert np.abs(theirs).max() > 0.5  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(runs[attention][:BATCH], theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("attention", ATTENTION)
def test_packed_documents_match_separate_runs(flax_runs, attention):
    model, tokens, runs = flax_runs
    starts = np.cumsum((0,) + DOC_LENGTHS)
    for start, end in zip(starts[:-1], starts[1:]):
        np.testing.assert_allclose(runs[attention][-1:, start:end], _hf_logits(model, tokens[-1:, start:end]),
                                   atol=TOLERANCE, rtol=0)


def test_right_padded_row_matches_transformers_and_the_unpadded_sequence(converted):
    model, config, params = converted
    tokens, mask = helpers.right_padded_batch(config.vocab_size)
    ours = np.asarray(hf.apply_lm(config, params, tokens, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], _hf_logits(model, tokens, mask)[real], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours[1, :9], _hf_logits(model, tokens[1:, :9])[0], atol=TOLERANCE, rtol=0)


def test_state_dict_round_trip(converted):
    model, config, params = converted
    back = hf.params_to_hf_state_dict(config, params)
    state = model.state_dict()
    assert "model.layers.0.self_attn.qkv_proj.weight" in back and "model.layers.0.mlp.gate_up_proj.weight" in back
    for name, value in back.items():
        np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)
    assert set(state) - set(back) == ({"lm_head.weight"} if config.tie_embeddings else set())


# the transformers config fields that decide the forward pass (and generation's special ids)
FORWARD_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                  "tie_word_embeddings", "rope_parameters", "sliding_window", "bos_token_id", "eos_token_id",
                  "pad_token_id")


def test_save_hf_is_lossless_and_loads_in_transformers_with_equal_logits(converted, tmp_path):
    """HF → flaxalign → `save_hf` → transformers: the same class, forward config fields, tensors (names and values)
    and logits."""
    from safetensors.numpy import load_file

    model, config, params = converted
    written = hf.save_hf(config, params, str(tmp_path), source=hf.source_fields(model.config.to_dict()))
    assert written["architectures"] == ["Phi3ForCausalLM"] and written["model_type"] == "phi3"
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    assert type(again) is type(model)
    assert {k: getattr(again.config, k) for k in FORWARD_FIELDS} == {k: getattr(model.config, k)
                                                                      for k in FORWARD_FIELDS}
    got = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    want = {name: tensor.numpy() for name, tensor in model.state_dict().items()
            if not (config.tie_embeddings and name == "lm_head.weight")}
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    tokens, _, _ = helpers.random_rows_and_a_packed_row(config.vocab_size)
    np.testing.assert_allclose(_hf_logits(again, tokens[:BATCH]), _hf_logits(model, tokens[:BATCH]), atol=1e-5,
                               rtol=0)
    assert hf.read_model_config(str(tmp_path)) == config


def test_sharded_files_read_onto_an_fsdp_tensor_mesh_give_the_same_params(converted, tmp_path):
    """transformers' own sharded save (fused tensors across files), read onto a (1, 4, 2) mesh: every device's
    region of q / k / v / gate / up read from its rows of the fused tensor; the params equal the plain load."""
    model, config, params = converted
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.isfile(os.path.join(str(tmp_path), hf.INDEX_FILE))
    loaded = hf.load_pretrained(str(tmp_path), dtype="float32", mesh=helpers.mesh((1, 4, 2)))
    flat_loaded, flat_params = jax.tree_util.tree_leaves_with_path(loaded.params), jax.tree.leaves(params)
    assert len(flat_loaded) == len(flat_params)
    assert not loaded.params["layers"]["attn"]["q"].sharding.is_fully_replicated
    for (path, got), want in zip(flat_loaded, flat_params):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))


def test_sequence_classification_loads_and_saves_as_a_reward_model(tmp_path):
    """`Phi3ForSequenceClassification` → flaxalign reward model (scores equal) → `save_hf` with the head →
    transformers loads the same class with the same scores."""
    model = _build_hf("gqa_window", "Phi3ForSequenceClassification", num_labels=1)
    model.save_pretrained(str(tmp_path / "source"))
    loaded = hf.load_pretrained(str(tmp_path / "source"), dtype="float32")
    assert loaded.config.family == "phi3" and loaded.head is not None and "lm_head" not in loaded.params
    tokens, mask = helpers.right_padded_batch(loaded.config.vocab_size)
    tokens = np.where(tokens == 0, 1, tokens) * mask  # HF scores the last token that is not pad (id 0)

    def hf_scores(m):
        with torch.no_grad():
            return m(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits[:, 0].numpy()

    theirs = hf_scores(model)
    assert np.abs(theirs).max() > 0.05
    ours = np.asarray(hf.apply_reward(loaded.config, loaded.params, loaded.head, tokens, mask))
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)
    hf.save_hf(loaded.config, loaded.params, str(tmp_path / "export"), score_head=loaded.head, pad_token_id=0)
    again = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "export"), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(again).__name__ == "Phi3ForSequenceClassification"
    np.testing.assert_allclose(hf_scores(again), theirs, atol=1e-5, rtol=0)

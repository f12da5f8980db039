"""Gemma 3 (text) and Gemma 2 against transformers: tiny random float32 `Gemma3ForCausalLM` / `Gemma2ForCausalLM`
models (Gemma 2 with attention and final logit soft caps small enough to bite) converted to flaxalign give
the same logits (both attention implementations, packed rows, a right-padded row), `save_hf` writes directories
transformers loads with the same logits, the KV-cache sampler's greedy tokens equal the full forward's and
transformers' own `generate`, and `Gemma3TextForSequenceClassification` reward models load and save."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxalign import models
from flaxalign.data.batching import left_pad_prompts
from flaxalign.interop import hf
from flaxalign.sampler import generate, generate_recompute
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
WINDOW = 6  # shorter than every test row: a window lost, moved or off by one changes the logits

# initializer_range makes q·k scores and logits O(1), so a layout error cannot hide in noise
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=128, initializer_range=0.15, rms_norm_eps=1e-6, sliding_window=WINDOW)
CASES = {
    # GQA, head_dim 24 ≠ d/heads, untied head, query_pre_attn_scalar ≠ head_dim, RoPE bases of our own, layer 1
    # global (transformers 5's per-kind rope_parameters)
    "gqa_untied": dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, query_pre_attn_scalar=20,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    # MQA, tied, the scalar = head_dim (as in the released models), transformers' default bases (1e6 global, 1e4
    # local), the global layer from the older sliding_window_pattern spelling (every 3rd: layer 2)
    "mqa_tied": dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, query_pre_attn_scalar=16,
                     sliding_window_pattern=3),
    # Gemma 2: GQA, untied, no q/k norms, one RoPE base of our own, Gemma2Config's default layer_types (every 2nd
    # layer global: layer 1), soft caps that bite (attention scores reach ~3, logits ~6 uncapped)
    "gemma2": dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, query_pre_attn_scalar=20,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
}
GLOBAL_LAYERS = {"gqa_untied": (1,), "mqa_tied": (2,), "gemma2": (1,)}
HF_CLASSES = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}  # the others: Gemma 3


def _build_hf(case: str, cls: str | None = None, **extra):
    """A random float32 eager HF model whose (1 + w) norm weights, q/k norms included, are moved off 0."""
    torch.manual_seed(sum(map(ord, case)))
    config_cls, default_cls = HF_CLASSES.get(case, ("Gemma3TextConfig", "Gemma3ForCausalLM"))
    hf_config = getattr(transformers, config_cls)(**{**BASE, **CASES[case], **extra}, attn_implementation="eager")
    model = getattr(transformers, cls or default_cls)(hf_config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.3 * torch.randn_like(param))
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
    gemma2 = case in HF_CLASSES
    assert config.family == "gemma" and config.qk_norm == (not gemma2) and not config.qkv_bias
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.d_ff, config.head_dim) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
        c.head_dim)
    assert config.tie_embeddings == c.tie_word_embeddings and config.rms_eps == c.rms_norm_eps
    assert config.full_attention_layers == GLOBAL_LAYERS[case] and config.sliding_window == WINDOW
    assert (config.query_pre_attn_scalar or config.head_dim) == c.query_pre_attn_scalar
    if gemma2:
        assert config.rope_theta == c.rope_parameters["rope_theta"] and not config.rope_local_theta
        assert (config.attn_softcap, config.final_softcap) == (c.attn_logit_softcapping, c.final_logit_softcapping)
        return
    assert config.rope_theta == c.rope_parameters["full_attention"]["rope_theta"]
    assert (config.rope_local_theta or config.rope_theta) == c.rope_parameters["sliding_attention"]["rope_theta"]
    assert config.attn_softcap == config.final_softcap == 0.0


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
    for name, value in back.items():
        np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)
    assert set(state) - set(back) == ({"lm_head.weight"} if config.tie_embeddings else set())


def test_save_hf_loads_in_transformers_with_equal_logits(converted, tmp_path):
    model, config, params = converted
    written = hf.save_hf(config, params, str(tmp_path), source=hf.source_fields(model.config.to_dict()))
    assert written["architectures"] == [type(model).__name__] and written["model_type"] == model.config.model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    assert type(again) is type(model)
    assert again.config.layer_types == model.config.layer_types
    assert again.config.rope_parameters == model.config.rope_parameters
    tokens, positions, _ = helpers.random_rows_and_a_packed_row(config.vocab_size)
    np.testing.assert_allclose(_hf_logits(again, tokens[:BATCH]), _hf_logits(model, tokens[:BATCH]), atol=1e-5,
                               rtol=0)
    assert hf.read_model_config(str(tmp_path)) == config


def test_kv_cache_greedy_decode_equals_the_full_forward_and_transformers_generate(converted):
    """Left-padded prompts, 12 new tokens past the window of 6: the cached sampler's greedy tokens equal
    recomputing the whole prefix each step, and, row by row, transformers' greedy `generate` (its own sliding-window
    cache) on the unpadded prompt."""
    model, config, params = converted
    prompts = [[3, 17, 40, 9, 81, 5, 66, 12], [7, 29, 101], [200, 4, 4, 90, 31]]
    new = 12
    graphdef = models.abstract_model(config)[0]
    kwargs = dict(max_new_tokens=new, eos_id=-1, pad_id=0, temperature=0.0)  # no EOS: every row runs all steps
    batch = left_pad_prompts(prompts, pad_id=0)
    cached, recomputed = (jax.device_get(jax.jit(lambda p, b, fn=fn: fn(models.merge(graphdef, p), b,
                                                                         jax.random.PRNGKey(0), **kwargs))(
        params, batch)) for fn in (generate, generate_recompute))
    np.testing.assert_array_equal(cached["response"], recomputed["response"])
    np.testing.assert_allclose(cached["logps"], recomputed["logps"], atol=2e-5)
    model.generation_config.eos_token_id = None
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, pad_token_id=0)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(cached["response"][row], theirs, err_msg=f"row {row}")


@pytest.mark.parametrize("case, cls", [("gqa_untied", "Gemma3TextForSequenceClassification"),
                                       ("gemma2", "Gemma2ForSequenceClassification")])
def test_sequence_classification_loads_and_saves_as_a_reward_model(tmp_path, case, cls):
    """`Gemma3TextForSequenceClassification` / `Gemma2ForSequenceClassification` → flaxalign reward model (scores
    equal) → `save_hf` with the head → transformers loads the same class with the same scores."""
    model = _build_hf(case, cls, num_labels=1, pad_token_id=0)
    model.save_pretrained(str(tmp_path / "source"))
    loaded = hf.load_pretrained(str(tmp_path / "source"), dtype="float32")
    assert loaded.config.family == "gemma" and loaded.head is not None and "lm_head" not in loaded.params
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
    assert type(again).__name__ == cls
    np.testing.assert_allclose(hf_scores(again), theirs, atol=1e-5, rtol=0)


def test_gemma2_soft_caps_bite():
    """Without either cap flaxalign's logits leave transformers' by far more than the tolerance: the parity above
    checks both caps, not a model on which they do nothing."""
    model = _build_hf("gemma2")
    config = hf.model_config_from_hf(model.config.to_dict())
    params = hf.params_from_hf_state_dict(config, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    tokens, _, _ = helpers.random_rows_and_a_packed_row(config.vocab_size)
    theirs = _hf_logits(model, tokens[:BATCH])
    for field in ("attn_softcap", "final_softcap"):
        off = dataclasses.replace(config, **{field: 0.0})
        ours = np.asarray(models.merge(models.abstract_model(off)[0], params).logits(tokens[:BATCH]))
        assert np.abs(ours - theirs).max() > 100 * TOLERANCE, field

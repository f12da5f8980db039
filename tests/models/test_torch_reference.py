"""bench/torch_reference.py computes the function flaxalign computes, so the speed ratio compares like with like."""

import dataclasses
import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest

from flaxalign import models
from tests import helpers

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4  # float32 on both sides


def _load_reference():
    # bench/ is a folder of scripts, not a package: load the module from its path
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "torch_reference.py"
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = None  # bench/torch_reference.py imports torch: loaded by the fixture below, not at collection


@pytest.fixture(scope="module", autouse=True)
def _import_reference():
    global ref
    pytest.importorskip("torch")
    ref = _load_reference()


TINY = models.ModelConfig(**models.preset("tiny"))
CONFIGS = {
    "untied_gqa_bias": dataclasses.replace(TINY, tie_embeddings=False, qkv_bias=True),
    # tied head, head_dim ≠ d/heads, multi-query, Llama-3.1 rope scaling with all three wavelength branches in use
    "tied_llama3_rope": dataclasses.replace(TINY, head_dim=32, n_kv_heads=1, rope_theta=500000.0,
                                            rope_scaling_factor=8.0, rope_original_max_len=64),
}


def _batch(config):
    """Row 0: documents of 12 and 20 tokens packed, positions restarting; row 1: one 32-token document."""
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 32), dtype=np.int32)
    positions = np.stack([np.concatenate([np.arange(12), np.arange(20)]), np.arange(32)]).astype(np.int32)
    segment_ids = np.array([[1] * 12 + [2] * 20, [1] * 32], np.int32)
    return tokens, positions, segment_ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_reference_logits_match_flaxalign(name):
    config = CONFIGS[name]
    params = helpers.random_params(config)
    tokens, positions, segment_ids = _batch(config)
    graphdef, _, _ = models.abstract_model(config)
    ours = np.asarray(jax.jit(lambda p: models.merge(graphdef, p).logits(tokens, positions, segment_ids))(params))
    theirs = ref.torch_logits(config, params, tokens, positions, segment_ids)
    assert np.abs(theirs).max() > 0.5  # not two near-zero tensors
    np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)
    # without segments the reference takes its fused causal path; row 1 is a single document, so it must agree
    np.testing.assert_allclose(ref.torch_logits(config, params, tokens[1:]), ours[1:], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_reference_has_flaxalign_param_count(name):
    config = CONFIGS[name]
    model = ref.TorchCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_torch_trainer_steps_train_the_reference():
    """The eager AdamW step `bench/clm_step.py` times: a finite loss, and the weights move."""
    config = CONFIGS["untied_gqa_bias"]
    trainer = ref.TorchTrainer(config, batch_size=2, seq_len=32)
    before = [p.detach().numpy().copy() for p in trainer.model.parameters()]
    assert trainer.seconds_per_step(2) > 0 and math.isfinite(float(trainer.loss.detach()))
    after = [p.detach().numpy() for p in trainer.model.parameters()]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(before, after, strict=True))

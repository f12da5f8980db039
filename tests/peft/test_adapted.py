"""LoRA in activation space (`peft.adapted`): the training path equals the merged path in loss and A/B gradients,
its backward forms no weight-sized gradient for a frozen W, and its dropout is PEFT's (per token, per input)."""

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from flaxalign import models
from flaxalign.losses.lm import token_cross_entropy
from flaxalign.peft import adapted, lora, quant
from flaxalign.policy import TrainableModel
from tests import helpers

TINY = helpers.tiny_model_config()
UNTIED = dataclasses.replace(TINY, tie_embeddings=False)


def _trained(policy: TrainableModel, frozen, seed=1, scale=0.05):
    """The policy's trained part with every leaf perturbed (B ≠ 0), as after some training."""
    start = policy.init_trainable(None, frozen, None)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(start))))
    return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), start)


def _loss(model, batch):
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    loss_sum, count = token_cross_entropy(hidden, model.unembedding(), batch["targets"], batch["loss_mask"],
                                          chunk_size=16)
    return loss_sum / count


def _both_paths(policy, frozen, trained, batch):
    """(loss, grads) of the activation-space path and of the merged path W' = W + s·A·B."""
    activation = jax.value_and_grad(lambda t: _loss(policy.model(t, frozen), batch))(trained)
    merged = jax.value_and_grad(lambda t: _loss(models.merge(policy.graphdef, policy.merged(t, frozen)), batch))(
        trained)
    return activation, merged


# Values of MERGED_INPUT_GRADIENT_MIN_ROWS_PER_OUTPUT: which input gradient LoRA's backward pass uses.
NEVER, ALWAYS = float("inf"), 0.0


@pytest.mark.parametrize("quantized", [None, "nf4"])
@pytest.mark.parametrize(("variant", "merged_input_gradient"), [
    ("lora", NEVER), ("lora", ALWAYS), ("rslora", ALWAYS), ("dora", NEVER)])  # DoRA has no merged input gradient
def test_activation_space_equals_merged_in_loss_and_gradients(variant, quantized, merged_input_gradient,
                                                              monkeypatch):
    """f32: the same token-mean loss and the same A, B (and DoRA m) gradients to ≤ 1e-5 relative, including an
    adapted LM head (merged form) and a quantized base, with either input gradient of LoRA's own backward pass."""
    monkeypatch.setattr(adapted, "MERGED_INPUT_GRADIENT_MIN_ROWS_PER_OUTPUT", merged_input_gradient)
    config = lora.LoraConfig(rank=4, alpha=8, variant=variant, targets=["q", "k", "v", "o", "gate", "up", "down",
                                                                          "lm_head"])
    quant_config = quant.QuantConfig(quantized) if quantized else None
    policy = TrainableModel(UNTIED, config, quant_config)
    params = helpers.random_params(UNTIED)
    frozen = quant.quantize_tree(params, models.abstract_model(UNTIED)[2], quant_config) if quantized else params
    trained = _trained(policy, frozen)
    (loss_a, grads_a), (loss_m, grads_m) = _both_paths(policy, frozen, trained, helpers.packed_batch(4, 32))
    assert abs(float(loss_a) - float(loss_m)) <= 1e-5 * abs(float(loss_m))
    for (path, got), want in zip(jax.tree.flatten_with_path(grads_a)[0], jax.tree.leaves(grads_m), strict=True):
        scale = float(np.max(np.abs(want)))
        assert scale > 0, jax.tree_util.keystr(path)  # every adapter leaf gets a gradient
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_a_module_to_save_that_lora_also_targets_trains_through_its_base(monkeypatch):
    """`modules_to_save=["o"]` with LoRA on every linear weight: o's base is trained (it is in the trained part), so
    it takes autodiff's path and gets the merged path's gradient; the other targets take LoRA's own backward."""
    monkeypatch.setattr(adapted, "MERGED_INPUT_GRADIENT_MIN_ROWS_PER_OUTPUT", ALWAYS)
    policy = TrainableModel(UNTIED, lora.LoraConfig(rank=4, alpha=8, modules_to_save=["o"]))
    frozen = helpers.random_params(UNTIED)
    trained = _trained(policy, frozen)
    (loss_a, grads_a), (loss_m, grads_m) = _both_paths(policy, frozen, trained, helpers.packed_batch(4, 32))
    assert abs(float(loss_a) - float(loss_m)) <= 1e-5 * abs(float(loss_m))
    saved = grads_a["saved"]["layers"]["attn"]["o"]
    assert float(jnp.max(jnp.abs(saved))) > 0
    for (path, got), want in zip(jax.tree.flatten_with_path(grads_a)[0], jax.tree.leaves(grads_m), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * float(np.max(np.abs(want))),
                                   rtol=0, err_msg=jax.tree_util.keystr(path))


def _dots(fn, *args) -> list[tuple[tuple[int, ...], int]]:
    """(output shape, contracted size) of every dot_general in the jaxpr of `fn(*args)`, inner jaxprs (scan, remat,
    custom VJP rules) included."""
    dots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
                contracted = math.prod(eqn.invars[0].aval.shape[i] for i in lhs_contracting)
                dots.append((tuple(eqn.outvars[0].aval.shape), contracted))
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return dots


@pytest.mark.parametrize("merged_input_gradient", [NEVER, ALWAYS], ids=["dy·Wᵀ+dy·Bᵀ·Aᵀ", "dy·(W+sAB)ᵀ"])
def test_the_backward_pass_forms_no_weight_sized_gradient(merged_input_gradient, monkeypatch):
    """LoRA on every linear weight of the layers: no dot_general of the training step (forward + backward) is a
    frozen weight's gradient — [d_in, d_out] contracted over the token rows — while the merged path forms one per
    weight. With the merged input gradient the only weight-shaped products are the adapted weights A·B, contracted
    over the rank."""
    monkeypatch.setattr(adapted, "MERGED_INPUT_GRADIENT_MIN_ROWS_PER_OUTPUT", merged_input_gradient)
    rank = 4
    policy = TrainableModel(TINY, lora.LoraConfig(rank=rank, alpha=8))
    frozen = helpers.random_params(TINY)
    trained = _trained(policy, frozen)
    batch = helpers.packed_batch(2, 16)
    rows = batch["inputs"].size
    d, f = TINY.d_model, TINY.d_ff
    weight_shapes = {(d, f), (f, d), (d, TINY.n_heads * TINY.head_dim), (TINY.n_heads * TINY.head_dim, d),
                     (d, TINY.n_kv_heads * TINY.head_dim)}
    assert rows not in {d, f, rank}  # token rows cannot be mistaken for weight rows or the rank
    activation = _dots(jax.grad(lambda t: _loss(policy.model(t, frozen), batch)), trained)
    merged = _dots(jax.grad(lambda t: _loss(models.merge(policy.graphdef, policy.merged(t, frozen)), batch)),
                   trained)
    weight_shaped = [(shape, k) for shape, k in activation if shape in weight_shapes]
    assert not [k for _, k in weight_shaped if k != rank], weight_shaped
    assert len(weight_shaped) == (7 if merged_input_gradient == ALWAYS else 0), weight_shaped
    gradients = {shape for shape, k in merged if shape in weight_shapes and k == rows}
    assert len(gradients) >= 3, merged  # the merged path's dW' = xᵀ·dy: the check can fail


def test_dropout_masks_each_token_and_input_and_is_off_without_an_rng():
    """PEFT's lora_dropout: x̃ = dropout(x) feeds only the adapter branch, a fresh mask per token and input feature,
    kept values scaled by 1/(1−p). The base product is untouched, evaluation (no rng) has no dropout, and the
    branch's mean over many tokens approaches the undropped branch."""
    rng = np.random.default_rng(0)
    d_in, d_out, r, p = 16, 8, 4, 0.5
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(d_in, r)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(r, d_out)), jnp.float32)
    x = jnp.asarray(np.tile(rng.normal(size=(1, d_in)), (4096, 1)), jnp.float32)  # one input, 4096 tokens
    config = lora.LoraConfig(rank=r, alpha=r, dropout=p, targets=["w"])
    weight = adapted.attach_lora({"w": w}, {"w": {"a": a, "b": b}}, config, jax.random.key(1))["w"]
    branch = np.asarray(weight.dense(x, jnp.float32) - x @ w)
    undropped = np.asarray((x[:1] @ a) @ b)
    assert len({tuple(np.round(row, 5)) for row in branch[:64]}) > 60  # masks differ from token to token
    np.testing.assert_allclose(branch.mean(axis=0), undropped[0], atol=0.15 * np.abs(undropped).max())
    evaluation = adapted.attach_lora({"w": w}, {"w": {"a": a, "b": b}}, config)["w"]
    np.testing.assert_allclose(np.asarray(evaluation.dense(x[:2], jnp.float32)), np.asarray(x[:2] @ w + undropped),
                               rtol=1e-5, atol=1e-5)
    zero_b = adapted.attach_lora({"w": w}, {"w": {"a": a, "b": 0 * b}}, config, jax.random.key(1))["w"]
    np.testing.assert_array_equal(np.asarray(zero_b.dense(x[:8], jnp.float32)), np.asarray(x[:8] @ w))


def test_dora_dropout_follows_peft():
    """DoRA with dropout active: x·W + (g − 1)·x̃·W + g·s·x̃·A·B with g = m / ‖W + s·A·B‖ (PEFT computes the base
    output once on x and the magnitude correction on x̃); recomputed here in NumPy with the mask recovered from
    x̃ = x ⊙ m / (1 − p) on inputs that are never 0."""
    rng = np.random.default_rng(1)
    d_in, d_out, r, p = 8, 6, 2, 0.3
    w, a, b = (rng.normal(size=s).astype(np.float32) for s in [(d_in, d_out), (d_in, r), (r, d_out)])
    m = np.abs(rng.normal(size=(d_out,))).astype(np.float32) + 0.5
    x = (np.abs(rng.normal(size=(5, d_in))) + 0.5).astype(np.float32)
    config = lora.LoraConfig(rank=r, alpha=2 * r, variant="dora", dropout=p, targets=["w"])
    weight = adapted.attach_lora({"w": jnp.asarray(w)}, {"w": {"a": a, "b": b, "magnitude": m}}, config,
                                 jax.random.key(2))["w"]
    dropped = np.asarray(weight._dropped(jnp.asarray(x)))
    mask = dropped != 0
    np.testing.assert_allclose(dropped[mask], (x / (1 - p))[mask], rtol=1e-6)
    s = 2.0
    g = m / np.linalg.norm(w + s * a @ b, axis=0)
    expected = x @ w + (g - 1) * (dropped @ w) + g * s * (dropped @ a @ b)
    np.testing.assert_allclose(np.asarray(weight.dense(jnp.asarray(x), jnp.float32)), expected, rtol=2e-5, atol=2e-5)

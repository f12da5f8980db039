"""`model.remat=minimal` (the default, `models.remat`): autodiff's loss and gradients, the named values kept and the
elementwise rest recomputed, and no weight's product recomputed — for Llama and Gemma layers, full and LoRA."""

import collections
import dataclasses

import jax
import numpy as np
import pytest

from flaxalign.models import remat
from flaxalign.peft import lora
from flaxalign.policy import TrainableModel
from tests import helpers
from tests.models.test_flops import traced_flops_per_token
from tests.peft.test_adapted import _loss, _trained

TINY = helpers.tiny_model_config(scan_layers=False)  # unrolled: each layer's residuals print with their names
GEMMA = dataclasses.replace(TINY, family="gemma", qk_norm=True, query_pre_attn_scalar=24, attn_softcap=20.0)
LORA = lora.LoraConfig(rank=4, alpha=8, targets="all-linear")
DORA = dataclasses.replace(LORA, variant="dora")


def _policy_and_params(config, lora_config):
    policy = TrainableModel(config, lora_config, None)
    if lora_config is None:
        return policy, {}, helpers.random_params(config)
    frozen = helpers.random_params(config)
    return policy, frozen, _trained(policy, frozen)


def _residuals(config, lora_config, capsys) -> list[tuple[str, str, str]]:
    """(shape, name or '', what made it) of each residual the backward pass of the tiny LM loss keeps."""
    policy, frozen, trained = _policy_and_params(config, lora_config)
    batch = helpers.packed_batch(4, 32)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda t: _loss(policy.model(t, frozen), batch), trained)
    out = []
    for line in capsys.readouterr().out.splitlines():
        words = line.split()
        if words:
            named = words[1] == "named"
            out.append((words[0], words[2].strip("'") if named else "", "" if named else " ".join(words[1:4])))
    return out


@pytest.mark.parametrize("config", [TINY, GEMMA], ids=["llama", "gemma"])
@pytest.mark.parametrize("lora_config", [None, LORA, DORA], ids=["full", "lora", "dora"])
def test_minimal_gives_autodiffs_loss_and_gradients(config, lora_config):
    batch = helpers.packed_batch(4, 32)
    results = []
    for policy_name in ("none", "minimal"):
        policy, frozen, trained = _policy_and_params(dataclasses.replace(config, remat=policy_name), lora_config)
        results.append(jax.value_and_grad(lambda t: _loss(policy.model(t, frozen), batch))(trained))
    (loss_none, grads_none), (loss_minimal, grads_minimal) = results
    np.testing.assert_allclose(float(loss_minimal), float(loss_none), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_minimal), jax.tree.leaves(grads_none), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                                   atol=1e-5 * max(float(np.max(np.abs(want))), 1e-30))


def test_minimal_keeps_the_named_activations_and_recomputes_the_rest(capsys):
    """LoRA on every linear weight: per layer the kept values are exactly gate, up, q, k, v, the attention output
    and its log-sum-exp, the residual stream between the sub-layers and x·A of the 7 adapted weights; the only
    other [B, T, D] residuals are the layer inputs (the embedding output and each layer's output). Autodiff (`none`)
    keeps more [N, d_ff] arrays (the down projection's input) and more [B, T, D] ones (the norm outputs)."""
    c = TINY
    rows, hidden, ffn = 4 * 32, f"f32[4,32,{c.d_model}]", f"f32[128,{c.d_ff}]"
    kept = _residuals(dataclasses.replace(c, remat="minimal"), LORA, capsys)
    names = collections.Counter(name for _, name, _ in kept if name)
    assert names == {**{name: c.n_layers for name in ("mlp_gate", "mlp_up", "attn_q", "attn_k", "attn_v",
                                                       "attn_out", "attn_lse", "layer_mid")},
                     "lora_xa": 7 * c.n_layers}, names
    assert [name for shape, name, _ in kept if shape == ffn] == ["mlp_gate", "mlp_up"] * c.n_layers
    assert sum(shape == hidden and not name for shape, name, _ in kept) == c.n_layers + 1
    assert all(shape == f"f32[{rows},{LORA.rank}]" for shape, name, _ in kept if name == "lora_xa")
    # k and v with their own (GQA) heads, not repeated to the query heads
    kv_shape = f"f32[4,32,{c.n_kv_heads},{c.head_dim}]"
    assert c.n_kv_heads < c.n_heads
    assert all(shape == kv_shape for shape, name, _ in kept if name in ("attn_k", "attn_v"))
    autodiff = _residuals(dataclasses.replace(c, remat="none"), LORA, capsys)
    assert sum(shape == ffn for shape, _, _ in autodiff) == 3 * c.n_layers
    assert sum(shape in (hidden, f"f32[{rows},{c.d_model}]") for shape, _, _ in autodiff) > 3 * c.n_layers + 1


def test_dora_keeps_its_column_norms_not_a_weight_sized_product(capsys):
    """DoRA's g = m / sg(‖W + s·A·B‖): `minimal` keeps the norms (`dora_norm`); without them the policy would keep
    the [d_in, d_out] product A·B of every adapted weight to rebuild them. The only products kept are the [N, r]
    x·A."""
    kept = _residuals(dataclasses.replace(TINY, remat="minimal"), DORA, capsys)
    assert {shape for shape, _, made_by in kept if made_by == "output of dot_general"} == {f"f32[128,{DORA.rank}]"}
    assert collections.Counter(name for _, name, _ in kept)["dora_norm"] == 7 * TINY.n_layers


def test_gemma_keeps_what_its_post_norms_and_qk_norms_read(capsys):
    names = collections.Counter(name for _, name, _ in _residuals(dataclasses.replace(GEMMA, remat="minimal"), LORA,
                                                                  capsys) if name)
    assert names["sublayer_out"] == 2 * GEMMA.n_layers and names["attn_qk_proj"] == 2 * GEMMA.n_layers, names


def test_gemma_under_minimal_recomputes_no_weight_product():
    """Gemma's post-norms read each sub-layer's output and its qk-norms the projected q and k: `minimal` keeps them,
    so the gradient's matmuls are the forward's × 3 plus only the dense attention's q·kᵀ."""
    c = dataclasses.replace(GEMMA, remat="minimal")
    forward, train = traced_flops_per_token(c, seq_len=32)
    assert train == 3 * forward + c.n_layers * c.n_heads * 2 * 32 * c.head_dim


def test_every_policy_the_config_accepts_exists():
    from flaxalign.models.config import REMAT_POLICIES
    assert set(REMAT_POLICIES) == {"none", *remat.POLICIES}


def test_the_kernel_primitives_kept_whole_are_the_ones_jax_binds():
    """`KERNEL_FORWARDS` names primitives by string: a renamed one would silently re-run its kernel in the backward."""
    from jax._src.cudnn import fused_attention_stablehlo
    from jax._src.pallas import pallas_call
    assert fused_attention_stablehlo._dot_product_attention_fwd_p_wrapper.name in remat.KERNEL_FORWARDS
    assert pallas_call.pallas_call_p.name in remat.KERNEL_FORWARDS

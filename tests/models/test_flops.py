"""`ModelConfig.flops_per_token`, which every MFU figure divides by, against two references made here:

* a hand count, matmul by matmul: 2·m·n FLOPs per token for each [m, n] weight in the forward pass, attention's
  score and value products over all T positions (the docstring's convention: PaLM's, causal masking not halved),
  then × 3 for forward + backward;
* the matrix products the model really runs: every `dot_general` in the jaxpr of the forward pass and of the
  gradient (scans multiplied by their length), so a matmul the formula forgot, or one it counts but the model does
  not run, shows up.

Variants: GQA and MHA, head_dim ≠ d_model / n_heads, tied and untied embeddings, bottleneck adapters."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core

from flaxalign.models.params import abstract_model, merge
from tests import helpers


def hand_count(c, seq_len: int) -> int:
    """Training FLOPs per token of a Llama decoder, counted by hand."""
    d, hd, h, kv = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads
    projections = {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d)}
    swiglu = {"gate": (d, c.d_ff), "up": (d, c.d_ff), "down": (c.d_ff, d)}
    per_layer = sum(2 * m * n for m, n in [*projections.values(), *swiglu.values()])
    if c.active_adapter:  # each adapter site: down [d, d/r] and up [d/r, d]
        per_layer += len(c.adapter_sites) * 2 * (2 * d * c.adapter_dim)
    # per query token and head: q·kᵀ against all T keys (2·T·hd), then p·v (2·T·hd)
    per_layer += h * (2 * seq_len * hd + 2 * seq_len * hd)
    lm_head = 2 * d * c.vocab_size  # tied or not, the logits are one [d, V] matmul; the embedding lookup is not one
    forward = c.n_layers * per_layer + lm_head
    return 3 * forward  # backward: the input and the weight gradients of every matmul, 2 × forward


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def dot_flops(jaxpr) -> int:
    """2 · batch · contracted · free(lhs) · free(rhs) summed over every dot_general, scan bodies × their length."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            batch, contract = math.prod(lhs[i] for i in lhs_batch), math.prod(lhs[i] for i in lhs_contract)
            total += 2 * math.prod(lhs) * (math.prod(rhs) // (batch * contract))
            continue
        assert name != "while", "a while loop's trip count is unknown: the count would be wrong"
        inner = [dot_flops(sub) for sub in _subjaxprs(eqn)]
        if name == "cond":
            total += max(inner, default=0)
        else:
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def traced_flops_per_token(c, batch: int = 2, seq_len: int = 32) -> tuple[float, float]:
    """(forward, forward + backward) dot FLOPs per token of the logits of `c`, from the traced programs — with the
    dense attention, whose products are the formula's full T × T (blockwise skips the causal half in loops)."""
    graphdef, abstract, _ = abstract_model(dataclasses.replace(c, attention="xla"))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def logits(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(seq_len), tokens.shape)
        return merge(graphdef, params).logits(tokens, positions, jnp.ones_like(tokens))

    def train(params, tokens):
        return jax.grad(lambda p: jnp.sum(logits(p, tokens) ** 2))(params)

    n = batch * seq_len
    return (dot_flops(jax.make_jaxpr(logits)(abstract, tokens).jaxpr) / n,
            dot_flops(jax.make_jaxpr(train)(abstract, tokens).jaxpr) / n)


VARIANTS = {
    "tiny (GQA 4:2, tied)": {},
    "untied embeddings": {"tie_embeddings": False},
    "MHA": {"n_kv_heads": 4},
    "head_dim 24 != 64/4": {"head_dim": 24},
    "houlsby adapters": {"adapter_placement": "houlsby", "adapter_names": ("t",), "active_adapter": "t",
                         "adapter_reduction": 8},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flops_per_token_is_the_hand_count_and_the_traced_matmuls(variant):
    c = helpers.tiny_model_config(**VARIANTS[variant], remat="none")
    forward, train = traced_flops_per_token(c, seq_len=32)
    assert c.flops_per_token(32) == hand_count(c, 32)
    assert train == 3 * forward  # the backward pass runs twice the forward's matmuls
    assert c.flops_per_token(32) == train  # exact: no matmul missing, none extra


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_minimal_remat_recomputes_only_the_attention_scores(variant):
    """`remat=minimal` recomputes no weight's product: the only extra matmul is the dense attention's q·kᵀ (2·T·hd
    per query token, head and layer), which its backward rebuilds from the kept q and k. MFU's count leaves it out."""
    c = helpers.tiny_model_config(**VARIANTS[variant], remat="minimal")
    forward, train = traced_flops_per_token(c, seq_len=32)
    scores = c.n_layers * c.n_heads * 2 * 32 * c.head_dim
    assert train == 3 * forward + scores
    assert c.flops_per_token(32) == train - scores


def test_tied_and_untied_embeddings_cost_the_same():
    tied, untied = helpers.tiny_model_config(tie_embeddings=True), helpers.tiny_model_config(tie_embeddings=False)
    assert tied.flops_per_token(128) == untied.flops_per_token(128)
    assert tied.num_params() < untied.num_params()  # while the parameter counts differ


def test_attention_is_counted_over_all_positions_linearly_in_seq_len():
    """Doubling T adds 12·L·T·H·Dh (the full T×T scores and values, not half for the causal mask)."""
    c = helpers.tiny_model_config(head_dim=24)
    added = c.flops_per_token(256) - c.flops_per_token(128)
    assert added == 12 * c.n_layers * 128 * c.n_heads * c.head_dim


def test_llama_3_2_1b_by_hand():
    """The ~1B accelerator benchmark model at T = 2048: 6 × 1,235,746,816 matmul weights (16 layers of q 2048², k
    and v 2048·512, o 2048², 3 × 2048·8192, and the 2048 × 128,256 head) + 12·16·2048·32·64 attention."""
    c = helpers.tiny_model_config(**{"vocab_size": 128256, "d_model": 2048, "n_layers": 16, "n_heads": 32,
                                     "n_kv_heads": 8, "d_ff": 8192, "max_seq_len": 4096, "tie_embeddings": True})
    per_layer = 2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048 + 3 * 2048 * 8192
    assert 16 * per_layer + 2048 * 128256 == 1_235_746_816
    assert c.flops_per_token(2048) == 6 * 1_235_746_816 + 12 * 16 * 2048 * 32 * 64 == 8_219_787_264
    assert c.flops_per_token(2048) == hand_count(c, 2048)

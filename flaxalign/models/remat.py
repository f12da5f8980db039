"""What a decoder layer keeps for its backward pass (`model.remat`), and the names that say so.

    none      autodiff keeps every intermediate the backward pass reads (norm outputs, the activation's inputs and
              output, each dense layer's input in its own layout, weights reshaped, ...).
    minimal   the default: keeps what the backward pass cannot rebuild without a projection — the layer input
              (always), the residual stream between the sub-layers, q, k and v as the attention takes them (k and v
              with their own K heads) and its output with the log-sum-exp, the MLP's gate and up projections,
              LoRA's x·A (rank r), DoRA's column norms and pre-scale output, a sub-layer output that a post-norm
              reads, q and k before a qk-norm, and any product without batch dimensions that the backward pass
              reads (an adapter's input) — and recomputes the elementwise rest (RMSNorm, RoPE, the gated activation
              and its product, relayouts, GQA's repeated heads) in the backward pass. No weight's product is
              recomputed; the dense `xla` attention recomputes its scores q·kᵀ from q and k, as flash attention
              does. (Of the splash and cuDNN kernels, whose residuals carry no names, the forward kernel's outputs
              are kept: `KERNEL_FORWARDS`.)
    full      keeps the layer input only; the backward pass re-runs the whole layer (≈ +⅓ of the step's FLOPs).
    dots_saveable, dots_with_no_batch_dims_saveable   JAX's policies by kind of product.

`keep(name, x)` marks a value for `minimal`; outside differentiation, and under `none` or `full`, it is the identity.
"""

import jax
from jax.ad_checkpoint import checkpoint_name

# Values `minimal` keeps (each `keep` site names one).
KEPT = ("layer_mid", "attn_q", "attn_k", "attn_v", "attn_qk_proj", "attn_out", "attn_lse", "mlp_gate", "mlp_up",
        "sublayer_out", "lora_xa", "dora_y", "dora_norm")
# Primitives of attention kernels whose residuals carry no names (the Pallas splash kernel; the primitive JAX's cuDNN
# attention binds in its forward rule, whose name `tests/models/test_remat.py` checks against JAX's module): their
# outputs, the attention output and its softmax statistics, are kept whole.
KERNEL_FORWARDS = ("pallas_call", "dot_product_attention_fwd_wrapper")


def keep(name: str, *xs):
    """`xs` marked as `name` for the `minimal` policy (one value → that value, several → a tuple)."""
    assert name in KEPT, name
    out = tuple(checkpoint_name(x, name) for x in xs)
    return out[0] if len(out) == 1 else out


def _kernel_forward(prim, *_, **__) -> bool:
    return prim.name in KERNEL_FORWARDS


POLICIES = {
    "full": None,
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.save_only_these_names(*KEPT),
                                                        jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
        _kernel_forward),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def wrap(layer_step, remat: str):
    """`layer_step` with the backward pass `remat` names (`none`: as autodiff has it)."""
    if remat == "none":
        return layer_step
    return jax.checkpoint(layer_step, policy=POLICIES[remat], prevent_cse=False)

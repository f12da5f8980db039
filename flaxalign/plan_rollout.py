"""The rollout half of `flaxalign plan` for PPO and GRPO: will the sampling fit next to the training state, what
does every role take per chip, and how long do rollout and update take?

An RL step runs two kinds of programs one after the other: the rollout (the sampler's prefill and decode loop, then
the learner's scoring of the samples) and the update (the train step `plan` compiles). The optimizer state stays
in HBM through the rollout, so the rollout phase needs the sampler program's memory (its arguments are the policy's
weights, its temporaries the KV cache and activations) plus the optimizer state and whatever else of the train state
the sampler does not read (the reward and value models): that is what must fit.

Decode time is predicted as memory-bound (each new token reads, on every chip, the KV cache it holds and the weights
it computes with — its tensor-parallel share, all of it when FSDP gathers the weights — at the chip's HBM
bandwidth; a lower bound where FSDP's gathers are slower than HBM), or compute-bound when the batch is large
enough; prefill and scoring at the configured MFU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import sampler, sharding
from flaxalign.stages import onpolicy
from flaxalign.stages.description import RolloutSpec

# HBM bandwidth per chip, bytes/s (the "System architecture" tables of cloud.google.com/tpu/docs/<version>):
# v4 1,200 GB/s, v5e 819 GB/s, v5p 2,765 GB/s, v6e 1,640 GB/s.
HBM_BANDWIDTH = {"v4": 1.2e12, "v5e": 8.19e11, "v5p": 2.765e12, "v6e": 1.64e12}


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (replicated arrays count fully)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def _bytes(tree) -> int:
    """Bytes of a whole tree (all chips together)."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def role_bytes(spec: RolloutSpec, state) -> dict[str, int]:
    """Per-chip bytes of each role's part of the (abstract, sharded) train state."""
    params, frozen = state.params, state.frozen
    value = "value" in params
    out = {"policy (trained)": per_chip_bytes(spec.policy_params(params))}
    if value:
        out["value model (trained)"] = per_chip_bytes(params["value"])
    if jax.tree.leaves(frozen.get("policy", {})):
        label = (f"frozen base (policy, reference{', value' if value else ''})" if spec.policy.model.frozen_base
                 else "reference (frozen copy)")
        out[label] = per_chip_bytes(frozen["policy"])
    if "reward" in frozen:
        out["reward model"] = per_chip_bytes(frozen["reward"])
    if "teacher" in frozen:
        out["teacher (frozen)"] = per_chip_bytes(frozen["teacher"])
    out["optimizer state"] = per_chip_bytes(state.opt_state)
    return out


def kv_cache_bytes(model_config, spec: RolloutSpec, mesh) -> int:
    """Per-chip bytes of the sampler's KV cache `[L, B, K, S, H]` (k and v) in `rollout.cache_dtype`, its rows split
    over data × fsdp as the rollout's are."""
    c = model_config
    total = 2 * c.n_layers * spec.rows * c.n_kv_heads * (spec.prompt_len + spec.sampling.max_new_tokens) * c.head_dim
    axes = sharding.batch_sharding(mesh, spec.rows, 1).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    cache_dtype = spec.sampling.cache_jnp_dtype
    itemsize = jnp.dtype(c.dtype if cache_dtype is None else cache_dtype).itemsize
    return total * itemsize // math.prod(mesh.shape[a] for a in axes)


def compile_sampler(spec: RolloutSpec, state, mesh):
    """The sampler's program (prefill + decode loop) compiled for `mesh` from abstract arguments."""
    # the stacked layers, as an accelerator decodes (the default would pick the layout of this host's CPU)
    engine = spec.policy.rollout_sampler(eos_id=0, pad_id=0, unstacked_layers=False)
    weights = spec.policy.weights(spec.policy_params(state.params), state.frozen)
    rows = sharding.batch_sharding(mesh, spec.rows, 2)
    prompts = {k: jax.ShapeDtypeStruct((spec.rows, spec.prompt_len), np.int32, sharding=rows)
               for k in onpolicy.PROMPT_KEYS}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    with jax.set_mesh(mesh):
        lowered = jax.jit(functools.partial(engine.traced, sampling=spec.sampling, group_size=spec.group_size)).lower(
            weights, prompts, rng)
        return lowered.compile()


def rollout_report(spec: RolloutSpec, state, model_config, mesh, *, memory_of, chip, mfu: float) -> dict:
    """`rollout` part of the plan: per-role bytes, the KV cache, the sampler program's memory (`memory_of(compiled)`,
    plan's `_memory`), the rollout phase's peak (sampler program + what the sampler does not read of the state),
    the predicted time of one rollout, `rollout_flops` (its sampling and scoring forward passes, the part of the
    step's FLOPs that is not the update) and `rounds`, the most rollouts a step may run."""
    roles = role_bytes(spec, state)
    compiled = compile_sampler(spec, state, mesh)
    sampler_memory = memory_of(compiled)
    weights = spec.policy.weights(spec.policy_params(state.params), state.frozen)
    resident = per_chip_bytes(state) - per_chip_bytes(weights)  # optimizer, value and reward models, the rest
    cache = kv_cache_bytes(model_config, spec, mesh)
    new, prompt_len, rows = spec.sampling.max_new_tokens, spec.prompt_len, spec.rows
    chips = mesh.devices.size
    seq = prompt_len + new
    flops_per_token = model_config.flops_per_token(seq) / 3  # a forward pass: a third of forward + backward
    prefilled = rows // spec.group_size * prompt_len  # one prefill per group of rows that share a prompt
    prefill_s = prefilled * flops_per_token / (chips * chip.peak_flops * mfu)
    # every decode step reads all the weights a chip computes with — its tensor-parallel share, gathered whole when
    # they are sharded over fsdp (rows are split over data × fsdp, weights are not) — and the cache slots up to the
    # end of its decoding segment
    read_per_token = (_bytes(weights) // mesh.shape.get("tensor", 1)
                      + cache * sampler.decode_cache_share(prompt_len, new))
    decode_step_s = max(read_per_token / HBM_BANDWIDTH[chip.kind],
                        rows * flops_per_token / (chips * chip.peak_flops * mfu))
    scoring_flops = spec.scoring_forwards * rows * seq * flops_per_token
    scoring_s = scoring_flops / (chips * chip.peak_flops * mfu)
    # rollout_flops is the stage's own count (a model-FLOPs count: every row's prompt, shared prefill or not), so
    # that the update's share of the step's FLOPs stays what the stage counts
    return {"rollout_flops": scoring_flops + rows * seq * flops_per_token, "roles": roles,
            "kv_cache": cache, "sampler_memory": sampler_memory, "resident": resident,
            "phase_total": sampler_memory["total"] + resident, "prefill_s": prefill_s,
            "decode_s": new * decode_step_s, "scoring_s": scoring_s,
            "rollout_s": prefill_s + new * decode_step_s + scoring_s, "hbm_bandwidth": HBM_BANDWIDTH[chip.kind],
            "rounds": spec.rounds}

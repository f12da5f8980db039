"""Preference optimisation without RL: the DPO family, ORPO / SimPO / CPO and KTO, one stage, `loss_type` picks.

DPO (Rafailov et al. 2023):  L = −log σ(β[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]),
and its variants in the `losses.preference.DPO_LOSSES` registry. Log-probs are sums over completion tokens; the
chosen and rejected rows of a batch go through the model in one forward pass ([chosen; rejected] layout).

The reference model π_ref (`reference`):
  "copy"         a frozen copy of the starting weights (full fine-tuning; or `reference_from` another checkpoint),
  "base"         with LoRA, adapters or a quantized base: the same frozen base with the adapters off — no extra
                 memory,
  "precomputed"  log π_ref of every pair computed once before training and stored with the data
                 (`ref_logps.npz` in the workdir), so no reference weights are held at all.
ORPO, SimPO and CPO need no reference. KTO (`loss_type="kto"`) trains on unpaired desirable/undesirable examples;
its KL anchor z₀ is estimated from mismatched prompt/completion pairs over the whole global batch before the
micro-batches run, so it does not depend on `grad_accum`.
"""

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import errors, sharding, weights
from flaxalign.data.batching import PREFERENCE_KEYS, left_pad_prompts, pair_prompts, unstack_pairs
from flaxalign.data.preference_data import build_kto_datasets, build_preference_datasets
from flaxalign.losses.lm import chunked_token_kl, sequence_logps
from flaxalign.losses.preference import (
    DPO_HYPER_DEFAULTS,
    DPO_LOSSES,
    cpo_loss,
    dpo_hyper,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from flaxalign.policy import TrainableModel
from flaxalign.sampler import KVCacheSampler, Sampling
from flaxalign.stages import lm
from flaxalign.stages.checks import check_rows, check_shapes
from flaxalign.stages.description import Description, abstract_rows
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.state import TrainState
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task

REFERENCE_FREE = ("orpo", "simpo", "cpo")
OTHER_LOSS_TYPES = REFERENCE_FREE + ("kto",)
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "completion_mask")
REF_LOGPS_FILE = "ref_logps.npz"


@dataclasses.dataclass(frozen=True)
class Method:
    """The loss and its hyper-parameters (`configs/dpo.py`'s `loss` block, validated). `hyper` holds the DPO family's
    own hyper-parameters as (name, value) pairs (`preference.DPO_HYPER_DEFAULTS` for the missing ones): the stage passes
    them to `dpo_loss` without reading them, so a new DPO-family loss needs no change here."""
    loss_type: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    rpo_alpha: float = 0.0  # RPO: + α · (the chosen response's NLL per token), pair losses only
    hyper: tuple = ()

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES and self.loss_type not in OTHER_LOSS_TYPES:
            valid = ", ".join(DPO_LOSSES.names + OTHER_LOSS_TYPES)
            raise errors.ConfigError(f"unknown loss_type {self.loss_type!r}; valid: {valid}.")
        if not self.beta > 0:
            raise errors.ConfigError(f"loss.beta must be > 0, got {self.beta}.")
        if not 0 <= self.label_smoothing < 1:
            raise errors.ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not self.rpo_alpha >= 0 or (self.rpo_alpha and self.loss_type == "kto"):
            raise errors.ConfigError(f"loss.rpo_alpha must be >= 0 and is for paired losses (not kto), got "
                                     f"{self.rpo_alpha} with loss_type={self.loss_type}.")
        if self.loss_type in DPO_LOSSES:
            dpo_hyper(self.loss_type, self.beta, **self.dpo_hyper)

    @property
    def dpo_hyper(self) -> dict:
        return {**DPO_HYPER_DEFAULTS, **dict(self.hyper)}

    def settings(self) -> dict:
        """Every field, the DPO family's own ones flat (JSON scalars: a checkpoint's identity must read back equal).
        `rpo_alpha` only when it is set, so that checkpoints saved before the field existed still resume."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k != "hyper" and not (k == "rpo_alpha" and v == 0)}
        return {**fields, **self.dpo_hyper}

    @property
    def label_smoothing(self) -> float:  # also SimPO's and CPO's
        return self.dpo_hyper["label_smoothing"]

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


@dataclasses.dataclass(frozen=True)
class Models:
    """Static pieces a step needs to run the policy and the reference."""
    policy: TrainableModel
    reference: str  # "copy" | "base" | "precomputed" | "none"
    chunk_size: int


def _row_logps(model, rows, chunk_size: int):
    """(Σ completion log-probs, completion length) of each row under `model`, `[N]` each."""
    hidden = model(rows["inputs"], rows["positions"], rows["segment_ids"])
    return sequence_logps(hidden, model.output_head(), rows["targets"], rows["completion_mask"],
                          chunk_size=chunk_size)


def policy_logps(trainable, frozen, rows, rng, m: Models):
    """(Σ completion log-probs, completion length) of each row under the policy, `[N]` each."""
    return _row_logps(m.policy.model(trainable, frozen, rng), rows, m.chunk_size)


def reference_logps(trainable, frozen, rows, m: Models):
    """Σ completion log-probs of each row under the reference (no gradient): the frozen copy, or the frozen base
    with the LoRA / adapters switched off."""
    logps, _ = _row_logps(m.policy.reference_model(trainable, frozen), rows, m.chunk_size)
    return jax.lax.stop_gradient(logps)


def _sums(losses, metrics):
    n = losses.shape[0]
    sums = {k: jnp.sum(v) if jnp.ndim(v) else v * n for k, v in metrics.items()}
    return jnp.sum(losses), (jnp.asarray(n, jnp.float32), sums)


def pair_loss(trainable, frozen, batch, rng, *, method: Method, m: Models):
    """(Σ per-pair losses, (pair count, Σ metrics)) of a `[B, 2, T]` batch of (chosen, rejected) pairs."""
    rows = unstack_pairs({k: batch[k] for k in ROW_KEYS})
    logps, lengths = policy_logps(trainable, frozen, rows, rng, m)
    (chosen, rejected), (chosen_len, rejected_len) = jnp.split(logps, 2), jnp.split(lengths, 2)
    chosen_avg, rejected_avg = chosen / jnp.maximum(chosen_len, 1), rejected / jnp.maximum(rejected_len, 1)
    t = method.loss_type
    if t == "orpo":
        losses, metrics = orpo_loss(chosen_avg, rejected_avg, beta=method.beta)
    elif t == "simpo":
        losses, metrics = simpo_loss(chosen_avg, rejected_avg, beta=method.beta, gamma=method.simpo_gamma,
                                     label_smoothing=method.label_smoothing)
    elif t == "cpo":
        losses, metrics = cpo_loss(chosen, rejected, beta=method.beta, label_smoothing=method.label_smoothing,
                                   cpo_alpha=method.cpo_alpha, chosen_nll=-chosen_avg)
    else:
        if m.reference == "precomputed":
            ref_chosen, ref_rejected = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
        else:
            ref_chosen, ref_rejected = jnp.split(reference_logps(trainable, frozen, rows, m), 2)
        losses, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=method.beta, loss_type=t,
                                   chosen_lengths=chosen_len, rejected_lengths=rejected_len, **method.dpo_hyper)
    if method.rpo_alpha:
        # RPO (Pang et al. 2024; TRL's rpo_alpha): the chosen response's NLL keeps its likelihood from falling while
        # the margin grows. Per pair, averaged over the pair's tokens; TRL averages over the batch's chosen tokens
        # (equal when the chosen responses have equal lengths), which would depend on how a batch is split.
        losses = losses + method.rpo_alpha * -chosen_avg
        metrics = {**metrics, "nll_loss": -chosen_avg}
    # The policy's own ranking of the pair — comparable across models, and defined for the SFT model, whose implicit
    # reward against itself is 0: by total log-likelihood, and per token (free of the bias towards short answers).
    metrics = {**metrics, "pref_accuracy": (chosen > rejected).astype(jnp.float32),
               "pref_accuracy_per_token": (chosen_avg > rejected_avg).astype(jnp.float32),
               "logps/chosen": chosen, "logps/rejected": rejected}
    return _sums(losses, metrics)


def _kto_rows(batch, which: int):
    return {k: batch[k][:, which] for k in ROW_KEYS}


def kto_anchor(trainable, frozen, batch, m: Models):
    """z₀ = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) on mismatched pairs (x, y'), no gradient."""
    rows = _kto_rows(batch, 1)
    logps, _ = policy_logps(jax.lax.stop_gradient(trainable), frozen, rows, None, m)
    if m.reference == "precomputed":
        ref = batch["ref_logps"][:, 1]
    else:
        ref = reference_logps(trainable, frozen, rows, m)
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(logps - ref), 0.0))


def kto_example_loss(trainable, frozen, batch, rng, *, method: Method, m: Models):
    """(Σ per-example KTO losses, (example count, Σ metrics)); the anchor z₀ comes in `batch["kl"]`."""
    rows = _kto_rows(batch, 0)
    logps, _ = policy_logps(trainable, frozen, rows, rng, m)
    ref = batch["ref_logps"][:, 0] if m.reference == "precomputed" else reference_logps(trainable, frozen, rows, m)
    desirable = batch["label"] > 0.5
    losses, metrics = kto_loss(logps, ref, desirable, beta=method.beta, kl=batch["kl"][0],
                               desirable_weight=method.desirable_weight,
                               undesirable_weight=method.undesirable_weight)
    # classified right: a desirable example's reward above the anchor, an undesirable one's below it
    above = metrics["rewards"] > method.beta * batch["kl"][0]
    metrics = {"rewards": metrics["rewards"], "desirable": metrics["desirable"],
               "accuracy": (above == desirable).astype(jnp.float32)}
    return _sums(losses, metrics)


def dpo_step(state: TrainState, batch: dict, *, method: Method, m: Models, optimizer, schedule, grad_accum: int):
    """One optimizer update from a global batch of pairs (or, for KTO, of unpaired examples)."""
    if method.loss_type == "kto":
        z0 = kto_anchor(state.params, state.frozen, batch, m)
        batch = {**batch, "kl": jnp.full(batch["label"].shape, z0)}
        loss_fn = functools.partial(kto_example_loss, method=method, m=m)
        state, metrics = gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule,
                                       grad_accum=grad_accum)
        return state, {**metrics, "kl": z0}
    loss_fn = functools.partial(pair_loss, method=method, m=m)
    return gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)


def dpo_eval_step(state: TrainState, batch: dict, *, method: Method, m: Models) -> dict:
    if method.loss_type == "kto":
        z0 = kto_anchor(state.params, state.frozen, batch, m)
        batch = {**batch, "kl": jnp.full(batch["label"].shape, z0)}
        loss_sum, (count, sums) = kto_example_loss(state.params, state.frozen, batch, None, method=method, m=m)
        return {"loss": loss_sum, "count": count, "kl": z0 * count, **sums}
    loss_sum, (count, sums) = pair_loss(state.params, state.frozen, batch, None, method=method, m=m)
    return {"loss": loss_sum, "count": count, **sums}


def sampled_kl(state: TrainState, out: dict, *, m: Models) -> dict:
    """KL(π‖π_ref) on prompts, from responses y ~ π (`out`: a rollout of the policy at temperature 1, the `sampler`
    contract): Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) over each response's tokens (the full-vocabulary KL at every
    step, so ≥ 0 and exactly 0 while π = π_ref; its mean over samples estimates the sequence KL without the sign
    noise of Σ_t log π(y_t) − log π_ref(y_t)). Sums over the prompts of `kl` and `response_length`, and `count`."""
    policy = m.policy.model(state.params, state.frozen)
    tokens, mask = out["tokens"][:, :-1], out["mask"][:, :-1]  # inputs whose next token is a response token
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden = policy(tokens, positions, mask)
    reference = m.policy.reference_model(state.params, state.frozen)
    ref_hidden = reference(tokens, positions, mask)
    kl = chunked_token_kl(hidden, policy.output_head(), ref_hidden, reference.output_head(),
                          chunk_size=m.chunk_size)
    response = out["response_mask"].astype(jnp.float32)
    prompt_len = out["tokens"].shape[1] - response.shape[1]
    kl = kl[:, prompt_len - 1:] * response
    return {"kl": jnp.sum(kl), "response_length": jnp.sum(response),
            "count": jnp.asarray(tokens.shape[0], jnp.float32)}


def resolve_reference(config, method: Method, policy: TrainableModel) -> str:
    """The reference mode a config asks for: "none" for reference-free losses, else `config.reference` checked
    against the policy ("auto": the frozen base when there is one, else a copy)."""
    if not method.needs_reference:
        return "none"
    return policy.reference_mode(config.reference, reference_from=bool(config.reference_from))


def precompute_reference_logps(data: dict, *, weights, forward, mesh, batch_size: int, chunk_size: int) -> np.ndarray:
    """log π_ref of both rows of every `[N, 2, T]` example, float32 `[N, 2]`, in batches of `batch_size`;
    `forward(weights)` builds the reference module (`TrainableModel.reference_forward`)."""

    @jax.jit
    def logps_of(weights, batch):
        logps, _ = _row_logps(forward(weights), unstack_pairs(batch), chunk_size)
        return jnp.stack(jnp.split(logps, 2), axis=1)

    n = len(data["inputs"])
    out = []
    with jax.set_mesh(mesh):
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size) % n  # the last batch wraps around: one compiled shape
            batch = {k: data[k][idx] for k in ROW_KEYS}
            out.append(np.asarray(jax.device_get(logps_of(weights, batch)))[: n - start])
    return np.concatenate(out).astype(np.float32)


def attach_reference_logps(data, *, workdir, reference_path, policy: TrainableModel, mesh, config, init_base,
                           init_reference=None) -> dict:
    """Adds `ref_logps` to the train and eval arrays, reading `workdir/ref_logps.npz` when it was computed for the
    same reference and data, else computing and writing it — on the policy's frozen base with adapters off (for
    QLoRA the quantized base, as the "base" reference would run it), or on `init_reference` / the starting weights
    for full fine-tuning (`TrainableModel.reference_weights`)."""
    key = hashlib.sha256(json.dumps({"ref": reference_path, "model": policy.identity(), "stats": data.stats,
                                     "seq_len": config.data.seq_len},
                                    sort_keys=True, default=str).encode()).hexdigest()
    path = os.path.join(workdir, REF_LOGPS_FILE)
    if os.path.exists(path):
        stored = np.load(path)
        if str(stored["key"]) == key:
            return {"train": stored["train"], "eval": stored["eval"], "cached": True}
    abstract, logical, init = policy.reference_weights(init_base, init_reference)
    kwargs = {"weights": init(sharding.tree_shardings(logical, abstract, mesh)), "forward": policy.reference_forward,
              "mesh": mesh, "batch_size": config.data.batch_size, "chunk_size": config.loss_chunk}
    result = {"train": precompute_reference_logps(data.train, **kwargs),
              "eval": precompute_reference_logps(data.eval, **kwargs)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, key=key, **result)
        os.replace(tmp, path)
    return {**result, "cached": False}


def make_method(config) -> Method:
    block = config.loss
    return Method(loss_type=block.loss_type, beta=float(block.beta), simpo_gamma=float(block.simpo_gamma),
                  cpo_alpha=float(block.cpo_alpha), desirable_weight=float(block.desirable_weight),
                  undesirable_weight=float(block.undesirable_weight), rpo_alpha=float(block.rpo_alpha),
                  hyper=tuple((name, float(block[name])) for name in DPO_HYPER_DEFAULTS))


def make_task(policy: TrainableModel, optim_cfg, method: Method, *, reference: str, grad_accum: int = 1,
              chunk_size: int = 256, init_base=None, init_reference=None, train_data=None, eval_batches=None,
              tokens_per_step: int = 0, flops_per_step: float = 0.0,
              metadata: dict | None = None) -> Task:
    """The DPO-family task. `init_base(shardings)` gives the starting policy weights (random if None);
    `init_reference(shardings)`, for reference="copy", a reference other than the starting weights."""
    if reference in ("copy", "base"):
        layout = policy.layout_with_reference(init_base, init_reference)
    else:
        layout = policy.layout(init_base)
    m = Models(policy, reference, chunk_size)
    optimizer = make_optimizer(optim_cfg)
    identity = {**policy.identity(), "loss": method.settings(), "reference": reference}
    return Task(
        name="dpo" if method.loss_type != "kto" else "kto", optimizer=optimizer,
        train_step=functools.partial(dpo_step, method=method, m=m, optimizer=optimizer,
                                     schedule=learning_rate_schedule(optim_cfg), grad_accum=grad_accum),
        eval_step=functools.partial(dpo_eval_step, method=method, m=m),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step,
        metadata={"stage": "dpo", **policy.metadata(), "resume_identity": identity,
                  "loss": method.settings(), "reference": reference, **(metadata or {})},
        **layout)


def describe(config, mesh) -> Description:
    """The DPO-family task of `config` before data: batches of `data.batch_size` pairs (KTO: examples with their KL
    rows), with the reference's log-probs when they are precomputed."""
    method = make_method(config)
    model_config, meta, init_path = weights.resolve_model(config)
    check_shapes(config, model_config, mesh)
    policy = weights.trainable_model(config, model_config)
    reference = resolve_reference(config, method, policy)
    reference_path = weights.parse_source(config.reference_from, "reference_from") if config.reference_from else ""
    if reference_path:
        weights.same_vocabulary(weights.policy_tokenizer(config, meta), reference_path, model_config, "reference")
    init_base = weights.initializer(model_config, init_path)
    init_reference = weights.initializer(model_config, reference_path) if reference_path else None
    b, t = config.data.batch_size, config.data.seq_len
    tokens = 2 * b * t  # two rows per example: (chosen, rejected) or (y, KL y')
    task = make_task(policy, config.optim, method, reference=reference, grad_accum=config.grad_accum,
                     chunk_size=config.loss_chunk, init_base=init_base, init_reference=init_reference,
                     tokens_per_step=tokens,
                     flops_per_step=training_passes(method, reference) * tokens * model_config.flops_per_token(t))

    def abstract_batch(_):
        batch = abstract_rows(PREFERENCE_KEYS, (b, 2, t), float_keys=("completion_mask",))
        if method.loss_type == "kto":
            batch["label"] = jax.ShapeDtypeStruct((b,), jnp.float32)
        if reference == "precomputed":
            batch["ref_logps"] = jax.ShapeDtypeStruct((b, 2), jnp.float32)
        return batch

    return Description(task, model_config, meta, init_path, abstract_batch,
                       parts={"method": method, "policy": policy, "reference": reference,
                              "reference_path": reference_path, "init_base": init_base,
                              "init_reference": init_reference})


def build_task(config, workdir: str, mesh) -> Task:
    """Policy and tokenizer from `init_from` (an SFT run), pairs (or KTO examples) from `data.train`."""
    d = describe(config, mesh)
    method, policy, reference = d.parts["method"], d.parts["policy"], d.parts["reference"]
    model_config = d.model_config
    tokenizer = lm.stage_tokenizer(config, d.meta, model_config, "DPO")
    lm.resolve_chat_template(config, d.meta, tokenizer)
    data = (build_kto_datasets if method.loss_type == "kto" else build_preference_datasets)(config.data, tokenizer)
    if reference == "precomputed":
        ref = attach_reference_logps(data, workdir=workdir, reference_path=d.parts["reference_path"] or d.init_path,
                                     policy=policy, mesh=mesh, config=config, init_base=d.parts["init_base"],
                                     init_reference=d.parts["init_reference"])
        data.train["ref_logps"], data.eval["ref_logps"] = ref["train"], ref["eval"]
        print(f"reference log-probs: {'read from' if ref['cached'] else 'computed into'} "
              f"{os.path.join(workdir, REF_LOGPS_FILE)}")
    train_data, eval_batches = lm.data_iterators(data.train, data.eval, config)

    eval_extra = None
    kl_cfg = config.eval_kl
    if kl_cfg.num_prompts and reference in ("copy", "base"):
        prompts = left_pad_prompts(pair_prompts(data.eval)[: kl_cfg.num_prompts], pad_id=tokenizer.pad_id)
        check_rows(mesh, len(prompts["input_ids"]), "eval_kl.num_prompts (held-out prompts, at most the data.eval set)")
        if prompts["input_ids"].shape[1] + kl_cfg.max_new_tokens > model_config.max_seq_len:
            raise errors.ConfigError(
                f"eval_kl: prompts of {prompts['input_ids'].shape[1]} tokens + max_new_tokens="
                f"{kl_cfg.max_new_tokens} exceed model.max_seq_len={model_config.max_seq_len}.")
        eval_extra = SampledKlEval(Models(policy, reference, config.loss_chunk), prompts=prompts, mesh=mesh,
                                   seed=config.seed, max_new_tokens=kl_cfg.max_new_tokens, eos_id=tokenizer.eos_id,
                                   pad_id=tokenizer.pad_id)
    return d.with_data(train_data=train_data, eval_batches=eval_batches, eval_extra=eval_extra,
                       metadata={"tokenizer": tokenizer.model_path, "init_from": config.init_from,
                                 "reference_from": config.reference_from, "data": data.stats,
                                 **lm.chat_metadata(config, d.meta, data.stats)})


def training_passes(method: Method, reference: str) -> float:
    """FLOPs of a step in units of "training (forward + backward = 3 forward passes) on both rows": pairs train
    both rows and run the reference forward on both (8/6); KTO trains one row, runs the reference on it and the
    policy and reference forward on the KL row (6/6); precomputed references skip their forward passes."""
    has_ref = reference in ("copy", "base")
    if method.loss_type == "kto":
        return (3 + 1 + (2 if has_ref else 0)) / 6
    return (6 + (2 if has_ref else 0)) / 6


class SampledKlEval:
    """`eval_kl` and `eval_response_length` (means over held-out prompts) for the loop's evaluation: responses at
    temperature 1 from the policy's sampler, `sampled_kl` jitted once for the task's models `m`."""

    def __init__(self, m: Models, *, prompts, mesh, seed, max_new_tokens, eos_id, pad_id):
        self.prompts, self.mesh, self.rng = prompts, mesh, jax.random.PRNGKey(seed)
        self.engine = KVCacheSampler(lambda w: m.policy.model(*w), eos_id=eos_id, pad_id=pad_id)
        self.sampling = Sampling(max_new_tokens, temperature=1.0)
        self.fn = jax.jit(functools.partial(sampled_kl, m=m))

    def __call__(self, state) -> dict:
        with jax.set_mesh(self.mesh):
            rollout = self.engine.sample((state.params, state.frozen), self.prompts, self.rng, self.sampling)
            sums = jax.device_get(self.fn(state, rollout))
        count = float(sums["count"])
        return {"kl": float(sums["kl"]) / count, "response_length": float(sums["response_length"]) / count}

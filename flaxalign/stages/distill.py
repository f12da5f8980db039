"""Knowledge distillation into a student: GKD (Agarwal et al. 2024; TRL `GKDTrainer`), on-policy, on dataset
completions or mixed (`lmbda`), and sequence-level KD (Kim & Rush 2016; `seq_kd`).

One train step on a batch of P prompts:
  1. responses (`Task.prepare`): with probability `distill.lmbda` (drawn per step from (seed, step), so a resumed
     run draws the same) one response per prompt sampled from the student itself (on-policy: the student learns on
     the states it visits); otherwise the teacher's samples with `distill.seq_kd`, else the dataset's completions
     (`sft` records: each record's completion or last assistant turn, as SFT trains on it). Samples are cut after
     EOS. TRL's order, and its default lmbda = 0.5; ours is 1 (on-policy), which needs no completions.
  2. `distill_step` (pure): one update of the generalized Jensen–Shannon divergence JSD_β between the student's and
     the teacher's next-token distributions at temperature τ over the whole vocabulary, at every response token
     (`losses.distill`, chunked: no `[B, T, V]` float32 logits): β = 0 forward KL(teacher ‖ student), β = 1 reverse
     KL, between them the mixture divergence.
The teacher (`teacher_from=checkpoint:|hf:|gguf:`) is frozen in `state.frozen["teacher"]`; its architecture may differ
from the student's (a smaller student), its vocabulary and tokenizer must be the student's (checked). Evaluation
samples the student on held-out prompts (fixed rng) and reports the divergence and the forward KL there.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxalign import errors, models, sampler, weights
from flaxalign.losses.distill import chunked_generalized_jsd
from flaxalign.policy import TrainableModel
from flaxalign.stages import group_rollout, lm, onpolicy
from flaxalign.stages.checks import check_rows
from flaxalign.stages.description import Description, RolloutSpec
from flaxalign.train.state import TrainState
from flaxalign.train.task import Task

ROLLOUT_KEYS = ("tokens", "mask", "response", "response_mask", "ended")


@dataclasses.dataclass(frozen=True)
class DistillHyper:
    """The `distill` block, validated (defaults: TRL GKDConfig)."""
    beta: float = 0.5
    temperature: float = 1.0  # of both distributions in the loss (TRL: 1; the rollout samples at its own)
    seq_kd: bool = False  # the off-policy steps use the teacher's samples (sequence-level KD), not the dataset's
    lmbda: float = 1.0  # the probability that a step's responses are the student's own samples (TRL: 0.5)

    def __post_init__(self):
        if not 0 <= self.beta <= 1:
            raise errors.ConfigError(f"distill.beta must be in [0, 1], got {self.beta}.")
        if not 0 <= self.lmbda <= 1:
            raise errors.ConfigError(f"distill.lmbda must be in [0, 1], got {self.lmbda}.")
        if self.seq_kd and self.lmbda == 1:
            raise errors.ConfigError("distill.seq_kd samples from the teacher on the 1 − lmbda share of steps that "
                                     "are not on-policy: set distill.lmbda < 1 (0: always the teacher's samples).")
        if not self.temperature > 0:
            raise errors.ConfigError(f"distill.temperature must be > 0, got {self.temperature}.")

    @property
    def dataset_completions(self) -> bool:
        """Whether some steps train on the dataset's completions (the data must then be `sft` records)."""
        return self.lmbda < 1 and not self.seq_kd

    def on_policy(self, seed: int, step: int) -> bool:
        """Whether step `step`'s responses are the student's samples: u < lmbda, u uniform from (seed, step)."""
        return self.lmbda == 1 or float(np.random.default_rng([seed, step]).random()) < self.lmbda


@dataclasses.dataclass(frozen=True)
class DistillModels:
    student: onpolicy.Policy
    teacher_graphdef: object  # the teacher's module structure; its weights are state.frozen["teacher"]
    chunk_size: int = 256

    def teacher(self, frozen: dict) -> models.CausalLM:
        return models.merge(self.teacher_graphdef, frozen["teacher"])


def divergences(student, teacher, batch, *, beta: float, temperature: float, chunk_size: int) -> jax.Array:
    """JSD_β `[B, N]` at the response tokens of `batch`, 0 where masked (the teacher side without gradient)."""
    width = batch["response"].shape[1]
    student_hidden = onpolicy.response_hidden(student, batch["tokens"], batch["mask"], width)
    teacher_hidden = jax.lax.stop_gradient(onpolicy.response_hidden(teacher, batch["tokens"], batch["mask"], width))
    jsd = chunked_generalized_jsd(student_hidden, student.output_head(), teacher_hidden, teacher.output_head(),
                                  beta=beta, temperature=temperature, chunk_size=chunk_size)
    return jnp.where(batch["response_mask"] > 0, jsd, 0.0)


def distill_loss(trainable, frozen, batch, rng, *, m: DistillModels, h: DistillHyper):
    """(Σ_t JSD_β over real response tokens, (their count, {"jsd": the same sum}))."""
    jsd = divergences(m.student.forward(trainable, frozen, rng), m.teacher(frozen), batch, beta=h.beta,
                      temperature=h.temperature, chunk_size=m.chunk_size)
    loss_sum = jnp.sum(jsd)
    return loss_sum, (jnp.sum(batch["response_mask"] > 0).astype(jnp.float32), {"jsd": loss_sum})


def distill_step(state: TrainState, batch: dict, *, m: DistillModels, h: DistillHyper, optimizer, grad_accum: int):
    loss_fn = functools.partial(distill_loss, m=m, h=h)
    train = {k: batch[k] for k in ("tokens", "mask", "response", "response_mask")}
    state, per_update = onpolicy.minibatch_updates(state, train, loss_fn, optimizer=optimizer, epochs=1,
                                                   num_minibatches=1, grad_accum=grad_accum)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics["response_length"] = jnp.mean(jnp.sum(batch["response_mask"], axis=1).astype(jnp.float32))
    metrics["eos_rate"] = jnp.mean(batch["ended"].astype(jnp.float32))
    return state, metrics


class DistillRollouts:
    """`Task.prepare`: the responses of a step (see the module docstring) — the student's samples (rng
    fold_in(state.rng, 1)) with probability lmbda, else the teacher's (`seq_kd`) or the batch's dataset completions;
    logs `on_policy` (1 or 0)."""

    def __init__(self, mesh, m: DistillModels, h: DistillHyper, *, sampling: onpolicy.Sampling, eos_id: int,
                 pad_id: int, seed: int = 0):
        self.mesh, self.m, self.h, self.sampling, self.seed = mesh, m, h, sampling, seed
        self.student = m.student.rollout_sampler(eos_id=eos_id, pad_id=pad_id)
        self.teacher = sampler.KVCacheSampler(lambda w: models.merge(m.teacher_graphdef, w), eos_id=eos_id,
                                              pad_id=pad_id) if h.seq_kd else None
        self.completed = jax.jit(functools.partial(completion_rollout, pad_id=pad_id))

    def __call__(self, state, step, batch, draw=None):
        on_policy = self.h.on_policy(self.seed, step)
        with jax.set_mesh(self.mesh):
            prompts = sampler.trim_left_padding({k: batch[k] for k in onpolicy.PROMPT_KEYS})
            if on_policy or self.teacher is not None:
                engine, weights_ = ((self.student, self.m.student.weights(state.params, state.frozen)) if on_policy
                                    else (self.teacher, state.frozen["teacher"]))
                sampled = engine.sample(weights_, prompts, jax.random.fold_in(state.rng, 1), self.sampling)
            else:
                sampled = self.completed(prompts, batch["completion"], batch["completion_mask"],
                                         batch["completion_ended"])
        return {k: sampled[k] for k in ROLLOUT_KEYS}, {"on_policy": float(on_policy)}


def completion_rollout(prompts: dict, completion, completion_mask, completion_ended, *, pad_id: int) -> dict:
    """The dataset's completions of left-padded `prompts` as a rollout (the `sampler` contract less `logps`):
    `tokens`/`mask` `[B, L + N]` = prompt then completion, `response`/`response_mask` `[B, N]`, `ended` (not cut)."""
    real = completion_mask > 0
    response = jnp.where(real, completion, pad_id).astype(jnp.int32)
    return {"tokens": jnp.concatenate([prompts["input_ids"], response], axis=1),
            "mask": jnp.concatenate([prompts["attention_mask"], real.astype(jnp.int32)], axis=1),
            "response": response, "response_mask": real.astype(jnp.int32), "ended": completion_ended > 0}


class DistillEval:
    """`Task.eval_extra`: the student answers held-out prompts (fixed rng, the rollout's sampling); reported: the mean
    per-token JSD_β and forward KL(teacher ‖ student) on those responses, and their length."""

    def __init__(self, mesh, prompts: dict, seed: int, m: DistillModels, h: DistillHyper, *,
                 sampling: onpolicy.Sampling, eos_id: int, pad_id: int):
        self.mesh, self.m, self.sampling, self.rng = mesh, m, sampling, jax.random.PRNGKey(seed + 1)
        self.prompts = sampler.trim_left_padding({k: prompts[k] for k in onpolicy.PROMPT_KEYS})
        self.engine = m.student.rollout_sampler(eos_id=eos_id, pad_id=pad_id)

        def measure(state, rollout):
            student, teacher = m.student.forward(state.params, state.frozen), m.teacher(state.frozen)
            kw = {"temperature": h.temperature, "chunk_size": m.chunk_size}
            tokens = jnp.maximum(jnp.sum(rollout["response_mask"] > 0), 1)
            return {"jsd": jnp.sum(divergences(student, teacher, rollout, beta=h.beta, **kw)) / tokens,
                    "kl_teacher_student": jnp.sum(divergences(student, teacher, rollout, beta=0.0, **kw)) / tokens,
                    "response_length": jnp.mean(jnp.sum(rollout["response_mask"], axis=1).astype(jnp.float32))}

        self.measure = jax.jit(measure)

    def __call__(self, state) -> dict:
        with jax.set_mesh(self.mesh):
            rollout = self.engine.sample(self.m.student.weights(state.params, state.frozen), self.prompts, self.rng,
                                         self.sampling)
            return {k: float(v) for k, v in jax.device_get(self.measure(state, rollout)).items()}


def _teacher_source(config) -> str:
    if not config.get("teacher_from"):
        raise errors.ConfigError("distillation needs a teacher: set teacher_from=checkpoint:DIR, hf:DIR or gguf:FILE.")
    return weights.parse_source(config.teacher_from, "teacher_from")


def teacher_from(config, policy_meta: dict, model_config: models.ModelConfig):
    """(teacher config, graphdef, abstract params, logical axes, loader) of `teacher_from`, whose vocabulary and
    tokenizer must be the student's."""
    source = _teacher_source(config)
    teacher_config = models.ModelConfig.from_dict(
        weights.same_vocabulary(policy_meta, source, model_config, "teacher"))
    graphdef, abstract, logical = models.abstract_model(teacher_config)
    return teacher_config, graphdef, abstract, logical, weights.initializer(teacher_config, source)


def distill_core(config, student: TrainableModel, h: DistillHyper, sampling, teacher, *,
                 init_base) -> onpolicy.RlCore:
    """The models, param layout (the student trained, the teacher frozen), optimizer and cost of a task;
    `teacher` = `teacher_from`'s tuple."""
    teacher_config, graphdef, abstract, logical, loader = teacher
    m = DistillModels(onpolicy.Policy(student, sampling.temperature, config.loss_chunk), graphdef, config.loss_chunk)
    layout = group_rollout.rollout_layout(student, init_base=init_base, reference=False,
                                          frozen_models={"teacher": (abstract, logical, loader)})
    seq = config.data.max_prompt_len + sampling.max_new_tokens
    tokens = config.data.batch_size * seq
    # training FLOPs per token (forward + backward = 3 forwards): the student's update, the teacher's forward, and
    # the sampler's forward pass of whichever model samples, in expectation over lmbda (dataset completions: none)
    student_flops, teacher_flops = student.config.flops_per_token(seq), teacher_config.flops_per_token(seq)
    sampling_flops = h.lmbda * student_flops + (1 - h.lmbda) * (teacher_flops if h.seq_kd else 0.0)
    flops = tokens * (student_flops + teacher_flops / 3 + sampling_flops / 3)
    return onpolicy.RlCore(m, layout, onpolicy.update_optimizer(config, 1), tokens, flops)


def describe(config, mesh) -> Description:
    """The distillation task of `config` before data: `data.batch_size` sampled responses (the student's, or the
    teacher's with `seq_kd`) that the student learns the teacher's distributions on."""
    h = DistillHyper(**config.distill.to_dict())
    sampling = onpolicy.Sampling(**config.rollout.to_dict())
    model_config, meta, init_path = weights.resolve_model(config)
    rows = config.data.batch_size
    onpolicy.check_budget(config, model_config, sampling, rows, 1, "data.batch_size")
    teacher = teacher_from(config, weights.policy_tokenizer(config, meta), model_config)
    if config.data.max_prompt_len + sampling.max_new_tokens > teacher[0].max_seq_len:
        raise errors.ConfigError(f"data.max_prompt_len + rollout.max_new_tokens exceeds the teacher's max_seq_len="
                                 f"{teacher[0].max_seq_len}.")
    student = weights.trainable_model(config, model_config)
    core = distill_core(config, student, h, sampling, teacher, init_base=weights.initializer(model_config, init_path))
    m, optimizer = core.models, core.optimizer
    identity = {**student.identity(), "teacher_from": config.teacher_from, "seq_kd": h.seq_kd}
    task = onpolicy.rl_task(
        "distill", core, functools.partial(distill_step, m=m, h=h, optimizer=optimizer, grad_accum=config.grad_accum),
        {"stage": "distill", **student.metadata(), "resume_identity": identity,
         "init_from": config.init_from, "teacher_from": config.teacher_from, "model_params": "params",
         "model_frozen": "frozen/policy", "distill": dataclasses.asdict(h),
         "rollout": dataclasses.asdict(sampling)})
    sampled = sampler.rollout_shapes(rows, config.data.max_prompt_len, sampling)
    return Description(
        task, model_config, meta, init_path, abstract_batch=lambda _: {k: sampled[k] for k in ROLLOUT_KEYS},
        rollout=RolloutSpec(m.student, sampling, rows, config.data.max_prompt_len,
                            policy_params=lambda params: params, scoring_forwards=1,
                            share=1.0 if h.seq_kd else h.lmbda),
        parts={"hyper": h, "sampling": sampling, "models": m})


def build_task(config, workdir: str, mesh) -> Task:
    """The student from `init_from` (or a random `model`), the teacher from `teacher_from`, prompts from
    `data.train`; the tokenizer is `data.tokenizer`, else the student's, else the teacher's."""
    d = describe(config, mesh)
    h, m = d.parts["hyper"], d.parts["models"]
    meta_for_tokenizer = d.meta or {"tokenizer": weights.metadata(_teacher_source(config)).get("tokenizer", "")}
    tokenizer = lm.stage_tokenizer(config, meta_for_tokenizer, d.model_config, "Distillation")
    check_rows(mesh, config.data.batch_size // config.grad_accum, "data.batch_size / grad_accum (a micro-batch)")
    sampling = d.parts["sampling"]
    data, train_data, eval_prompts = onpolicy.prompt_data(
        config, d.meta, tokenizer, mesh, completions=sampling.max_new_tokens if h.dataset_completions else 0)
    kwargs = {"sampling": sampling, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    eval_extra = None if eval_prompts is None else DistillEval(mesh, eval_prompts, config.seed, m, h, **kwargs)
    return d.with_data(train_data=train_data, prepare=DistillRollouts(mesh, m, h, seed=config.seed, **kwargs),
                       eval_extra=eval_extra,
                       metadata={"tokenizer": tokenizer.model_path, "data": data.stats,
                                 **lm.chat_metadata(config, d.meta, data.stats)})

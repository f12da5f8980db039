"""`evaluate(config, checkpoint)`: the numbers of one trained policy (`flaxalign eval`, configs/eval.py).

Every part runs only when its config field is set:

* `prompts` — the policy samples one response per prompt (the first `num_prompts` records; `temperature`, `top_k`,
  `top_p`, `max_new_tokens`, `seed`). From these: response lengths and EOS rate; distinct-1/2, repeated-trigram
  rate and self-BLEU (`text_metrics`); exact-match accuracy on the records that have an `answer`, sampled and
  (`greedy_exact_match`) greedy.
* `reference` (a second policy): KL(π‖π_ref) on the policy's samples, Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) over
  each response's tokens with the full-vocabulary KL of the untempered distributions (as `stages.dpo.sampled_kl`,
  but with two separate models: ≥ 0, and exactly 0 when both are the same weights).
* `reward_from` (a reward model, normalised with its run's gain/bias): the mean score of the policy's responses;
  with a reference too, the reference also answers each prompt and the reward model judges the pair (win, tie and
  loss rates with `tie_margin`, and both mean scores and lengths).
* `gold_reward_from` (a second reward model, e.g. one trained on other pairs): the same scores and win rates under
  `gold/` and `gold_win_rate/`, so that a policy's gain under the reward model it was optimised against can be told
  from a gain under another judge (reward over-optimisation; a judge trained the same way may share its blind spots).
* the exact-answer checker as a gold judge: with a `reference` and prompts that have an `answer`, the reference's
  accuracy and the policy's win rate over it, per prompt (`exact_match/win_…`: a right answer beats a wrong one).
* `text_files` — perplexity (`likelihood.perplexity`) of each comma-separated text spec and pooled.
* `mc_file` — multiple-choice acc / acc_norm (`likelihood.multiple_choice`).
* `refusal_prompts` — the refusal rate (`text_metrics.refusal_rate`) of the policy's responses to those prompts.

Results go to `eval.json` in the output folder (written atomically; see `evaluate`) and the flat `metrics` to
TensorBoard (`tensorboard/`, and `metrics.jsonl`) at the checkpoint's step. One device: the models are small enough
to evaluate replicated; give `mesh` to use more.
"""

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from flaxalign import errors, models, sharding, weights
from flaxalign.data import formats
from flaxalign.data.atomic import write_atomically
from flaxalign.data.batching import left_pad_prompts
from flaxalign.data.chat import TEMPLATES
from flaxalign.data.prompt_data import (
    prompt_example,
    prompt_texts,
    truncate_prompt_left,
)
from flaxalign.data.sources import read_records
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.eval import likelihood, text_metrics
from flaxalign.generate import decode_responses
from flaxalign.interop import pretrained
from flaxalign.losses.lm import chunked_token_kl
from flaxalign.models.apply import apply_reward
from flaxalign.sampler import KVCacheSampler, Sampling
from flaxalign.train import checkpoint as ckpt
from flaxalign.train.metrics import MetricsWriter

EVAL_FILE = "eval.json"
SAMPLE_KEYS = ("tokens", "mask", "response", "response_mask", "ended")


@dataclasses.dataclass
class Model:
    """A loaded causal LM: its config, graphdef and params (in the mesh's shardings)."""

    config: models.ModelConfig
    graphdef: object
    params: dict


# ----------------------------------------------------------------------------
# Sources and outputs.


def resolve_source(spec: str, field: str = "checkpoint") -> str:
    """The weights source of a `--checkpoint`-style spec (`weights.source_of`), or a CheckpointError naming it when
    its path does not exist."""
    source = weights.source_of(spec)
    path = weights.directory_of(source)
    if not os.path.exists(path):
        raise errors.CheckpointError(f"{field} {spec!r} does not exist ({path} is not there).")
    return source


def default_output_dir(spec: str) -> str:
    """Where `eval.json` goes without `--workdir`: `eval/` in the run (or HF model) directory, `<name>_eval/` next
    to a GGUF file."""
    path = weights.directory_of(weights.source_of(spec))
    if os.path.isfile(path):
        return os.path.splitext(path)[0] + "_eval"
    return os.path.join(path, "eval")


def checkpoint_step(source: str) -> int:
    """The step of a run's latest checkpoint; 0 for pretrained weights."""
    return 0 if pretrained.is_pretrained(source) else ckpt.latest_step(source)


def load_policy(source: str, mesh) -> Model:
    config, params = weights.run_weights(source, mesh)
    return Model(config, models.abstract_model(config)[0], params)


def write_results(out_dir: str, result: dict, step: int) -> str:
    """Writes `eval.json` atomically (non-finite numbers as null) and the metrics to TensorBoard at `step`
    (re-evaluating a step replaces its metrics.jsonl row); returns the eval.json path."""
    path = os.path.join(out_dir, EVAL_FILE)
    text = json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))
    writer = MetricsWriter(out_dir, resume_step=step - 1 if step else -1)
    writer.write(step, result["metrics"])
    writer.close()
    return path


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------
# Batched device work.


def map_batches(fn, arrays: dict, batch_size: int):
    """fn(i, batch) over batches of `batch_size` rows of `arrays` (the last one filled with copies of its first
    row, so every call has one shape), the outputs' rows concatenated and the fill dropped (numpy)."""
    n = len(next(iter(arrays.values())))
    outputs = []
    for i, lo in enumerate(range(0, n, batch_size)):
        batch = {k: v[lo:lo + batch_size] for k, v in arrays.items()}
        size = len(next(iter(batch.values())))
        if size < batch_size:
            batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - size, axis=0)]) for k, v in batch.items()}
        outputs.append(jax.tree.map(lambda x, size=size: np.asarray(x)[:size], jax.device_get(fn(i, batch))))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def prompt_arrays(records: list[dict], tokenizer, *, chat_template: str, max_prompt_len: int) -> dict:
    """Left-padded `[N, max_prompt_len]` prompts of `prompt` records (`prompt_example`, cut on the left)."""
    ids = [truncate_prompt_left(prompt_example(r, tokenizer, chat_template, source=f"prompt {i}"), max_prompt_len,
                                tokenizer.bos_id) for i, r in enumerate(records)]
    return left_pad_prompts(ids, pad_id=tokenizer.pad_id, length=max_prompt_len)


def make_sampler(model: Model, config, *, eos_id: int, pad_id: int, temperature: float | None = None):
    """`sample(prompts, rng)`: the model's responses from its `KVCacheSampler` (one compile per prompt shape) at
    the evaluation's sampling settings (or another `temperature`; 0 = greedy), the `SAMPLE_KEYS` of the rollout."""
    engine = KVCacheSampler(functools.partial(models.merge, model.graphdef), eos_id=eos_id, pad_id=pad_id)
    temperature = config.temperature if temperature is None else temperature
    sampling = Sampling(config.max_new_tokens, temperature, config.top_k, config.top_p)

    def sample(prompts, rng):
        return {k: v for k, v in engine.sample(model.params, prompts, rng, sampling).items() if k in SAMPLE_KEYS}
    return sample


def sample_responses(sample, prompts: dict, tokenizer, rng, batch_size: int) -> dict:
    """The responses of `sample` (`make_sampler`) to `[N, L]` prompts, `batch_size` at a time: numpy `SAMPLE_KEYS`
    arrays plus `texts` (decoded, without the EOS and ids the tokenizer does not know)."""
    out = map_batches(lambda i, batch: sample(batch, jax.random.fold_in(rng, i)), prompts, batch_size)
    # ids past the tokenizer's vocabulary (padded embedding rows a model may still sample) are left out of the text
    known = out["response_mask"] * (out["response"] < tokenizer.vocab_size)
    out["texts"] = decode_responses(tokenizer, out["response"], known)
    return out


def response_kl(policy_params, reference_params, tokens, mask, response_mask, *, policy_graphdef, reference_graphdef,
                prompt_len: int, chunk_size: int):
    """Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) over the response tokens of each sampled row `[B]` (float32).
    `tokens`/`mask` are `generate`'s `[B, L + N]` (prompt, response), `response_mask` its `[B, N]`."""
    inputs, in_mask = tokens[:, :-1], mask[:, :-1]  # the inputs whose next token is a response token (from L − 1)
    positions = jnp.maximum(jnp.cumsum(in_mask, axis=1) - 1, 0)
    policy = models.merge(policy_graphdef, policy_params)
    reference = models.merge(reference_graphdef, reference_params)
    kl = chunked_token_kl(policy(inputs, positions, in_mask), policy.output_head(),
                          reference(inputs, positions, in_mask), reference.output_head(), chunk_size=chunk_size)
    return jnp.sum(kl[:, prompt_len - 1:] * response_mask.astype(jnp.float32), axis=1)


def sequence_kl(policy: Model, reference: Model, samples: dict, *, prompt_len: int, batch_size: int,
                chunk_size: int) -> np.ndarray:
    """`response_kl` of every sampled row, numpy `[N]`."""
    run = jax.jit(lambda p, r, b: response_kl(
        p, r, b["tokens"], b["mask"], b["response_mask"], policy_graphdef=policy.graphdef,
        reference_graphdef=reference.graphdef, prompt_len=prompt_len, chunk_size=chunk_size))
    arrays = {k: samples[k] for k in ("tokens", "mask", "response_mask")}
    return map_batches(lambda i, batch: run(policy.params, reference.params, batch), arrays, batch_size)


# ----------------------------------------------------------------------------
# The reward model.


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model and its normalisation: score = gain · r + bias."""

    config: models.ModelConfig
    params: dict  # {"model": backbone, "head": head}
    gain: float
    bias: float


def load_reward_model(spec: str, policy_meta: dict, policy_config: models.ModelConfig, mesh) -> RewardModel:
    """The reward model of `reward_from` (a reward run, or an `hf:` `*ForSequenceClassification` directory) with
    its normalisation; it must score the policy's tokens (same vocabulary and tokenizer)."""
    source = resolve_source(spec, "reward_from")
    config, abstract, logical, load = weights.reward_from(source, policy_meta, policy_config)
    params = load(sharding.tree_shardings(logical, abstract, mesh))
    norm = weights.reward_normalization(source)
    return RewardModel(config, params, float(norm["gain"]), float(norm["bias"]))


def reward_scores(rm: RewardModel, samples: dict, batch_size: int) -> np.ndarray:
    """gain · r(x, y) + bias of every sampled (prompt, response) row, numpy `[N]`."""
    def score(i, batch):
        return apply_reward(rm.config, rm.params["model"], rm.params["head"], batch["tokens"], batch["mask"])

    raw = map_batches(score, {k: samples[k] for k in ("tokens", "mask")}, batch_size)
    return rm.gain * np.asarray(raw, np.float64) + rm.bias


# ----------------------------------------------------------------------------
# The parts.


def check_config(config) -> None:
    """ConfigError for sampling settings out of range."""
    if config.batch_size < 1 or config.max_new_tokens < 1 or config.num_prompts < 0 or config.max_prompt_len < 2:
        raise errors.ConfigError("need batch_size >= 1, max_new_tokens >= 1, num_prompts >= 0 and "
                                 "max_prompt_len >= 2.")
    if config.temperature < 0 or not 0 < config.top_p <= 1 or config.top_k < 0:
        raise errors.ConfigError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0.")
    if config.tie_margin < 0:
        raise errors.ConfigError(f"tie_margin must be >= 0, got {config.tie_margin}.")
    if config.chat_template not in ("", "auto", *TEMPLATES):  # message-list prompts need one ("none" has no use)
        raise errors.ConfigError(f"chat_template={config.chat_template!r} is not one of {['auto', *TEMPLATES]}.")


def check_length(model, config, name: str) -> None:
    """ConfigError when a prompt and its response do not fit the model (a `Model` or `RewardModel`)."""
    if config.max_prompt_len + config.max_new_tokens > model.config.max_seq_len:
        raise errors.ConfigError(
            f"max_prompt_len={config.max_prompt_len} + max_new_tokens={config.max_new_tokens} exceeds the {name}'s "
            f"max_seq_len={model.config.max_seq_len}.")


def read_prompts(spec: str, limit: int, record_format: formats.RecordFormat = formats.TRL) -> list[dict]:
    records = read_records(spec, "prompt", record_format=record_format)
    return records[:limit] if limit else records


def sample_metrics(samples: dict, prefix: str = "policy") -> dict:
    lengths = samples["response_mask"].sum(axis=1)
    stats = text_metrics.length_stats(lengths)
    return {f"{prefix}/response_tokens_{k}": v for k, v in stats.items()} | {
        f"{prefix}/eos_rate": float(np.mean(samples["ended"])), f"{prefix}/responses": len(lengths)}


def diversity_metrics(texts: list[str]) -> dict:
    return {"diversity/distinct_1": text_metrics.distinct_n(texts, 1),
            "diversity/distinct_2": text_metrics.distinct_n(texts, 2),
            "diversity/repeated_trigram_rate": text_metrics.repeated_ngram_rate(texts, 3),
            "diversity/self_bleu": text_metrics.self_bleu(texts)}


def perplexity_metrics(config, policy: Model, scorer, tokenizer) -> tuple[dict, dict]:
    """(flat pooled metrics, {spec: per-spec result}) of `text_files`."""
    window = int(config.perplexity_window) or policy.config.max_seq_len
    if window > policy.config.max_seq_len:
        raise errors.ConfigError(f"perplexity_window={window} exceeds the model's max_seq_len="
                                 f"{policy.config.max_seq_len}.")
    per_spec = {}
    for spec in (s.strip() for s in config.text_files.split(",") if s.strip()):
        per_spec[spec] = likelihood.perplexity(scorer, policy.params, tokenizer, spec, window=window,
                                               batch_size=config.batch_size,
                                               max_tokens=int(config.perplexity_max_tokens))
        logging.info("eval: perplexity of %s: %.3f over %d tokens.", spec, per_spec[spec]["perplexity"],
                     per_spec[spec]["tokens"])
    logp = -sum(r["nll"] * r["tokens"] for r in per_spec.values())
    pooled = likelihood.perplexity_of(logp, sum(r["tokens"] for r in per_spec.values()))
    return {f"perplexity/{k}": v for k, v in pooled.items()}, per_spec


def evaluate(config, checkpoint: str, mesh=None, *, workdir: str = "") -> dict:
    """Evaluates the policy of `checkpoint` (a run directory, `checkpoint:DIR`, `hf:DIR` or `gguf:FILE`) as
    `config` (configs/eval.py) asks; writes `eval.json` and TensorBoard scalars to `workdir` (default
    `default_output_dir(checkpoint)`) on process 0 and returns the result:

        {"checkpoint", "source", "step", "reference", "reward_from", "output_dir",
         "metrics": {"policy/…", "diversity/…", "exact_match/…", "kl/…", "reward/…", "reference/…", "win_rate/…",
                     "perplexity/…", "mc/…", "refusal/…": number},
         "perplexity_files": {spec: {"perplexity", "nll", "tokens", "documents"}},
         "examples": [{"prompt", "response", "answer"?, "reference_response"?, "score"?, "reference_score"?}],
         "settings": the config, "wall_time_s"}
    """
    started = time.time()
    check_config(config)
    source = resolve_source(checkpoint)
    mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    meta = weights.metadata(source)
    if not meta.get("tokenizer"):
        raise errors.ConfigError(f"{checkpoint} has no tokenizer to turn prompts into tokens.")
    tokenizer = load_tokenizer(meta["tokenizer"])
    if config.chat_template in ("", "auto"):  # the run's own (recorded in training), else plain
        config.chat_template = meta.get("chat_template") or "plain"
    with jax.set_mesh(mesh):
        policy = load_policy(source, mesh)
        reference = rm = None
        if config.reference:
            ref_source = resolve_source(config.reference, "reference")
            weights.same_vocabulary(meta, ref_source, policy.config, "reference")
            reference = load_policy(ref_source, mesh)
        if config.reward_from:
            rm = load_reward_model(config.reward_from, meta, policy.config, mesh)
        gold = None
        if config.gold_reward_from:
            gold = load_reward_model(config.gold_reward_from, meta, policy.config, mesh)
        metrics, per_spec, examples = run_parts(config, policy, reference, rm, tokenizer, gold)

    step = checkpoint_step(source)
    out_dir = workdir or default_output_dir(checkpoint)
    result = {"checkpoint": checkpoint, "source": source, "step": step, "reference": config.reference,
              "reward_from": config.reward_from, "gold_reward_from": config.gold_reward_from, "output_dir": out_dir,
              "metrics": _plain(metrics),
              "perplexity_files": per_spec, "examples": examples, "settings": config.to_dict(),
              "wall_time_s": round(time.time() - started, 2)}
    if jax.process_index() == 0:
        write_results(out_dir, result, step)
    return result


def run_parts(config, policy: Model, reference, rm, tokenizer, gold=None) -> tuple[dict, dict, list]:
    """(flat metrics, per-spec perplexities, examples) of the parts the config sets (see the module docstring);
    `gold`: the gold reward model of `gold_reward_from`, or None."""
    metrics, per_spec, examples = {}, {}, []
    rng = jax.random.PRNGKey(config.seed)
    samplers = {}
    if config.prompts or config.refusal_prompts:
        check_length(policy, config, "policy")
        samplers["policy"] = make_sampler(policy, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        if config.prompts and config.greedy_exact_match and config.temperature > 0:
            samplers["greedy"] = make_sampler(policy, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                              temperature=0.0)
    for judge, name in ((rm, "reward model"), (gold, "gold reward model")):
        if config.prompts and judge is not None:
            check_length(judge, config, name)
    if config.prompts and reference is not None:
        check_length(reference, config, "reference")
        samplers["reference"] = make_sampler(reference, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    if config.prompts:
        metrics_part, examples = sampled_part(config, policy, reference, rm, tokenizer, samplers, rng, gold=gold)
        metrics.update(metrics_part)
    elif reference is not None or rm is not None or gold is not None:
        logging.warning("eval: reference / reward_from / gold_reward_from are set but prompts is empty; nothing is "
                        "sampled.")

    scorer = likelihood.make_scorer(policy.graphdef, int(config.loss_chunk))
    if config.text_files:
        pooled, per_spec = perplexity_metrics(config, policy, scorer, tokenizer)
        metrics.update(pooled)
    if config.mc_file:
        mc = likelihood.multiple_choice(scorer, policy.params, tokenizer, config.mc_file,
                                        max_seq_len=policy.config.max_seq_len, batch_size=config.batch_size,
                                        template=config.mc_template, prefix=config.mc_choice_prefix)
        metrics.update({f"mc/{k}": v for k, v in mc.items()})
    if config.refusal_prompts:
        records = read_prompts(config.refusal_prompts, config.num_prompts)
        prompts = prompt_arrays(records, tokenizer, chat_template=config.chat_template,
                                max_prompt_len=config.max_prompt_len)
        texts = sample_responses(samplers["policy"], prompts, tokenizer, jax.random.fold_in(rng, 2),
                                 config.batch_size)["texts"]
        metrics.update({"refusal/rate": text_metrics.refusal_rate(texts), "refusal/prompts": len(texts)})
    return metrics, per_spec, examples


def sampled_part(config, policy: Model, reference, rm, tokenizer, samplers: dict, rng,
                 gold=None) -> tuple[dict, list]:
    """The metrics of the policy's responses to `prompts` (and the reference's, and their KL, reward and gold
    judgements), and the first `num_examples` of them. `samplers`: `make_sampler` of the policy (and "greedy", and
    the reference's)."""
    records = read_prompts(config.prompts, config.num_prompts,
                           formats.from_config(config.get("prompts_format"), "prompts_format"))
    prompts = prompt_arrays(records, tokenizer, chat_template=config.chat_template,
                            max_prompt_len=config.max_prompt_len)
    samples = sample_responses(samplers["policy"], prompts, tokenizer, rng, config.batch_size)
    texts = samples["texts"]
    metrics = {**sample_metrics(samples), **diversity_metrics(texts)}
    answers = [r.get("answer") for r in records]
    has_answers = any(a is not None for a in answers)
    if has_answers:
        accuracy, n = text_metrics.exact_match_rate(texts, answers)
        metrics.update({"exact_match/accuracy": accuracy, "exact_match/n": n})
        if config.greedy_exact_match:
            greedy = texts if "greedy" not in samplers else sample_responses(
                samplers["greedy"], prompts, tokenizer, rng, config.batch_size)["texts"]
            metrics["exact_match/greedy_accuracy"] = text_metrics.exact_match_rate(greedy, answers)[0]
    shown = min(int(config.num_examples), len(records))
    examples = [{"prompt": p, "response": t} for p, t in zip(prompt_texts(records[:shown]), texts[:shown])]
    for example, answer in zip(examples, answers):
        if answer is not None:
            example["answer"] = answer
    if reference is not None:
        kl = sequence_kl(policy, reference, samples, prompt_len=config.max_prompt_len, batch_size=config.batch_size,
                         chunk_size=int(config.loss_chunk))
        tokens = max(float(samples["response_mask"].sum()), 1.0)
        metrics.update({"kl/mean": float(np.mean(kl)), "kl/std": float(np.std(kl)),
                        "kl/per_token": float(kl.sum() / tokens)})
        logging.info("eval: KL(policy || reference) = %.4f per response.", metrics["kl/mean"])
    ref_samples = None
    if reference is not None and (rm is not None or gold is not None or has_answers):
        ref_samples = sample_responses(samplers["reference"], prompts, tokenizer, jax.random.fold_in(rng, 1),
                                       config.batch_size)
        metrics.update(sample_metrics(ref_samples, "reference"))
        for example, text in zip(examples, ref_samples["texts"]):
            example["reference_response"] = text
    if ref_samples is not None and has_answers:
        # the exact-answer checker as a judge: right beats wrong, two right or two wrong answers tie
        correct, ref_correct = (text_metrics.exact_answer_scores(t, answers) for t in (texts, ref_samples["texts"]))
        metrics["exact_match/reference_accuracy"] = float(np.mean(ref_correct)) if ref_correct else 0.0
        metrics.update({f"exact_match/win_{k}": v for k, v in text_metrics.win_rate(correct, ref_correct).items()})
    # (judge, metric prefix, win-rate prefix, example keys of the policy's and the reference's score)
    for judge, prefix, win_prefix, keys in ((rm, "reward", "win_rate", ("score", "reference_score")),
                                            (gold, "gold", "gold_win_rate", ("gold_score", "reference_gold_score"))):
        if judge is None:
            continue
        scores = reward_scores(judge, samples, config.batch_size)
        metrics.update({f"{prefix}/score_mean": float(scores.mean()), f"{prefix}/score_std": float(scores.std())})
        for example, score in zip(examples, scores):
            example[keys[0]] = float(score)
        if ref_samples is None:
            continue
        ref_scores = reward_scores(judge, ref_samples, config.batch_size)
        metrics[f"{prefix}/reference_score_mean"] = float(ref_scores.mean())
        metrics.update({f"{win_prefix}/{k}": v for k, v in text_metrics.win_rate(
            scores, ref_scores, config.tie_margin).items()})
        for example, score in zip(examples, ref_scores):
            example[keys[1]] = float(score)
    return metrics, examples


def _plain(metrics: dict) -> dict:
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in metrics.items()}

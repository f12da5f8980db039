"""Times the DPO train step (sigmoid loss, β = 0.1) and reports tokens/s and MFU against a matmul peak measured in
this process, for full fine-tuning with a frozen reference copy and for LoRA (r=8, α=16, all-linear) with the
adapter-off base as the reference; and the speed ratio to TRL's `DPOTrainer` on the same-shaped model when torch,
transformers, peft, datasets and trl are importable.

    python bench/dpo_step.py                       # `small` preset: 6 layers, d=512, 4 pairs × seq 256
    python bench/dpo_step.py --preset=tiny --steps=3 --no_trl

Tokens per step = 2 · pairs · seq (the chosen and the rejected row). FLOPs per step, the same for both sides, so
the MFU ratio is a pure speed ratio:

    dpo.training_passes(method, reference) · 2·pairs·seq · model_config.flops_per_token(seq)

i.e. forward + backward of the policy on both rows plus the reference forward on both rows (8/6 of a training
pass), counted as full 6·N·tokens even for LoRA, whose frozen base weights get no weight gradient.

TRL side: a `transformers.LlamaForCausalLM` built from the same config (random init, float32, sdpa attention),
with a deep copy as `ref_model` (full) or a PEFT LoRA r=8, α=16, `target_modules="all-linear"` and no ref model
(LoRA: TRL disables the adapter for the reference pass). The preference pairs are strings of a word-level
tokenizer (one word per token id), so every prompt + completion is exactly `seq` tokens and TRL's dynamic padding
gives [2·pairs, seq] batches, the shape flaxalign runs. Each TRL round builds a fresh trainer (logging_steps=1,
no saving, no eval) and trains 1 + steps steps; the first (warmup) step, dataset preparation and model
construction are never timed.

Two comparisons, each side timed the same way in both (seconds per step = the mean over the round's `steps`):

  in-step     TRL: a `TrainerCallback` from `on_step_begin` to `on_step_end`. In transformers 5.25's
              `Trainer._inner_training_loop` (gradient_accumulation_steps=1) that span is `training_step` (moving
              the already collated batch to the device, DPOTrainer.compute_loss: policy forward on the chosen and
              rejected rows, the no-grad reference forward, the loss, and TRL's per-step metrics — entropy, token
              accuracy, rewards, margins, log-probs — each read with `.item()`; then backward), the NaN/Inf check
              of the loss, FLOP and input-token counting, gradient clipping to 1.0, `optimizer.step()` (AdamW),
              `lr_scheduler.step()` and `zero_grad`. Not in it: fetching and collating the next batch
              (`get_batch_samples`, before `on_step_begin`) and logging (`_maybe_log_save_evaluate`, after
              `on_step_end`: the loss `.item()`, averaging TRL's metrics, `log_history`).
              flaxalign: the compiled step (`CompiledStep`, the same as the training loop's) on a batch already on
              the device, with `jax.block_until_ready` on the new state and the metrics after every step (TRL's
              eager step is synchronous too). The DPO metrics are computed inside the step but stay on the device.
  end-to-end  TRL: `on_step_end` to the next `on_step_end`, i.e. the in-step span plus logging and the next batch's
              fetch and collation — all a user pays per step.
              flaxalign: the real training loop, `flaxalign.train.loop.train`, on a fresh state each round (as TRL's
              fresh trainer), log_every=1 (as logging_steps=1), no eval, no checkpoint until the end; its own
              per-row `step_time` (from one step's metrics fetch to the next one's, so the row writing between is
              in it) for the steps after the first. Per step that loop takes the next batch from a `BatchIterator`
              over rows built once up front with `preference_batch` + `stack_pairs` (what the DPO stage's data path
              does: it pads all pairs at load, as TRL tokenizes at load; TRL pads per batch), which the `Prefetcher`
              thread has already put on the device with `sharding.global_batch`, runs the step, fetches every
              metric to the host (`device_get`, a sync), writes `metrics.jsonl` (and TensorBoard when tensorboardX
              is installed) and formats the console line (absl prints it only at INFO verbosity, as the CLI sets).
              The final checkpoint is written after the timed steps.

The headline ratio is the in-step one (the step's own speed); the end-to-end ratio is printed beside it. The same
step compiles once per loop round; a persistent compilation cache in a temporary directory (unless one is
configured already) makes later rounds load it instead of recompiling; compile time is never timed.

This CPU's speed swings between minutes, so the matmul peak is measured right before and right after the model
timings, and the rounds alternate: flaxalign in-step, flaxalign loop, TRL for full, then the same for LoRA,
`--rounds` times. The best round of each is reported.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as cc

from flaxalign import models, sharding
from flaxalign.data.batching import preference_batch, stack_pairs
from flaxalign.data.loader import BatchIterator
from flaxalign.peft import lora
from flaxalign.policy import TrainableModel
from flaxalign.stages import dpo
from flaxalign.train import loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from flaxalign.train.mfu import measure_matmul_peak

METHOD = dpo.Method(loss_type="sigmoid", beta=0.1)
LORA_RANK, LORA_ALPHA = 8, 16.0
PAD_ID, EOS_ID = 0, 1  # token ids of the benchmark's word-level vocabulary; words 2..V-1 are "t2".."t{V-1}"
# name -> (reference, LoRA?)
CONFIGS = {"full": ("copy", False), "lora": ("base", True)}
TRL_WARMUP_STEPS = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2 × pairs rows)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (prompt + completion)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loss_chunk", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--remat", default=models.ModelConfig.remat, help="model.remat (default: the model default)")
    p.add_argument("--no_trl", action="store_true",
                   help="time flaxalign only (imports no torch itself; the training loop's TensorBoard writer, "
                        "tensorboardX, imports it where installed)")
    p.add_argument("--no_end_to_end", action="store_true",
                   help="skip the end-to-end timings (each flaxalign round runs and checkpoints a training loop)")
    p.add_argument("--trl_gradient_checkpointing", action="store_true",
                   help="keep DPOConfig's default gradient_checkpointing=True (recomputes the forward in the "
                        "backward); off by default, so both sides do the same work")
    p.add_argument("--peak_size", type=int, default=2048, help="matrix size of the matmul peak measurement")
    p.add_argument("--json", default="", help="also write the results to this file")
    return p.parse_args(argv)


def optim_config(steps):
    return ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, total_steps=max(steps, 1), schedule="constant",
                                          final_lr_fraction=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                          clip_norm=1.0))


def make_pairs(vocab_size, num_pairs, seq, seed=0):
    """`num_pairs` (prompt, chosen, rejected) token-id lists of random words; prompt + completion is exactly `seq`
    tokens for both completions, and each completion ends with EOS (as TRL appends it)."""
    if seq < 4:
        raise ValueError(f"--seq must be >= 4, got {seq}.")
    rng = np.random.default_rng(seed)
    prompt_len = max(1, seq // 4)
    completion_len = seq - prompt_len

    def words(n):
        return [int(t) for t in rng.integers(EOS_ID + 1, vocab_size, size=n)]

    return [(words(prompt_len), words(completion_len - 1) + [EOS_ID], words(completion_len - 1) + [EOS_ID])
            for _ in range(num_pairs)]


def flaxalign_batch(pairs, seq):
    """`[B, 2, seq]` arrays: prompt + completion has `seq` tokens, so the model runs on `seq` positions."""
    return stack_pairs(preference_batch(pairs, seq, pad_id=PAD_ID))


class FlaxalignDPO:
    """The in-step side: a compiled DPO step on a fixed cycle of batches already on the device, timed per step with a
    sync after each; `seconds_per_step` continues training from where it was."""

    def __init__(self, config, args, workdir, pairs, reference, use_lora):
        self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        task = make_flaxalign_task(config, args, args.steps * args.rounds + 1, reference, use_lora)
        self.state, shardings, _ = loop.initial_state(task, 0, self.mesh, Checkpointer(workdir))
        self.step = CompiledStep(task.train_step, self.mesh, shardings)
        n = args.pairs
        self.batches = [sharding.global_batch(flaxalign_batch(pairs[i:i + n], args.seq), self.mesh)
                        for i in range(0, len(pairs) - n + 1, n)][:4]
        self.calls = 0
        self.losses = []
        start = time.perf_counter()
        self._timed_steps(1)
        self.compile_seconds = time.perf_counter() - start

    def _timed_steps(self, steps):
        seconds, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batches[self.calls % len(self.batches)])
            jax.block_until_ready((self.state, metrics))
            seconds.append(time.perf_counter() - start)
            self.calls += 1
            losses.append(metrics["loss"])
        self.losses.extend(float(x) for x in jax.device_get(losses))  # after the timing: logging is not in-step
        return seconds

    def seconds_per_step(self, steps):
        return statistics.fmean(self._timed_steps(steps))


def make_flaxalign_task(config, args, total_steps, reference, use_lora, train_data=None):
    lora_config = lora.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA) if use_lora else None
    tokens = 2 * args.pairs * args.seq
    return dpo.make_task(TrainableModel(config, lora_config), optim_config(total_steps), METHOD, reference=reference,
                         chunk_size=args.loss_chunk, grad_accum=1, train_data=train_data, tokens_per_step=tokens,
                         flops_per_step=dpo.training_passes(METHOD, reference) * tokens * config.flops_per_token(
                             args.seq))


def flaxalign_loop_round(config, pairs, args, reference, use_lora, workdir):
    """The end-to-end side: one run of the real training loop (`loop.train`) of TRL_WARMUP_STEPS + args.steps steps
    on a fresh state, logging every step. Returns the loop's own mean `step_time` of the steps after the warmup and
    the logged losses."""
    total = TRL_WARMUP_STEPS + args.steps
    rows = flaxalign_batch(pairs, args.seq)  # the whole set, padded once as the DPO stage's data path does
    task = make_flaxalign_task(config, args, total, reference, use_lora,
                               train_data=BatchIterator(rows, args.pairs, seed=0, shuffle=True))
    cfg = ml_collections.ConfigDict(dict(steps=total, seed=0, log_every=1, eval_every=0, eval_at_start=False,
                                         checkpoint_every=0, keep_checkpoints=1))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    try:
        loop.train(task, cfg, workdir, mesh)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f if line.strip()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the final checkpoint is a full train state per round
    # the first step's row (compile included) has no step_time: the loop times from its end
    times = [row["step_time"] for row in logged if "step_time" in row]
    if len(logged) != total or len(times) != args.steps:
        raise RuntimeError(f"the loop logged {len(logged)} rows ({len(times)} timed), expected {total} "
                           f"({args.steps} timed).")
    return {"seconds_per_step": statistics.fmean(times), "losses": [row["loss"] for row in logged]}


@contextlib.contextmanager
def compilation_cache():
    """A persistent compilation cache in a temporary directory for the duration, unless one is configured: each
    `loop.train` round builds a new jitted step of the same program, which then loads instead of recompiling."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    with tempfile.TemporaryDirectory() as directory:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        cc.set_cache_dir(directory)
        cc.reset_cache()  # an earlier compile in this process already decided "no cache"
        try:
            yield
        finally:
            for name, value in saved.items():
                jax.config.update(name, value)
            cc.reset_cache()  # the next compile in this process re-reads the (restored) settings


# --------------------------------------------------------------------------------------------------------------
# TRL (imported only when used: `--no_trl` never imports torch)


def hf_llama_config(config):
    """A `transformers.LlamaConfig` with the shapes of a flaxalign `ModelConfig` (Llama-family presets)."""
    import transformers

    if config.qkv_bias or config.rope_scaling_factor:
        raise ValueError("the TRL comparison supports plain Llama presets (no qkv_bias, no RoPE scaling).")
    return transformers.LlamaConfig(
        hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        vocab_size=config.vocab_size, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_implementation="sdpa")


def word_tokenizer(vocab_size):
    """A fast tokenizer whose words are token ids: "<pad>" = 0, "</s>" = 1, "t{i}" = i; whitespace-split, no BOS."""
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, **{f"t{i}": i for i in range(EOS_ID + 1, vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<pad>")


def _text(ids):
    return " ".join("</s>" if i == EOS_ID else f"t{i}" for i in ids)


def trl_dpo_round(config, pairs, args, use_lora, workdir):
    """One TRL `DPOTrainer` run of TRL_WARMUP_STEPS + args.steps steps on a fresh model: the mean seconds per step
    after the warmup, in-step (step begin to step end) and end-to-end (step end to step end), the losses TRL
    logged, and the shapes it really ran."""
    import copy
    import warnings

    import datasets
    import peft
    import torch
    import transformers
    import trl

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's gradient_checkpointing renames
    datasets.disable_progress_bars()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_llama_config(config)).float()
    ref_model = None if use_lora else copy.deepcopy(model).eval()
    peft_config = None
    if use_lora:
        peft_config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                      target_modules="all-linear", task_type="CAUSAL_LM")
    total = TRL_WARMUP_STEPS + args.steps
    rows = pairs[: total * args.pairs]
    dataset = datasets.Dataset.from_dict({"prompt": [_text(p) for p, _, _ in rows],
                                          "chosen": [" " + _text(c) for _, c, _ in rows],
                                          "rejected": [" " + _text(r) for _, _, r in rows]})
    dpo_args = trl.DPOConfig(
        output_dir=workdir, per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=total,
        max_length=args.seq, beta=METHOD.beta, loss_type=[METHOD.loss_type], learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
        bf16=False, fp16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        gradient_checkpointing=args.trl_gradient_checkpointing)

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, *a, **k):
            self.begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=dpo_args, train_dataset=dataset,
                             processing_class=word_tokenizer(config.vocab_size), peft_config=peft_config,
                             callbacks=[timer])
    trainer.remove_callback(transformers.PrinterCallback)  # the losses are read from log_history instead
    # the batch shape TRL's collator really builds from the prepared (tokenized) dataset
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
    shape = tuple(batch["input_ids"].shape)
    if shape != (2 * args.pairs, args.seq):
        raise RuntimeError(f"TRL built batches of shape {shape}, expected {(2 * args.pairs, args.seq)}.")
    trainer.train()
    if len(timer.ends) != total:
        raise RuntimeError(f"TRL ran {len(timer.ends)} steps, expected {total}.")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    in_step = [e - b for b, e in zip(timer.begins[TRL_WARMUP_STEPS:], timer.ends[TRL_WARMUP_STEPS:])]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"in_step": statistics.fmean(in_step),
            "end_to_end": (timer.ends[-1] - timer.ends[TRL_WARMUP_STEPS - 1]) / args.steps,
            "losses": losses, "batch_shape": shape,
            "trainable_params": trainable, "threads": torch.get_num_threads(),
            "optimizer": str(dpo_args.optim), "gradient_checkpointing": dpo_args.gradient_checkpointing}


def trl_available():
    """Whether the TRL side can run (checked without importing torch)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("datasets", "peft", "torch", "transformers", "trl"))


# --------------------------------------------------------------------------------------------------------------


COMPARISONS = {"in_step": "in-step", "end_to_end": "end-to-end"}


def summary(rounds, tokens, flops, peak):
    """The best round of one side of one comparison, as seconds, tokens/s and MFU."""
    best = min(rounds)
    return {"seconds": best, "seconds_median": statistics.median(rounds), "seconds_rounds": rounds,
            "tokens_per_sec": tokens / best, "mfu": flops / best / peak}


def run_rounds(config, args, pairs, workdir, use_trl):
    """The alternating rounds. Returns the in-step timers and, per config, per comparison, per side, the rounds'
    seconds per step (plus the TRL runs and the loop losses)."""
    timers = {name: FlaxalignDPO(config, args, os.path.join(workdir, name), pairs, reference, use_lora)
              for name, (reference, use_lora) in CONFIGS.items()}
    times = {name: {c: {"flaxalign": [], "trl": []} for c in COMPARISONS} for name in CONFIGS}
    trl_runs, loop_losses = {name: [] for name in CONFIGS}, {}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds} ...", file=sys.stderr, flush=True)  # a run takes minutes
        for name, (reference, use_lora) in CONFIGS.items():
            times[name]["in_step"]["flaxalign"].append(timers[name].seconds_per_step(args.steps))
            if not args.no_end_to_end:
                run = flaxalign_loop_round(config, pairs, args, reference, use_lora,
                                           os.path.join(workdir, f"loop_{name}_{round_index}"))
                times[name]["end_to_end"]["flaxalign"].append(run["seconds_per_step"])
                loop_losses[name] = run["losses"]
            if use_trl:
                run = trl_dpo_round(config, pairs, args, use_lora, os.path.join(workdir, f"trl_{name}"))
                trl_runs[name].append(run)
                for comparison in COMPARISONS:
                    times[name][comparison]["trl"].append(run[comparison])
    return timers, times, trl_runs, loop_losses


def main(argv=None):
    args = parse_args(argv)
    config = models.ModelConfig.from_dict({**models.preset(args.preset), "dtype": args.dtype, "remat": args.remat})
    if args.seq > config.max_seq_len:
        raise ValueError(f"--seq={args.seq} exceeds the preset's max_seq_len={config.max_seq_len}.")
    tokens = 2 * args.pairs * args.seq
    use_trl = not args.no_trl and trl_available()
    # enough distinct pairs for TRL's warmup + timed steps (flaxalign cycles over the first few batches)
    pairs = make_pairs(config.vocab_size, max(TRL_WARMUP_STEPS + args.steps, 4) * args.pairs, args.seq)
    peaks = [measure_matmul_peak(size=args.peak_size)]
    with compilation_cache(), tempfile.TemporaryDirectory() as workdir:
        timers, times, trl_runs, loop_losses = run_rounds(config, args, pairs, workdir, use_trl)
    peaks.append(measure_matmul_peak(size=args.peak_size))
    peak = max(peaks)

    results = {}
    for name, (reference, use_lora) in CONFIGS.items():
        flops = dpo.training_passes(METHOD, reference) * tokens * config.flops_per_token(args.seq)
        timer = timers[name]
        r = {"reference": reference, "lora": use_lora, "flops_per_step": flops,
             "compile_seconds": timer.compile_seconds, "first_loss": timer.losses[0], "last_loss": timer.losses[-1]}
        if name in loop_losses:
            r["loop_first_loss"], r["loop_last_loss"] = loop_losses[name][0], loop_losses[name][-1]
        for comparison in COMPARISONS:
            sides = {side: summary(rounds, tokens, flops, peak)
                     for side, rounds in times[name][comparison].items() if rounds}
            if "trl" in sides and "flaxalign" in sides:
                sides["ratio"] = sides["trl"]["seconds"] / sides["flaxalign"]["seconds"]  # = tokens/s ratio
            if sides:
                r[comparison] = sides
        if trl_runs[name]:
            best_run = min(trl_runs[name], key=lambda run: run["in_step"])
            r.update(trl_first_loss=best_run["losses"][0], trl_last_loss=best_run["losses"][-1],
                     trl_trainable_params=best_run["trainable_params"], trl_threads=best_run["threads"],
                     trl_optimizer=best_run["optimizer"], trl_gradient_checkpointing=best_run["gradient_checkpointing"],
                     speed_ratio_vs_trl=r["in_step"]["ratio"])
            if "ratio" in r.get("end_to_end", {}):
                r["speed_ratio_vs_trl_end_to_end"] = r["end_to_end"]["ratio"]
        results[name] = r

    result = {"preset": args.preset, "pairs": args.pairs, "seq": args.seq, "steps": args.steps,
              "rounds": args.rounds, "tokens_per_step": tokens, "params": config.num_params(),
              "loss_type": METHOD.loss_type, "beta": METHOD.beta, "matmul_peak_flops": peak, "matmul_peaks": peaks,
              "device": jax.devices()[0].device_kind, "trl": use_trl, "end_to_end": not args.no_end_to_end,
              "configs": results}
    print_report(result, config, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_report(result, config, args):
    print(f"DPO (sigmoid, β={METHOD.beta}) train step, preset {args.preset} ({config.num_params() / 1e6:.1f}M "
          f"params), {args.pairs} pairs × seq {args.seq} = {result['tokens_per_step']} tokens/step, {args.dtype}, on "
          f"{result['device']}; mean s/step of {args.steps} steps, best of {args.rounds} rounds")
    peaks = result["matmul_peaks"]
    print(f"  matmul peak             {result['matmul_peak_flops']:8.3g} FLOP/s  (measured: "
          f"{', '.join(f'{p:.3g}' for p in peaks)})")
    labels = {"full": "full fine-tuning, reference = frozen copy",
              "lora": f"LoRA r={LORA_RANK} α={LORA_ALPHA:g} all-linear, reference = adapter-off base"}
    sides = {"flaxalign": "flaxalign", "trl": "TRL DPOTrainer"}
    for index, (name, r) in enumerate(result["configs"].items()):
        print(f"  ({'ab'[index]}) {labels[name]}")
        print(f"    FLOPs/step              {r['flops_per_step']:8.3g}   (training_passes × 2·pairs·seq × "
              f"flops_per_token)")
        print(f"    flaxalign compile       {r['compile_seconds']:8.2f} s")
        losses = {("in_step", "flaxalign"): ("first_loss", "last_loss"),
                  ("end_to_end", "flaxalign"): ("loop_first_loss", "loop_last_loss"),
                  ("in_step", "trl"): ("trl_first_loss", "trl_last_loss")}
        for comparison, title in COMPARISONS.items():
            for side, label in sides.items():
                s = r.get(comparison, {}).get(side)
                if s is None:
                    continue
                first, last = losses.get((comparison, side), (None, None))
                loss = f"   loss {r[first]:.4f} → {r[last]:.4f}" if first in r else ""
                print(f"    {title if side == 'flaxalign' else '':11} {label:14} {s['seconds'] * 1e3:8.1f} ms  "
                      f"(median {s['seconds_median'] * 1e3:7.1f})  {s['tokens_per_sec']:6,.0f} tokens/s   "
                      f"MFU {100 * s['mfu']:5.1f} %{loss}")
        if "speed_ratio_vs_trl" in r:
            end_to_end = (f"end-to-end {r['speed_ratio_vs_trl_end_to_end']:.2f} ×, "
                          if "speed_ratio_vs_trl_end_to_end" in r else "")
            print(f"    flaxalign / TRL         {r['speed_ratio_vs_trl']:8.2f} ×  in-step   ({end_to_end}"
                  f"tokens/s ratios; target ≥ 2)")
    if not result["trl"]:
        print("  TRL                     " + ("skipped (--no_trl)" if args.no_trl else
                                              "not importable: no ratio (pip install torch trl peft datasets)"))


if __name__ == "__main__":
    main()

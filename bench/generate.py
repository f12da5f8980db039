"""Rollout speed: seconds and generated tokens/s of sampling `--new_tokens` tokens after a batch of left-padded prompts,
for flaxalign's KV-cache sampler (`flaxalign.sampler.generate`, compiled with the engine's
`decoding_compiler_options` as `KVCacheSampler` does), its no-cache reference that recomputes the whole
prefix for every token (`generate_recompute`), and Hugging Face transformers' `model.generate` on the same weights
when torch and transformers are importable.

    python bench/generate.py                         # `tiny` preset, 8 prompts of ≤ 32 tokens, 128 new tokens
    python bench/generate.py --preset=small
    python bench/generate.py --preset=tiny --batch=2 --prompt_len=8 --new_tokens=8 --rounds=1 --no_torch

Setup: random-init float32 weights (`models.init_params`, seed 0); prompts of random words (ids 2..V-1) with random
lengths in [prompt_len/2, prompt_len], left-padded to `prompt_len` with `left_pad_prompts`. Sampling is plain
temperature 1 (no top-k, no top-p). EOS is id −1, which is never sampled, so every row of every configuration
generates exactly `new_tokens` tokens: tokens per call = batch × new_tokens.

HF side: a `transformers.LlamaForCausalLM` with the shapes of the flaxalign config, loaded with the same weights
through `flaxalign.interop.hf.params_to_hf_state_dict` (strict), float32, PyTorch eager (no torch.compile), SDPA
attention (the transformers default), `use_cache=True`, `do_sample=True, temperature=1.0, top_k=0` and
`min_new_tokens = max_new_tokens = new_tokens`; the model has no EOS id (`eos_token_id=None`), so it too generates
exactly `new_tokens` tokens per row. The bench checks that both models compute one function (max |Δ logits| on the
prompts) and counts the rows where HF's greedy output equals flaxalign's (reported, not asserted: float32 rounding
may flip a near-tie).

Correctness, cheaply, on the bench shapes: greedy (temperature 0) KV-cache output equals the recompute output token
for token (asserted); the timed temperature-1 calls with the same rng are compared too (reported).

"Compile / first call" is the wall time of the first call: tracing + XLA compilation + one run for flaxalign, one
warm-up run for HF. Steady state: each round calls each sampler until `--min_seconds` have passed (at least once)
and takes seconds per call; rounds alternate KV, recompute, HF, `--rounds` times, and the best round of each is
reported, since this CPU's speed swings between minutes. On `small` one recompute call takes ~50 s on 2 cores:
`--recompute_rounds=1` times it in the first round only.

HF is timed with 1 torch thread and with all CPUs, and the faster is the ratio's baseline: on a busy 2-core machine
torch's OpenMP threads, which synchronise after every small op, can make a 2-thread `generate` 10–100× slower than
1 thread (seen here while other jobs ran), and 1 thread is then the fair baseline.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from flaxalign import models
from flaxalign.data.batching import left_pad_prompts
from flaxalign.sampler import decoding_compiler_options, generate, generate_recompute

PAD_ID = 0
EOS_ID = -1  # never sampled: no row stops early
FIRST_WORD = 2  # prompt tokens are drawn from [FIRST_WORD, vocab_size)
LABELS = {"kv": "flaxalign KV cache", "recompute": "flaxalign recompute"}


def label(name):
    if name.startswith("hf_threads"):
        n = int(name[len("hf_threads"):])
        return f"HF generate, {n} thread{'s' * (n > 1)}"
    return LABELS[name]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="prompts per call")
    p.add_argument("--prompt_len", type=int, default=32, help="padded prompt length (prompts have L/2..L tokens)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens sampled per prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recompute_rounds", type=int, default=0,
                   help="rounds that time the recompute sampler (0: --rounds); its calls are long on `small`")
    p.add_argument("--min_seconds", type=float, default=1.0,
                   help="each round repeats a sampler until this much time has passed (at least one call)")
    p.add_argument("--torch_threads", default="",
                   help="comma-separated torch thread counts to time HF with (default: 1 and all CPUs); the best "
                        "is the HF number of the ratio")
    p.add_argument("--no_torch", action="store_true", help="time flaxalign only (does not import torch)")
    p.add_argument("--json", default="", help="also write the results to this file")
    return p.parse_args(argv)


def make_prompts(vocab_size, batch, prompt_len, seed=0):
    """Left-padded `[batch, prompt_len]` prompts of random words; row 0 has the full length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch)
    lengths[0] = prompt_len
    ids = [[int(t) for t in rng.integers(FIRST_WORD, vocab_size, size=n)] for n in lengths]
    return left_pad_prompts(ids, pad_id=PAD_ID, length=prompt_len)


def time_calls(call, min_seconds):
    """Seconds per call of `call(i)` (blocking), repeated until `min_seconds` have passed."""
    calls, start = 0, time.perf_counter()
    while True:
        call(calls)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


class FlaxalignSampler:
    """One jitted sampler (`generate` or `generate_recompute`) at fixed shapes and settings."""

    def __init__(self, fn, graphdef, params, prompts, new_tokens, temperature, compiler_options=None):
        self.params, self.prompts = params, prompts
        settings = dict(max_new_tokens=new_tokens, eos_id=EOS_ID, pad_id=PAD_ID, temperature=temperature, top_k=0,
                        top_p=1.0)
        self.run = jax.jit(lambda params, prompts, rng: fn(models.merge(graphdef, params), prompts, rng, **settings),
                           compiler_options=compiler_options)
        start = time.perf_counter()
        self.first = self(0)
        self.compile_seconds = time.perf_counter() - start

    def __call__(self, seed):
        out = self.run(self.params, self.prompts, jax.random.PRNGKey(seed))
        return jax.device_get(jax.block_until_ready(out))


# --------------------------------------------------------------------------------------------------------------
# Hugging Face (imported only when used: `--no_torch` never imports torch)


def torch_available():
    """Whether the HF side can run (checked without importing torch)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def hf_model(config, params):
    """A float32 eval `transformers.LlamaForCausalLM` holding flaxalign's `params` (loaded strictly)."""
    import torch
    import transformers

    from flaxalign.interop import hf

    if config.qkv_bias or config.rope_scaling_factor:
        raise ValueError("the HF comparison supports plain Llama presets (no qkv_bias, no RoPE scaling).")
    hf_config = transformers.LlamaConfig(
        hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        vocab_size=config.vocab_size, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings, pad_token_id=PAD_ID,
        bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf.params_to_hf_state_dict(config, params).items()}
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model


class HFSampler:
    """`model.generate` at the bench's shapes; returns the `[B, N]` generated tokens as numpy."""

    def __init__(self, model, prompts, new_tokens, do_sample=True, threads=None):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        self.torch, self.model, self.threads = torch, model, threads or os.cpu_count()
        self.input_ids = torch.from_numpy(np.asarray(prompts["input_ids"], np.int64))
        self.attention_mask = torch.from_numpy(np.asarray(prompts["attention_mask"], np.int64))
        self.new_tokens, self.do_sample = new_tokens, do_sample
        start = time.perf_counter()
        self.first = self(0)
        self.compile_seconds = time.perf_counter() - start

    def __call__(self, seed):
        torch = self.torch
        torch.set_num_threads(self.threads)
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if self.do_sample else \
            dict(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(self.input_ids, attention_mask=self.attention_mask,
                                      max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                      pad_token_id=PAD_ID, use_cache=True, **sampling)
        prompt_len = self.input_ids.shape[1]
        if tuple(out.shape) != (self.input_ids.shape[0], prompt_len + self.new_tokens):
            raise RuntimeError(f"HF generated shape {tuple(out.shape)}, expected "
                               f"{(self.input_ids.shape[0], prompt_len + self.new_tokens)}.")
        return out[:, prompt_len:].numpy()


def hf_logits_difference(model, graphdef, params, prompts):
    """max |flaxalign logits − HF logits| over the real prompt tokens (both float32)."""
    import torch

    mask = np.asarray(prompts["attention_mask"])
    ours = np.asarray(models.merge(graphdef, params).logits(prompts["input_ids"], prompts["positions"], mask))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(np.asarray(prompts["input_ids"], np.int64)),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(np.asarray(prompts["positions"], np.int64))).logits.numpy()
    real = mask.astype(bool)
    return float(np.abs(ours[real] - theirs[real]).max()), float(np.abs(theirs[real]).max())


# --------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    config = models.ModelConfig.from_dict({**models.preset(args.preset), "dtype": "float32"})
    if args.prompt_len + args.new_tokens > config.max_seq_len:
        raise ValueError(f"--prompt_len + --new_tokens = {args.prompt_len + args.new_tokens} exceeds the preset's "
                         f"max_seq_len={config.max_seq_len}.")
    tokens_per_call = args.batch * args.new_tokens
    graphdef = models.abstract_model(config)[0]
    params = models.init_params(config, seed=0)
    prompts = make_prompts(config.vocab_size, args.batch, args.prompt_len)
    use_torch = not args.no_torch and torch_available()

    # correctness first: greedy KV == greedy recompute, token for token, on the bench shapes
    greedy = {name: FlaxalignSampler(fn, graphdef, params, prompts, args.new_tokens, 0.0, options).first
              for name, fn, options in (("kv", generate, decoding_compiler_options(config)),
                                        ("recompute", generate_recompute, None))}
    for out in greedy.values():
        assert int(out["response_mask"].sum()) == tokens_per_call, "a row stopped before new_tokens tokens"
    np.testing.assert_array_equal(greedy["kv"]["tokens"], greedy["recompute"]["tokens"],
                                  err_msg="greedy KV-cache output differs from the recompute output")

    kv_options = decoding_compiler_options(config)  # what `KVCacheSampler`, the engine, compiles `generate` with
    samplers = {"kv": FlaxalignSampler(generate, graphdef, params, prompts, args.new_tokens, 1.0, kv_options),
                "recompute": FlaxalignSampler(generate_recompute, graphdef, params, prompts, args.new_tokens, 1.0)}
    hf_check = {}
    if use_torch:
        threads = sorted({int(t) for t in args.torch_threads.split(",") if t} or {1, os.cpu_count()})
        model = hf_model(config, jax.device_get(params))
        diff, scale = hf_logits_difference(model, graphdef, params, prompts)
        hf_greedy = HFSampler(model, prompts, args.new_tokens, do_sample=False).first
        rows_equal = int((hf_greedy == greedy["kv"]["response"]).all(axis=1).sum())
        hf_check = {"hf_max_abs_logits_diff": diff, "hf_max_abs_logit": scale, "greedy_kv_equals_hf_rows": rows_equal}
        for n in threads:
            samplers[f"hf_threads{n}"] = HFSampler(model, prompts, args.new_tokens, threads=n)
    for out in (samplers["kv"].first, samplers["recompute"].first):
        assert int(out["response_mask"].sum()) == tokens_per_call, "a row stopped before new_tokens tokens"
    sampled_equal = bool((samplers["kv"].first["tokens"] == samplers["recompute"].first["tokens"]).all())

    times = {name: [] for name in samplers}
    recompute_rounds = min(args.recompute_rounds or args.rounds, args.rounds)
    for round_ in range(args.rounds):
        for name, sampler in samplers.items():
            if name != "recompute" or round_ < recompute_rounds:
                times[name].append(time_calls(sampler, args.min_seconds))

    configs = {}
    for name, sampler in samplers.items():
        best = min(times[name])
        configs[name] = {"compile_seconds": sampler.compile_seconds, "seconds_per_call": best,
                         "seconds_per_call_median": statistics.median(times[name]),
                         "seconds_per_call_rounds": times[name], "tokens_per_sec": tokens_per_call / best}
    ratios = {"kv_vs_recompute": configs["recompute"]["seconds_per_call"] / configs["kv"]["seconds_per_call"]}
    hf_names = [name for name in configs if name.startswith("hf_")]
    hf_best = min(hf_names, key=lambda name: configs[name]["seconds_per_call"]) if hf_names else None
    if hf_best:
        ratios["kv_vs_hf"] = configs[hf_best]["seconds_per_call"] / configs["kv"]["seconds_per_call"]
    result = {"preset": args.preset, "params": config.num_params(), "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "tokens_per_call": tokens_per_call, "rounds": args.rounds,
              "recompute_rounds": recompute_rounds,
              "min_seconds": args.min_seconds, "device": jax.devices()[0].device_kind, "torch": use_torch,
              "greedy_kv_equals_recompute": True, "sampled_kv_equals_recompute": sampled_equal,
              **hf_check, "hf_best": hf_best, "configs": configs, "ratios": ratios}

    print(f"Rollout: {args.batch} prompts (left-padded to {args.prompt_len}) × {args.new_tokens} new tokens = "
          f"{tokens_per_call} tokens/call, preset {args.preset} ({config.num_params() / 1e6:.2f}M params), float32, "
          f"temperature 1, on {result['device']}")
    print(f"  {'':26s} {'compile/1st call':>16s} {'s/call (best)':>14s} {'(median)':>10s} {'tokens/s':>10s}")
    for name, r in configs.items():
        print(f"  {label(name):26s} {r['compile_seconds']:14.2f} s {r['seconds_per_call']:12.4f} s "
              f"{r['seconds_per_call_median']:10.4f} {r['tokens_per_sec']:10,.0f}")
    print(f"  KV / recompute            {ratios['kv_vs_recompute']:8.2f} ×  (tokens/s ratio; target ≥ 10)")
    if "kv_vs_hf" in ratios:
        print(f"  KV / HF                   {ratios['kv_vs_hf']:8.2f} ×  (vs the fastest HF row; target ≥ 1.5)")
    print("  greedy KV == recompute: yes")
    print(f"  sampled (T=1, same rng) KV == recompute: {'yes' if sampled_equal else 'no'}")
    if hf_check:
        print(f"  HF logits vs flaxalign: max |Δ| {hf_check['hf_max_abs_logits_diff']:.2e} (max |logit| "
              f"{hf_check['hf_max_abs_logit']:.2f}); greedy rows equal to flaxalign KV: "
              f"{hf_check['greedy_kv_equals_hf_rows']}/{args.batch}")
    else:
        print("  HF transformers           " + ("skipped (--no_torch)" if args.no_torch else
                                               "not importable: no ratio (pip install torch transformers)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

"""KV-cache sampling speed of this checkout against another checkout of flaxalign, in the same run (before/after a
change to the sampler or the model's decode path).

    python bench/generate_ab.py --baseline_tree=/tmp/flaxalign_before                      # small, 8 × 128 tokens
    python bench/generate_ab.py --baseline_tree=/tmp/before --preset=tiny --batch=64 --new_tokens=480

Each tree runs in its own process (`PYTHONPATH` = the tree): random-init float32 weights of the preset, 8 (--batch)
left-padded prompts of ≤ 32 tokens as in `bench/generate.py`, sampling at T = 1 with `sampler.generate`, the best of
`--calls` timed calls after the compile. Trees alternate for `--rounds` rounds and the best round of each is
reported, since this CPU's speed swings between minutes. No recompute or HF rows: `bench/generate.py` has those.
"""

import argparse
import json
import os
import subprocess
import sys

from ab_rounds import best_of_rounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    """Runs in the tree under test: prints one JSON line of timings."""
    import time

    import jax

    import flaxalign
    from flaxalign import models
    if not os.path.abspath(flaxalign.__file__).startswith(os.getcwd() + os.sep):
        raise SystemExit(f"bench: imported {flaxalign.__file__}, not the flaxalign of {os.getcwd()}")
    from flaxalign import sampler
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from generate import EOS_ID, PAD_ID, make_prompts  # this checkout's, so both trees sample alike

    config = models.ModelConfig.from_dict({**models.preset(args.preset), "dtype": "float32",
                                           "max_seq_len": args.prompt_len + args.new_tokens})
    graphdef = models.abstract_model(config)[0]
    params = models.init_params(config, seed=0)
    prompts = make_prompts(config.vocab_size, args.batch, args.prompt_len)
    # the engine's compiler options where the tree has them (`KVCacheSampler` jits `generate` with them)
    options = getattr(sampler, "decoding_compiler_options", lambda config: None)(config)
    run = jax.jit(lambda p, batch, rng: sampler.generate(models.merge(graphdef, p), batch, rng,
                                                         max_new_tokens=args.new_tokens, eos_id=EOS_ID, pad_id=PAD_ID,
                                                         temperature=1.0), compiler_options=options)
    start = time.perf_counter()
    first = jax.device_get(run(params, prompts, jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.calls):
        start = time.perf_counter()
        jax.block_until_ready(run(params, prompts, jax.random.PRNGKey(i)))
        times.append(time.perf_counter() - start)
    tokens = int(first["response_mask"].sum())
    if tokens != args.batch * args.new_tokens:  # EOS_ID is never drawn: every call samples the same count
        raise SystemExit(f"bench: a row stopped early ({tokens} of {args.batch * args.new_tokens} tokens)")
    print(json.dumps({"compile_s": compile_s, "seconds_per_call": min(times), "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline_tree", required=True, help="another flaxalign checkout")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    trees = {"this tree": REPO, "baseline": os.path.abspath(args.baseline_tree)}
    flags = [f"--{k}={getattr(args, k)}" for k in ("preset", "batch", "prompt_len", "new_tokens", "calls")]

    def run(name, tree, round_):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": tree}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline_tree=.", "--child", *flags],
                              cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bench: the run in {tree} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    best = best_of_rounds(trees, args.rounds, run, "seconds_per_call")
    print(f"KV-cache sampling, {args.preset}: {args.batch} prompts of ≤ {args.prompt_len} tokens × {args.new_tokens} "
          f"new tokens, T = 1, best of {args.calls} calls × {args.rounds} rounds, 1 CPU device")
    for name, r in best.items():
        print(f"  {name:<10} {r['seconds_per_call']:.3f} s/call  {r['tokens'] / r['seconds_per_call']:>9,.0f} tokens/s"
              f"  (compile + first call {r['compile_s']:.1f} s)")
    speedup = best["baseline"]["seconds_per_call"] / best["this tree"]["seconds_per_call"]
    print(f"  this tree vs baseline: {speedup:.2f}× tokens/s")
    print(json.dumps(best))


if __name__ == "__main__":
    main()

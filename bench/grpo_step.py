"""GRPO seconds per step (rollout + rewards + update) of `configs/grpo.py:tiny`, through the CLI as users run it,
optionally against another checkout of flaxalign in the same run (before/after a change).

    python bench/grpo_step.py                                    # builds its policy: CLM 300 steps → arithmetic SFT
    python bench/grpo_step.py --init_from=checkpoint:runs/sft_math --baseline_tree=/tmp/flaxalign_before

The policy must be able to end its answers (emit EOS) for early stopping to matter, so by default the bench trains
the demo's tiny CLM and then SFT on `builtin:arithmetic_sft` (≈ 2 minutes on 2 cores) in a temporary directory.
Each tree runs `flaxalign train --config=configs/grpo.py:tiny --config.steps=STEPS` from that policy (no evaluation,
no checkpoints, log every step); the step time is the median over the steps after the first (which compiles).
Trees alternate for `--rounds` rounds and the best round of each is reported, since this CPU's speed swings between
minutes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from ab_rounds import best_of_rounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(tree: str, args: list[str]) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": tree}
    done = subprocess.run([sys.executable, "-m", "flaxalign.main", "train", "--cpu_devices=1", *args], cwd=tree,
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench: `flaxalign train {' '.join(args)}` in {tree} failed:\n{done.stderr[-3000:]}")


def policy(workdir: str) -> str:
    """checkpoint:DIR of a tiny arithmetic SFT model (the demo's CLM, then SFT on arithmetic answers)."""
    clm, sft = os.path.join(workdir, "clm"), os.path.join(workdir, "sft")
    train(REPO, ["--config=configs/clm.py:tiny", f"--workdir={clm}"])
    train(REPO, ["--config=configs/sft.py:tiny", f"--workdir={sft}", f"--config.init_from=checkpoint:{clm}",
                 "--config.data.train=builtin:arithmetic_sft", "--config.eval_at_start=False"])
    return f"checkpoint:{sft}"


def grpo_seconds_per_step(tree: str, init_from: str, steps: int, workdir: str) -> dict:
    train(tree, ["--config=configs/grpo.py:tiny", f"--workdir={workdir}", f"--config.init_from={init_from}",
                 f"--config.steps={steps}", "--config.log_every=1", "--config.eval_every=0",
                 "--config.eval_at_start=False", "--config.checkpoint_every=0"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    times = [r["step_time"] for r in rows if "step_time" in r and r["step"] > 1]
    return {"seconds_per_step": statistics.median(times),
            "response_length": statistics.mean(r["response_length"] for r in rows),
            "eos_rate": statistics.mean(r["eos_rate"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init_from", default="", help="the policy (default: trained here, ~2 minutes)")
    parser.add_argument("--baseline_tree", default="", help="another flaxalign checkout to time in the same run")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = {"this tree": REPO, **({"baseline": os.path.abspath(args.baseline_tree)} if args.baseline_tree else {})}
    with tempfile.TemporaryDirectory() as tmp:
        init_from = args.init_from or policy(tmp)
        best = best_of_rounds(trees, args.rounds, lambda name, tree, round_: grpo_seconds_per_step(
            tree, init_from, args.steps, os.path.join(tmp, f"{name}_{round_}")), "seconds_per_step")
    print(f"GRPO tiny (configs/grpo.py:tiny: 16 prompts × 16 samples, ≤ 12 new tokens), {args.steps} steps, "
          f"best of {args.rounds} rounds, 1 CPU device")
    for name, result in best.items():
        print(f"  {name:<10} {result['seconds_per_step']:.3f} s/step  (mean response {result['response_length']:.1f}"
              f" tokens, EOS rate {result['eos_rate']:.2f})")
    if "baseline" in best:
        change = best["this tree"]["seconds_per_step"] / best["baseline"]["seconds_per_step"] - 1
        print(f"  this tree vs baseline: {100 * change:+.1f}% seconds per step")
    print(json.dumps(best))


if __name__ == "__main__":
    main()

"""`flaxalign pipeline --config=configs/pipeline.py:tiny --workdir=W [--seeds=N]`: the whole adaptation pipeline.

    tokenizer + CLM pretraining → SFT → reward model (the proxy that PPO optimises) and a gold reward model (trained
    on other pairs, only to judge) → the `methods` (e.g. PPO, DPO, GRPO; all from the SFT checkpoint, one run per
    seed) → evaluation of base (CLM), SFT and every policy against SFT → W/report.md with plots and the methods table

Every stage is a `flaxalign train` (or `eval`) subprocess with its own run directory under W, its log in W/logs/, and
its `run_summary.json` (wall-clock, FLOPs, peak memory) written when it ends. A re-run skips every stage whose
summary says it finished and resumes an unfinished one from its latest checkpoint (the training loop's automatic
resume), so a killed pipeline loses at most the steps since that stage's last checkpoint.
"""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import ml_collections

from flaxalign import errors
from flaxalign.pipeline_report import write_pipeline_report
from flaxalign.train import report

EVAL_FILE = "eval.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # its run directory under the pipeline's workdir
    command: str  # "train" or "eval"
    config: str  # configs/FILE.py:PRESET
    args: tuple[str, ...]  # --config.* overrides and flags


def methods(pcfg) -> list[str]:
    """The policy-optimisation stages of `pcfg.methods` ("ppo,dpo,grpo"), each a stage block of the config."""
    names = [name.strip() for name in str(pcfg.methods).split(",") if name.strip()]
    for name in names:
        block = pcfg.get(name)
        # a method block is a stage block that says whether it trains against the reward model
        if not isinstance(block, ml_collections.ConfigDict) or "reward_model" not in block:
            raise errors.ConfigError(f"methods={pcfg.methods!r}: {name!r} is not a method block of the pipeline "
                                     "config (e.g. ppo, dpo, grpo).")
        if block.reward_model and not pcfg.reward.config:
            raise errors.ConfigError(f"methods={pcfg.methods!r}: {name} trains against the reward model, but "
                                     "reward.config is empty (no reward model); leave it out of methods.")
    if len(set(names)) != len(names) or not names:
        raise errors.ConfigError(f"methods={pcfg.methods!r} must name each method once, and at least one.")
    return names


def plan(pcfg, workdir: str, seeds: int) -> list[Stage]:
    """The stages in order. Method runs of seed s use `--config.seed=s`; everything before them runs once."""
    def run(name):
        return f"checkpoint:{os.path.join(workdir, name)}"

    def stage(name, block, *extra, command="train"):
        return Stage(name, command, block.config, tuple(shlex.split(block.args)) + extra)

    judges = reward_models(pcfg)
    base = base_name(pcfg)
    if base == "clm" and not pcfg.clm.config:
        raise errors.ConfigError("base is empty and clm.config is empty: set base (pretrained weights: gguf:FILE, "
                                 "hf:DIR, checkpoint:DIR) or a CLM stage config to start from.")
    stages = [stage("clm", pcfg.clm)] if base == "clm" else []
    stages.append(stage("sft", pcfg.sft, f"--config.init_from={pcfg.base or run('clm')}"))
    stages += [stage(judge, pcfg[judge], f"--config.init_from={run('sft')}") for judge in judges]
    policies = []
    names = methods(pcfg)
    for seed in range(seeds):
        for method in names:
            block = pcfg[method]
            reward = (f"--config.reward_from={run('reward')}",) if block.reward_model else ()
            policies.append(f"{method}_s{seed}")
            stages.append(stage(policies[-1], block, f"--config.init_from={run('sft')}", *reward,
                                f"--config.seed={seed}"))
    judged = [f"--config.{judge}_from={run(judge)}" for judge in judges]
    for policy in [base, "sft"] + policies:
        checkpoint = pcfg.base if policy == "base" else os.path.join(workdir, policy)
        stages.append(stage(f"eval/{policy}", pcfg.eval, f"--checkpoint={checkpoint}",
                            f"--config.reference={run('sft')}", *judged, command="eval"))
    return stages


def reward_models(pcfg) -> list[str]:
    """The reward-model stages the pipeline trains: "reward" (the proxy) and "gold_reward", each unless its
    config is empty."""
    return [judge for judge in ("reward", "gold_reward") if pcfg[judge].config]


def base_name(pcfg) -> str:
    """"clm" when the pipeline pretrains its base model, "base" when it starts from `pcfg.base` (pretrained
    weights); the base model's evaluation is eval/NAME."""
    return "base" if pcfg.base else "clm"


def is_finished(stage: Stage, workdir: str) -> bool:
    run_dir = os.path.join(workdir, stage.name)
    if stage.command == "eval":
        return os.path.exists(os.path.join(run_dir, EVAL_FILE))
    summary = report.read_summary(run_dir)
    return bool(summary and summary.get("finished"))


def run_stage(stage: Stage, workdir: str, cpu_devices: int) -> float:
    """Runs one stage as a subprocess (output to W/logs/NAME.log); returns its wall-clock seconds. A failing stage
    raises `FlaxalignError` with the last line of its log."""
    run_dir = os.path.join(workdir, stage.name)
    log_path = os.path.join(workdir, "logs", stage.name.replace("/", "_") + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, "-m", "flaxalign.main", stage.command, f"--config={stage.config}",
           f"--workdir={run_dir}", *stage.args]
    if cpu_devices:
        cmd.append(f"--cpu_devices={cpu_devices}")
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=stage_env(workdir))
        # SIGTERM to the pipeline reaches the running stage, which checkpoints and exits (the loop's preemption path)
        previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            rc = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        raise errors.FlaxalignError(f"pipeline stage {stage.name} failed (exit {rc}): {_last_line(log_path)} "
                                    f"(log: {log_path}).")
    if not is_finished(stage, workdir):
        raise errors.FlaxalignError(f"pipeline stage {stage.name} stopped before its last step (preempted); run the "
                                    "same command again to resume it.")
    return time.time() - started


def stage_env(workdir: str) -> dict:
    """The stages' environment: a persistent XLA compilation cache under W (unless the caller chose one), so that
    the seeds of a method and the evaluations, which compile the same programs, read them from disk after the first
    compile (a cached program is the one a fresh compile gives)."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_pipeline(pcfg, workdir: str, seeds: int | None = None) -> str:
    """Runs (or resumes) every stage, then writes W/report.md; returns the report path."""
    seeds = int(seeds or pcfg.seeds)
    if seeds < 1:
        raise errors.ConfigError(f"--seeds must be at least 1, not {seeds}.")
    os.makedirs(workdir, exist_ok=True)
    stages = plan(pcfg, os.path.abspath(workdir), seeds)
    if pcfg.stop_after:
        names = [stage.name for stage in stages]
        if pcfg.stop_after not in names:
            raise errors.ConfigError(f"stop_after={pcfg.stop_after!r} is not a stage; stages: {names}.")
        stages = stages[:names.index(pcfg.stop_after) + 1]
    names = methods(pcfg)
    with open(os.path.join(workdir, "pipeline.json"), "w") as f:
        json.dump({"seeds": seeds, "methods": names, "stages": [dataclasses.asdict(s) for s in stages]}, f, indent=2)
    for i, stage in enumerate(stages, 1):
        if is_finished(stage, workdir):
            print(f"pipeline [{i}/{len(stages)}] {stage.name}: done earlier (skipped)", flush=True)
            continue
        print(f"pipeline [{i}/{len(stages)}] {stage.name}: {stage.command} {stage.config} …", flush=True)
        seconds = run_stage(stage, workdir, int(pcfg.cpu_devices))
        print(f"pipeline [{i}/{len(stages)}] {stage.name}: {seconds:.0f} s", flush=True)
    if pcfg.stop_after:
        return ""
    return write_pipeline_report(workdir, seeds, names, judges=reward_models(pcfg), base=base_name(pcfg))

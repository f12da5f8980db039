"""Blockwise vs dense attention in the CLM train step: step time and the compiled step's memory, same process.

    python bench/attention.py                             # small: seq 1024 × batch 2 (timed), seq 4096 (memory)
    python bench/attention.py --seqs=1024,2048 --batch=2 --rounds=3

For each sequence length both implementations (`model.attention` = blockwise / xla) build the same `small` CLM
step; XLA's `memory_analysis()` of each compiled step gives the peak estimate (arguments + outputs − aliased +
temporaries), and the steps are timed in turns (one step of each per round, the best of each reported: this CPU
drifts by up to 2× over minutes). Lengths at or above `--memory_only_from` are compiled but not timed.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.clm_step import optim_config, random_batch  # noqa: E402
from flaxalign import models, sharding  # noqa: E402
from flaxalign.policy import TrainableModel  # noqa: E402
from flaxalign.stages import clm  # noqa: E402
from flaxalign.train import loop  # noqa: E402
from flaxalign.train.checkpoint import Checkpointer  # noqa: E402
from flaxalign.train.jit import CompiledStep  # noqa: E402

IMPLS = ("blockwise", "xla")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seqs", default="1024,4096")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory_only_from", type=int, default=4096)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


class Step:
    """One implementation's compiled CLM step and state at one length."""

    def __init__(self, impl, seq, args, mesh, workdir):
        config = models.ModelConfig.from_dict({**models.preset(args.preset), "dtype": "float32", "attention": impl,
                                               "max_seq_len": max(seq, models.preset(args.preset)["max_seq_len"])})
        task = clm.make_task(TrainableModel(config), optim_config(100), chunk_size=256)
        self.state, shardings, _ = loop.initial_state(task, 0, mesh, Checkpointer(os.path.join(workdir, impl)))
        self.batch = sharding.global_batch(random_batch(config, args.batch, seq), mesh)
        self.mesh = mesh
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            self.compiled = CompiledStep(task.train_step, mesh, shardings)._jitted.lower(
                self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - start
        m = self.compiled.memory_analysis()
        self.peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        self.times = []

    def time_one(self):
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state.params, metrics))
        self.times.append(time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for seq in (int(s) for s in args.seqs.split(",")):
            steps = {impl: Step(impl, seq, args, mesh, os.path.join(workdir, str(seq))) for impl in IMPLS}
            timed = seq < args.memory_only_from
            for _ in range(args.rounds if timed else 0):
                for step in steps.values():
                    step.time_one()
            row = {"seq": seq, "batch": args.batch}
            for impl, step in steps.items():
                row[impl] = {"peak_bytes": step.peak, "compile_seconds": step.compile_seconds,
                             "step_seconds": min(step.times) if step.times else None}
            row["peak_ratio"] = row["blockwise"]["peak_bytes"] / row["xla"]["peak_bytes"]
            if timed:
                row["step_time_ratio"] = row["blockwise"]["step_seconds"] / row["xla"]["step_seconds"]
            rows.append(row)
            del steps
    print(f"CLM train step, preset {args.preset}, float32, {jax.devices()[0].device_kind}: blockwise vs dense (xla) "
          "attention")
    for row in rows:
        b, x = row["blockwise"], row["xla"]
        line = (f"  seq {row['seq']:>5} × {row['batch']}: peak {b['peak_bytes'] / 2**20:,.0f} vs "
                f"{x['peak_bytes'] / 2**20:,.0f} MiB ({100 * row['peak_ratio']:.0f} %)")
        if "step_time_ratio" in row:
            line += (f", step {b['step_seconds'] * 1e3:,.0f} vs {x['step_seconds'] * 1e3:,.0f} ms "
                     f"({row['step_time_ratio']:.2f}×)")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

"""Times the CLM train step and reports tokens/s and MFU against a matmul peak measured in this process, and the
speed ratio to the same model in PyTorch (float32, AdamW) when torch is importable — eager and under
`torch.compile` (the whole training step), both built in this process and timed in the same rounds.

    python bench/clm_step.py                      # `small` preset: 6 layers, d=512, 8 heads, seq 256, batch 8
    python bench/clm_step.py --preset=tiny --steps=20

This CPU's speed swings up to 2× between minutes, so the peak is measured right before and right after the model
timing, and the flaxalign and torch timings alternate in rounds; the best round of each is reported.
`--attention` picks flaxalign's attention (default: the model default, blockwise on CPU; `xla` = the dense one).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from flaxalign import models, sharding  # noqa: E402
from flaxalign.policy import TrainableModel  # noqa: E402
from flaxalign.stages import clm  # noqa: E402
from flaxalign.train import loop  # noqa: E402
from flaxalign.train.checkpoint import Checkpointer  # noqa: E402
from flaxalign.train.jit import CompiledStep  # noqa: E402
from flaxalign.train.mfu import measure_matmul_peak  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default="auto")
    p.add_argument("--remat", default=models.ModelConfig.remat, help="model.remat (default: the model default)")
    p.add_argument("--loss_chunk", type=int, default=256)
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--json", default="", help="also write the results to this file")
    return p.parse_args()


def optim_config(steps):
    return ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, total_steps=steps, schedule="constant",
                                          final_lr_fraction=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                          clip_norm=1.0))


def random_batch(config, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.float32)}


class FlaxalignTimer:
    def __init__(self, config, args, workdir):
        self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        task = clm.make_task(TrainableModel(config), optim_config(args.steps), chunk_size=args.loss_chunk)
        self.state, shardings, _ = loop.initial_state(task, 0, self.mesh, Checkpointer(workdir))
        self.step = CompiledStep(task.train_step, self.mesh, shardings)
        self.batch = sharding.global_batch(random_batch(config, args.batch, args.seq), self.mesh)
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        self.compile_seconds = time.perf_counter() - start

    def seconds_per_step(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state.params, metrics))
        return (time.perf_counter() - start) / steps


def main():
    args = parse_args()
    config = models.ModelConfig.from_dict({**models.preset(args.preset), "dtype": args.dtype,
                                           "attention": args.attention, "remat": args.remat})
    tokens = args.batch * args.seq
    flops_per_step = tokens * config.flops_per_token(args.seq)
    peak_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peaks = [measure_matmul_peak(peak_dtype, size=2048)]

    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
        timer = FlaxalignTimer(config, args, workdir)
        references = {}
        if not args.no_torch:
            try:
                from bench import torch_reference as torch_ref
            except ImportError:
                torch_ref = None
            if torch_ref is not None:
                references["eager"] = torch_ref.TorchTrainer(config, args.batch, args.seq)
                if not args.no_compile:
                    references["compile"] = torch_ref.TorchTrainer(config, args.batch, args.seq, compiled=True)
        jax_times, torch_times = [], {name: [] for name in references}
        for _ in range(args.rounds):
            jax_times.append(timer.seconds_per_step(args.steps))
            for name, trainer in references.items():
                torch_times[name].append(trainer.seconds_per_step(args.steps))
    peaks.append(measure_matmul_peak(peak_dtype, size=2048))

    peak = max(peaks)
    best = min(jax_times)
    result = {
        "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
        "params": config.num_params(), "flops_per_step": flops_per_step, "compile_seconds": timer.compile_seconds,
        "step_seconds": best, "step_seconds_median": statistics.median(jax_times), "tokens_per_sec": tokens / best,
        "achieved_flops": flops_per_step / best, "matmul_peak_flops": peak, "matmul_peaks": peaks,
        "mfu": flops_per_step / best / peak, "device": jax.devices()[0].device_kind,
    }
    for name, times in torch_times.items():
        prefix = "torch" if name == "eager" else "torch_compile"
        result.update({f"{prefix}_step_seconds": min(times), f"{prefix}_tokens_per_sec": tokens / min(times),
                       f"{prefix}_mfu": flops_per_step / min(times) / peak,
                       f"speed_ratio_vs_{prefix}": min(times) / best})
    if "compile" in references:
        result["torch_compile_seconds"] = references["compile"].compile_seconds
    print(f"CLM train step, preset {args.preset} ({config.num_params() / 1e6:.1f}M params), batch {args.batch} × "
          f"seq {args.seq}, {args.dtype}, on {result['device']}")
    print(f"  compile               {timer.compile_seconds:8.2f} s")
    print(f"  step time (best)      {best * 1e3:8.1f} ms   (median {result['step_seconds_median'] * 1e3:.1f} ms)")
    print(f"  tokens/s              {result['tokens_per_sec']:8,.0f}")
    print(f"  FLOPs/step            {flops_per_step:8.3g}   (6·N·tokens + attention)")
    print(f"  matmul peak           {peak:8.3g} FLOP/s  (measured: {', '.join(f'{p:.3g}' for p in peaks)})")
    print(f"  MFU                   {100 * result['mfu']:8.1f} %")
    for name, prefix, label in (("eager", "torch", "PyTorch eager"), ("compile", "torch_compile", "torch.compile")):
        if name in torch_times:
            print(f"  {label + ' step':<22}{result[f'{prefix}_step_seconds'] * 1e3:8.1f} ms   "
                  f"({result[f'{prefix}_tokens_per_sec']:,.0f} tokens/s, MFU {100 * result[f'{prefix}_mfu']:.1f} %)")
            print(f"  {'flaxalign / ' + label:<22}{result[f'speed_ratio_vs_{prefix}']:8.2f} ×  (tokens/s ratio)")
    if not torch_times:
        print("  PyTorch               not importable: no ratio (pip install torch==2.13.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

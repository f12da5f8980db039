"""The generic training loop: step → log → eval → checkpoint, with automatic resume and SIGTERM handling."""

import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from flaxalign import errors, sharding
from flaxalign.data.prefetch import Prefetcher
from flaxalign.train import mfu, preemption
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledEval, CompiledStep, state_shardings
from flaxalign.train.metrics import MetricsWriter, console_line
from flaxalign.train.state import TrainState, create_state
from flaxalign.train.task import Task

# Fault injection for tests: SIGKILL this process right after the given step (once its checkpoint is durable).
FAULT_KILL_ENV = "FLAXALIGN_FAULT_SIGKILL_AT_STEP"
# ... or right after the given step's checkpoint save was started, while Orbax still writes it in the background.
FAULT_KILL_IN_SAVE_ENV = "FLAXALIGN_FAULT_SIGKILL_DURING_SAVE_AT_STEP"
# ... or send it SIGTERM at that moment (the save must complete and the run stop with exit 0).
FAULT_TERM_IN_SAVE_ENV = "FLAXALIGN_FAULT_SIGTERM_DURING_SAVE_AT_STEP"


@dataclasses.dataclass
class LoopResult:
    final_step: int
    preempted: bool
    last_metrics: dict
    state: TrainState


class _Throughput:
    """Step time, tokens/s and MFU averaged over the steps since the last log row."""

    def __init__(self, task: Task, peak_flops: float):
        self.task, self.peak = task, peak_flops
        self.time, self.step = time.time(), 0

    def reset(self, step: int) -> None:
        self.time, self.step = time.time(), step

    def since_last(self, step: int) -> dict:
        if step <= self.step:
            return {}
        step_time = (time.time() - self.time) / (step - self.step)
        self.reset(step)
        return {"step_time": step_time, "tokens_per_sec": self.task.tokens_per_step / step_time,
                "mfu": self.task.flops_per_step / step_time / self.peak}


def _flat(tree, prefix=""):
    """{"model.d_ff": 192, …}: nested config dicts as dotted keys, so a refusal can name the changed field."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def initial_state(task: Task, seed: int, mesh: Mesh, checkpointer: Checkpointer):
    """A fresh state, or the latest checkpoint restored onto this mesh. Returns (state, shardings, restored_step)."""
    abstract = jax.eval_shape(lambda p, f: create_state(p, task.optimizer, seed, f),
                              task.abstract_params, task.abstract_frozen)
    shardings = state_shardings(abstract, task.params_logical, task.frozen_logical, mesh)
    current = _flat(task.metadata.get("resume_identity") or {})

    def same_run(step: int, meta: dict) -> None:
        saved = _flat(meta.get("resume_identity") or {})
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if changed:
            raise errors.CheckpointError(
                f"the checkpoint at step {step} in {checkpointer.directory} was trained with a different model "
                f"config (changed: {', '.join(changed)}); use a new --workdir or the same model settings.")

    restored = checkpointer.restore_newest_readable(shardings, abstract, same_run)
    if restored is not None:
        state, data_state, _, step = restored
        task.train_data.set_state(data_state)
        return state, shardings, step
    frozen = task.init_frozen(shardings.frozen)
    params = task.init_params(shardings.params, frozen)
    state = jax.jit(lambda p, f: create_state(p, task.optimizer, seed, f), out_shardings=shardings)(params, frozen)
    return state, shardings, None


def describe_state(state: TrainState) -> str:
    """Trained and frozen parameter counts and bytes (a quantized base counts its stored codes and scales) and the
    optimizer state's bytes, all devices together."""

    def size(tree) -> tuple[int, int]:
        leaves = jax.tree.leaves(tree)
        return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)

    (trained, trained_bytes), (frozen, frozen_bytes) = size(state.params), size(state.frozen)
    optimizer_bytes = size(state.opt_state)[1]
    share = 100 * trained / max(trained + frozen, 1)
    return (f"Parameters: {trained:,} trained ({trained_bytes / 2**20:,.2f} MiB, {share:.3g}% of the values held), "
            f"{frozen:,} frozen values ({frozen_bytes / 2**20:,.2f} MiB); optimizer state "
            f"{optimizer_bytes / 2**20:,.2f} MiB")


class _NonfiniteStreak:
    """Counts consecutive steps whose every update was skipped for a non-finite loss or gradient norm (the step's
    `nonfinite` metric is 1). The flag is read one step late — after the next step is dispatched — so the host never
    waits on the device for it; `flush` reads the last one."""

    def __init__(self, limit: int):
        self.limit, self.count, self.first = limit, 0, None
        self._pending = None

    def push(self, step: int, metrics: dict) -> None:
        previous, self._pending = self._pending, (step, metrics.get("nonfinite"))
        self._count(previous)

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        self._count(previous)

    def _count(self, pending) -> None:
        if pending is None or pending[1] is None:
            return
        step, flag = pending
        if float(jax.device_get(flag)) >= 1.0:
            self.first = step if self.count == 0 else self.first
            self.count += 1
        else:
            self.count = 0

    def check(self, checkpointer: Checkpointer) -> None:
        if self.limit and self.count >= self.limit:
            checkpointer.wait()  # a save still in flight completes before the run stops
            last = checkpointer.latest_step()
            raise errors.TrainingError(
                f"training diverged: {self.count} consecutive steps (from step {self.first}) had a non-finite loss "
                f"or gradient norm and were skipped (max_nonfinite_steps={self.limit}); nothing more was saved, "
                + (f"the last checkpoint (step {last}) holds the last finite state" if last is not None else
                   "and no checkpoint was written") + " — lower optim.lr or check the data.")


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jax.tree.reduce(lambda ok, x: ok & jnp.all(jnp.isfinite(x)), tree, jnp.array(True))


def _save(checkpointer: Checkpointer, step: int, state: TrainState, data_state: dict, metadata: dict) -> None:
    """Saves only a state whose trained params are finite: a checkpoint never holds NaN weights, so keep-N
    rotation can never push the last good one out."""
    if not bool(jax.device_get(_all_finite(state.params))):
        checkpointer.wait()
        raise errors.TrainingError(
            f"the trained parameters at step {step} are not finite; not saved (the last checkpoint is step "
            f"{checkpointer.latest_step()}) — lower optim.lr or check the data.")
    checkpointer.save(step, state, data_state, metadata)


def train(task: Task, cfg, workdir: str, mesh: Mesh) -> LoopResult:
    """Runs `cfg.steps` steps of `task` (resuming from `workdir/checkpoints` if there is a checkpoint)."""
    is_main = jax.process_index() == 0
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    loading = time.time()
    state, shardings, restored = initial_state(task, cfg.seed, mesh, checkpointer)
    jax.block_until_ready(state)
    logging.info("%s; weights %s in %.1fs.", describe_state(state),
                 "restored" if restored is not None else "initialised or loaded", time.time() - loading)
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start if restored is not None else None)
    if restored is not None:
        logging.info("Resumed from checkpoint at step %d.", restored)
    step_fn = CompiledStep(task.train_step, mesh, shardings)
    eval_fn = CompiledEval(task.eval_step, mesh, shardings) if task.eval_step else None
    evaluates = eval_fn is not None or task.eval_extra is not None
    peak, peak_source = mfu.peak_flops()
    logging.info("MFU peak %.3g FLOP/s (%s); %.3g FLOPs/step.", peak, peak_source, task.flops_per_step)
    kill_at = int(os.environ.get(FAULT_KILL_ENV, "0"))
    kill_in_save_at = int(os.environ.get(FAULT_KILL_IN_SAVE_ENV, "0"))
    term_in_save_at = int(os.environ.get(FAULT_TERM_IN_SAVE_ENV, "0"))

    started = time.time()
    throughput = _Throughput(task, peak)
    nonfinite = _NonfiniteStreak(int(cfg.get("max_nonfinite_steps", 5)))
    metrics, preempted, step = {}, False, start
    # Batches are read and placed on the devices one step ahead, on a thread; its state is the consumer's position.
    data = Prefetcher(task.train_data, depth=2, transform=lambda local: sharding.global_batch(local, mesh))
    if evaluates and cfg.get("eval_at_start", False) and restored is None:
        row = evaluate(eval_fn, state, task, mesh)
        writer.write(step, row)
        if is_main:
            logging.info(console_line(step, cfg.steps, row, started))
    with preemption.watching() as sigterm, data:
        while step < cfg.steps:
            position = data.get_state() if task.prepare is not None else None
            batch, prepared = next(data), {}
            if task.prepare is not None:
                try:
                    batch, prepared = task.prepare(state, step, batch, lambda: next(data))
                except errors.FlaxalignError:
                    # keep what was learnt so far; resuming re-reads this batch (the step it failed in is redone)
                    if checkpointer.latest_step() != step:
                        _save(checkpointer, step, state, position, task.metadata)
                    checkpointer.close()
                    writer.close()
                    raise
            state, metrics = step_fn(state, batch)
            step += 1
            nonfinite.push(step, metrics)
            if step == start + 1:  # the first step includes compilation: throughput is timed from its end
                jax.block_until_ready(metrics)
                logging.info("First step (compile included) done after %.1fs.", time.time() - started)
                throughput.reset(step)
            row = {}
            if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                row.update(prepared)
                row.update(throughput.since_last(step))
            if evaluates and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                row.update(evaluate(eval_fn, state, task, mesh))
                throughput.reset(step)  # eval time is not train throughput
            if row:
                writer.write(step, row)
                if is_main:
                    logging.info(console_line(step, cfg.steps, row, started))
            if row or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                nonfinite.flush()  # the metrics are on the host now anyway, or a save is due
            nonfinite.check(checkpointer)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save(checkpointer, step, state, data.get_state(), task.metadata)
                if kill_in_save_at and step == kill_in_save_at:  # no wait: the async write is still in flight
                    os.kill(os.getpid(), signal.SIGKILL)
                if term_in_save_at and step == term_in_save_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            if kill_at and step == kill_at:
                checkpointer.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if sigterm.any_process(step):
                logging.warning("SIGTERM received: saving a checkpoint at step %d and stopping.", step)
                preempted = True
                break
    nonfinite.flush()
    nonfinite.check(checkpointer)
    if checkpointer.latest_step() != step:
        _save(checkpointer, step, state, data.get_state(), task.metadata)
    checkpointer.close()
    if task.finalize is not None and not preempted and step >= cfg.steps:
        summary = task.finalize(state)
        if is_main and summary:
            logging.info("%s: %s", task.name, ", ".join(f"{k}={v}" for k, v in summary.items()))
    writer.close()
    return LoopResult(final_step=step, preempted=preempted, last_metrics=metrics, state=state)


def evaluate(eval_fn: CompiledEval | None, state, task: Task, mesh: Mesh) -> dict:
    """Sums each eval metric over the eval set, divides by the summed "count", reports `eval_`-prefixed means (and
    the task's `eval_extra` means)."""
    totals: dict = {}
    for local in task.eval_batches() if eval_fn is not None else ():
        sums = jax.device_get(eval_fn(state, sharding.global_batch(local, mesh)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.pop("count", 0.0), 1.0)
    out = {f"eval_{k}": v / count for k, v in totals.items()}
    if "eval_loss" in out and task.eval_loss_is_token_nll:
        out["eval_perplexity"] = float(np.exp(min(out["eval_loss"], 50.0)))
    if task.eval_extra is not None:
        out.update({f"eval_{k}": v for k, v in task.eval_extra(state).items()})
    return out

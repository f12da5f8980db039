"""`flaxalign plan --config=… --topology=v5p:4x4x4`: will this stage's train step fit on that TPU slice?

The train step is compiled ahead of time for the TPU topology on this machine (no TPU needed: libtpu's compile-only
devices, as MaxText's `train_compile.py` does), with abstract arguments only — the state and batch are
`ShapeDtypeStruct`s carrying their shardings, so no weights and no data are read or allocated, not even for an 8B
model. The compiler's `memory_analysis()` gives the HBM each chip needs; its `cost_analysis()` the FLOPs.

    flaxalign plan --config=configs/dpo.py:tiny --config.lora.rank=8 --topology=v5e:2x4 [--mfu=0.4]

The task is the stage's own description (`STAGES[stage].describe`, the task its `build_task` adds the data to): the
model comes from `config.model` (or the architecture in `init_from`'s metadata — never its weights), the batch
shapes from `data.batch_size` and `data.seq_len` (RL stages: the rollout's shapes, from `jax.eval_shape` of the
rollout, with `data.max_prompt_len` + `rollout.max_new_tokens`). Compute dtype "auto" means bfloat16, as on a TPU.
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import time

import jax

from flaxalign import errors, plan_rollout, sharding
from flaxalign.models import attention
from flaxalign.stages import STAGES
from flaxalign.train.jit import CompiledStep, state_shardings
from flaxalign.train.state import create_state
from flaxalign.train.task import Task

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: per-chip HBM and dense bf16 peak, and how libtpu names it."""
    kind: str  # "v5e"
    hbm_bytes: int  # datasheet HBM per chip
    usable_bytes: int  # what the compiler lets one program use (libtpu 0.0.52's out-of-memory limit)
    peak_flops: float  # dense bf16 FLOP/s per chip
    libtpu_name: str  # the topology prefix libtpu knows ("v5" for v5p)
    chip_config: str  # "megacore": the chip's two TensorCores are one JAX device
    dims: int  # 2D torus (v5e, v6e) or 3D (v4, v5p)
    accelerator_type: str  # TPU_ACCELERATOR_TYPE of a slice: `{n}` chips or `{cores}` TensorCores

    def accelerator(self, chips: int) -> str:
        return self.accelerator_type.format(n=chips, cores=2 * chips)


# Datasheet numbers, the "System architecture" tables of cloud.google.com/tpu/docs/<version>:
#   v4  (docs/v4):  275 TFLOP/s bf16, 32 GiB HBM2 per chip;
#   v5e (docs/v5e): 197 TFLOP/s bf16, 16 GB HBM2 per chip;
#   v5p (docs/v5p): 459 TFLOP/s bf16, 95 GB HBM2e per chip;
#   v6e (docs/v6e, Trillium): 918 TFLOP/s bf16, 32 GB HBM per chip.
# HBM comes in binary stacks, so "GB" is read as GiB. `usable_bytes` is the "available HBM" libtpu 0.0.52 reports
# when a compile runs out of memory (15.75G, 95.73G, 30.75G, 31.24G): "fits" is judged against it.
CHIPS = {
    "v4": Chip("v4", 32 * GIB, int(30.75 * GIB), 275e12, "v4", "megacore", 3, "v4-{cores}"),
    "v5e": Chip("v5e", 16 * GIB, int(15.75 * GIB), 197e12, "v5e", "default", 2, "v5litepod-{n}"),
    "v5p": Chip("v5p", 95 * GIB, int(95.73 * GIB), 459e12, "v5", "megacore", 3, "v5p-{cores}"),
    "v6e": Chip("v6e", 32 * GIB, int(31.24 * GIB), 918e12, "v6e", "default", 2, "v6e-{n}"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.chip.kind}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Up to 2×2 chips per host (4 chips: a v4/v5p host; v5e/v6e hosts of 8 are two such blocks to libtpu, as
        in MaxText's table). Only the process layout depends on it, not the compiled program's memory."""
        return (min(2, self.shape[0]), min(2, self.shape[1]) if len(self.shape) > 1 else 1, 1)


def parse_topology(text: str) -> Topology:
    """"v5e:2x4" → Topology(v5e, (2, 4)); v5e/v6e slices are 2D, v4/v5p slices 3D."""
    match = re.fullmatch(r"\s*(v\d+[a-z]*)\s*:\s*(\d+(?:x\d+)*)\s*", text or "", flags=re.IGNORECASE)
    if not match or match.group(1).lower() not in CHIPS:
        raise errors.ConfigError(f"--topology={text!r} is not a TPU topology like v5e:2x4, v6e:4x4, v4:2x2x1 or "
                                 f"v5p:4x4x4 (chips: {', '.join(CHIPS)}).")
    chip = CHIPS[match.group(1).lower()]
    shape = tuple(int(d) for d in match.group(2).lower().split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
        example = "2x2x1" if chip.dims == 3 else "2x4"
        raise errors.ConfigError(f"--topology={text!r}: a {chip.kind} slice has {chip.dims} positive dimensions, "
                                 f"e.g. {chip.kind}:{example}.")
    return Topology(chip, shape)


# ----------------------------------------------------------------------------------------------------------------
# libtpu's compile-only devices
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _libtpu_environment(topology: Topology):
    """What libtpu reads when it loads, set only while it loads: the accelerator type and a single local worker, so
    it does not probe the (absent) GCE metadata server or print warnings, and no lock file, so a JAX process that
    already holds /tmp/libtpu_lockfile does not stop this one. Restored afterwards: `TPU_WORKER_HOSTNAMES` would
    otherwise make `sharding.initialize_distributed` think this is a TPU VM."""
    values = {"TPU_ACCELERATOR_TYPE": topology.chip.accelerator(topology.chips), "TPU_WORKER_HOSTNAMES": "localhost",
              "TPU_WORKER_ID": "0", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
    """The compile-only TPU devices of `topology` (libtpu, no TPU needed)."""
    if not libtpu_installed():
        raise errors.ConfigError("flaxalign plan needs the libtpu package to compile for TPUs: pip install "
                                 "'flaxalign[tpu]' (or pip install libtpu).")
    from jax.experimental import topologies
    with _libtpu_environment(topology):
        try:
            desc = topologies.get_topology_desc(
                topology_name=topology.libtpu_name, platform="tpu", chip_config_name=topology.chip.chip_config,
                chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1)
        except Exception as e:  # libtpu's errors (a shape it does not know, a version mismatch): one sentence
            raise errors.ConfigError(f"libtpu cannot build the topology {topology.name}: "
                                     f"{_first_line(e)}.") from e
    return list(desc.devices)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------------------
# The stage's task and its abstract batch, without data or weights
# ----------------------------------------------------------------------------------------------------------------


def _tpu_config(config):
    """A copy of the config whose "auto" settings are what they resolve to on a TPU: compute dtype bfloat16 and the
    splash attention kernel (this process's own backend, the CPU, would pick blockwise)."""
    config = config.copy_and_resolve_references()
    config.unlock()
    if config.model.get("dtype", "auto") == "auto":
        config.model.dtype = "bfloat16"
    if config.model.get("attention", "auto") == "auto":
        config.model.attention = "splash"
    return config


def abstract_task(config, mesh):
    """(Task without data, model config, abstract global batch, `description.RolloutSpec` of an RL stage's rollout
    or None) of `config`'s stage on `mesh`: the stage's own `describe`, which its training builds on too."""
    if config.stage not in STAGES:
        raise errors.ConfigError(f"flaxalign plan knows the stages {sorted(STAGES)}, not {config.stage!r}.")
    d = STAGES[config.stage].describe(config, mesh)
    return d.task, d.model_config, d.abstract_batch(_abstract_state(d.task, config.seed)), d.rollout


def _abstract_state(task, seed: int):
    return jax.eval_shape(lambda p, f: create_state(p, task.optimizer, seed, f), task.abstract_params,
                          task.abstract_frozen)


# ----------------------------------------------------------------------------------------------------------------
# Compile and report
# ----------------------------------------------------------------------------------------------------------------


def abstract_arguments(task: Task, batch: dict, mesh, seed: int):
    """(state, batch) as ShapeDtypeStructs carrying the shardings the training loop gives them, and the state's
    shardings."""
    abstract = _abstract_state(task, seed)
    state_sh = state_shardings(abstract, task.params_logical, task.frozen_logical, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.shape[0], v.ndim))
             for k, v in batch.items()}
    return state, batch, state_sh


# libtpu's out-of-HBM compile errors: "Used 20.5G of 15.75G hbm" (everything), or "the total memory required for
# HLO temporaries (62.51G) exceeds available HBM (15.75G)" (temporaries only: the arguments come on top).
_OOM_PATTERNS = (
    (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE), False),
    (re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
                re.IGNORECASE), True),
)
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def compile_oom(e: Exception, argument_bytes: int = 0) -> dict | None:
    """{"needed", "limit", "detail"} of a compile that ran out of HBM (bytes; `needed` a lower bound, None where
    the message has no number), else None. `argument_bytes` are added when the message counts temporaries only."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    for pattern, temporaries_only in _OOM_PATTERNS:
        match = pattern.search(text)
        if match:
            used, used_unit, limit, limit_unit = match.groups()
            needed = float(used) * _UNITS[used_unit.upper()] + (argument_bytes if temporaries_only else 0)
            return {"needed": needed, "limit": float(limit) * _UNITS[limit_unit.upper()], "detail": _first_line(e)}
    return {"needed": None, "limit": None, "detail": _first_line(e)}


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - an analysis the backend does not offer is simply not reported
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float(value) if value is not None else None


def _memory(compiled) -> dict:
    """Per-chip bytes of the compiled program; total = arguments + outputs − donated (aliased) + temporaries +
    generated code."""
    analysis = compiled.memory_analysis()
    memory = {"argument": analysis.argument_size_in_bytes, "output": analysis.output_size_in_bytes,
              "alias": analysis.alias_size_in_bytes, "temp": analysis.temp_size_in_bytes,
              "generated_code": analysis.generated_code_size_in_bytes}
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                       + memory["generated_code"])
    return memory


def plan(config, topology: str, *, mfu: float = 0.4) -> dict:
    """Compiles `config`'s train step for the TPU `topology` (e.g. "v5p:4x4x4") and reports what each chip needs.

    Returns a dict: `stage`, `topology`, `chip`, `chips`, `mesh`, `model_params`, `trained_params`, `state` (bytes
    per chip of params / frozen / opt_state / batch), `memory` (bytes per chip from the compiler: argument, output,
    alias, temp, generated_code, total; None when the compile itself ran out of HBM), `hbm_bytes` (datasheet),
    `usable_bytes` (the compiler's limit), `fits`, `xla_flops_per_chip` (XLA's cost analysis of one chip's
    program, where a layer scan's body counts once), `flops_per_step` (flaxalign's model FLOPs, all chips),
    `tokens_per_step`, `step_time_s` at `mfu`, `compile_s`, `attention` (the implementation(s) the step traced,
    `_attention_label`), and when it does not fit `message`: one sentence with the overflow (GiB needed vs
    available) and what to change."""
    if not 0 < mfu <= 1:
        raise errors.ConfigError(f"--mfu must be in (0, 1], got {mfu}.")
    target = parse_topology(topology)
    config = _tpu_config(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                              devices=topology_devices(target))
    task, model_config, batch, rollout = abstract_task(config, mesh)
    state, batch, state_sh = abstract_arguments(task, batch, mesh, config.seed)
    chip = target.chip
    report = {
        "stage": task.name, "topology": target.name, "chip": mesh.devices.flat[0].device_kind,
        "chips": target.chips, "mesh": sharding.mesh_shape_of(mesh), "model_params": model_config.num_params(),
        "attention": model_config.attention,
        "trained_params": sum(math.prod(x.shape) for x in jax.tree.leaves(task.abstract_params)),
        "state": {key: plan_rollout.per_chip_bytes(tree) for key, tree in (
            ("params", state.params), ("frozen", state.frozen), ("opt_state", state.opt_state), ("batch", batch))},
        "hbm_bytes": chip.hbm_bytes, "usable_bytes": chip.usable_bytes, "peak_flops_per_chip": chip.peak_flops,
        "mfu": mfu, "tokens_per_step": task.tokens_per_step, "flops_per_step": task.flops_per_step,
        "step_time_s": task.flops_per_step / (target.chips * chip.peak_flops * mfu),
        "memory": None, "xla_flops_per_chip": None}
    step = CompiledStep(task.train_step, mesh, state_sh)
    started = time.time()
    try:
        with jax.set_mesh(mesh), attention.recording() as traced:
            lowered = step.lower(state, batch)  # exactly the training loop's jit
        report["attention"] = _attention_label(model_config.attention, traced)
        with jax.set_mesh(mesh):
            compiled = lowered.compile()
    except Exception as e:  # running out of HBM is an answer; anything else propagates
        oom = compile_oom(e, sum(report["state"].values()))
        if oom is None:
            raise
        report.update(compile_s=time.time() - started, fits=False, compile_error=oom["detail"],
                      usable_bytes=oom["limit"] or chip.usable_bytes)
        report["message"] = overflow_message(report, oom["needed"], config, model_config, at_least=True)
        return report
    memory = _memory(compiled)
    report.update(compile_s=time.time() - started, memory=memory, fits=memory["total"] <= chip.usable_bytes,
                  xla_flops_per_chip=_cost_flops(compiled))
    if not report["fits"]:
        report["message"] = overflow_message(report, memory["total"], config, model_config)
    if rollout is not None:
        _plan_rollout(report, rollout, state, task, model_config, mesh, config, started)
    return report


def _plan_rollout(report: dict, spec, state, task, model_config, mesh, config, started: float) -> None:
    """Adds the RL rollout to `report` (`plan_rollout.rollout_report`): `rollout`, `update_s`, `step_time_s` =
    rollout × the share of steps that sample + update, `step_time_max_s` = `rollout.rounds` rollouts + update
    (dynamic sampling's refills), and `fits` / `message` for the rollout phase too."""
    chip = CHIPS[report["topology"].split(":")[0]]
    try:
        rollout = plan_rollout.rollout_report(spec, state, model_config, mesh, memory_of=_memory, chip=chip,
                                              mfu=report["mfu"])
    except Exception as e:  # running out of HBM is an answer; anything else propagates
        oom = compile_oom(e, plan_rollout.per_chip_bytes(state))
        if oom is None:
            raise
        report.update(fits=False, rollout={"compile_error": oom["detail"]},
                      compile_s=time.time() - started)
        report.setdefault("message", rollout_overflow_message(report, oom["needed"], config, at_least=True))
        return
    # a step samples with probability `spec.share` (else it reads its responses from the data): expected costs
    update_s = max(task.flops_per_step - spec.share * rollout["rollout_flops"], 0.0) / (
        report["chips"] * chip.peak_flops * report["mfu"])
    report.update(rollout=rollout, update_s=update_s, step_time_s=spec.share * rollout["rollout_s"] + update_s,
                  step_time_max_s=spec.rounds * rollout["rollout_s"] + update_s, compile_s=time.time() - started)
    if rollout["phase_total"] > chip.usable_bytes:
        report["fits"] = False
        report.setdefault("message", rollout_overflow_message(report, rollout["phase_total"], config))


def rollout_overflow_message(report: dict, needed: float | None, config, at_least: bool = False) -> str:
    """One sentence: the rollout phase's overflow and what to change."""
    need = f"{'at least ' if at_least else ''}{_size(needed)}" if needed else "more HBM than that"
    rows = "data.batch_size × grpo.group_size" if report["stage"] == "grpo" else "data.batch_size"
    partial = config.get("lora", {}).get("rank") or config.get("adapters", {}).get("placement", "none") != "none"
    tips = [f"fewer rollout rows ({rows})", "a shorter rollout.max_new_tokens or data.max_prompt_len",
            "parameters sharded over more chips (mesh.fsdp=-1 with mesh.data=1)"]
    if not partial:
        tips.append("LoRA instead of full fine-tuning (lora.rank=16: one frozen base serves policy and reference)")
    return (f"the {report['stage']} rollout does not fit on {report['topology']}: each {report['chip']} chip needs "
            f"{need} (the sampler with its KV cache, plus the optimizer and the models it does not read) but has "
            f"{_size(report['usable_bytes'])} of usable HBM; try {', '.join(tips[:-1])} or {tips[-1]}.")


def _attention_label(configured: str, traced: set[str]) -> str:
    """The attention implementation(s) the step traced, saying so where they differ from the configured one
    (e.g. splash falling back to blockwise for a length its 128-token blocks do not divide)."""
    resolved = attention.resolve(configured)
    if not traced:
        return f"{resolved} (configured; not traced)"
    if traced == {resolved}:
        return resolved
    return f"{' + '.join(sorted(traced))} (configured {configured})"


def suggestions(config, model_config, mesh_shape: dict, chips: int) -> list[str]:
    """What would shrink the per-chip memory of this config, in the order to try them."""
    out = []
    if model_config.remat != "full":
        out.append("recomputing activations in the backward pass (model.remat='full')")
    if mesh_shape.get("fsdp", 1) < chips // mesh_shape.get("tensor", 1):
        out.append("sharding parameters and optimizer state over the chips (mesh.fsdp=-1 with mesh.data=1)")
    out.append("a smaller data.batch_size or micro-batches (grad_accum > 1)")
    partial = config.get("lora", {}).get("rank") or model_config.adapter_placement != "none"
    if not partial:
        out.append("LoRA instead of full fine-tuning (lora.rank=16)")
    if config.get("quantization", {}).get("base", "none") == "none":
        out.append(f"{'' if partial else 'then '}a quantized frozen base (quantization.base='nf4', QLoRA)")
    return out


def overflow_message(report: dict, needed: float | None, config, model_config, at_least: bool = False) -> str:
    """One sentence: the overflow (per-chip need vs usable HBM) and what to change."""
    need = f"{'at least ' if at_least else ''}{_size(needed)}" if needed else "more HBM than that"
    tips = suggestions(config, model_config, report["mesh"], report["chips"])
    tips = ", ".join(tips[:-1]) + f" or {tips[-1]}" if len(tips) > 1 else tips[0]
    return (f"the {report['stage']} train step does not fit on {report['topology']}: each {report['chip']} chip "
            f"needs {need} but has {_size(report['usable_bytes'])} of usable HBM; try {tips}.")


def require_fit(report: dict) -> None:
    """Raises the report's one-sentence `message` as a ConfigError when the step does not fit."""
    if not report["fits"]:
        raise errors.ConfigError(report["message"])


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _rollout_lines(report: dict) -> list[str]:
    """The RL rollout's part of the table: memory per role and the rollout phase's total."""
    rollout = report.get("rollout")
    if rollout is None:
        return []
    if "compile_error" in rollout:
        return [f"  rollout            the sampler's compile ran out of HBM: {rollout['compile_error']}"]
    roles = ", ".join(f"{name} {_size(n)}" for name, n in rollout["roles"].items())
    sampler, usable = rollout["sampler_memory"], report["usable_bytes"]
    total = rollout["phase_total"]
    return [f"  per role, per chip {roles}; KV cache {_size(rollout['kv_cache'])}",
            (f"  rollout phase      sampler {_size(sampler['total'])} (arguments {_size(sampler['argument'])}, "
             f"temporaries with the KV cache {_size(sampler['temp'])}) + resident {_size(rollout['resident'])} "
             f"(optimizer and the models it does not read) = {_size(total)} of {_size(usable)}: "
             f"{100 * total / usable:.2g}%, {'fits' if total <= usable else 'DOES NOT FIT'}")]


def format_report(report: dict) -> str:
    """The plan as a readable table."""
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    trained, params = report["trained_params"], report["model_params"]
    state, memory, usable = report["state"], report["memory"], report["usable_bytes"]
    share = 100 * trained / max(params, 1)
    lines = [(f"flaxalign plan: {report['stage']} train step on {report['topology']} = {report['chips']} × "
              f"{report['chip']}, mesh {mesh}"),
             (f"  model {_count(params)} params, {_count(trained)} trained ({share:.3g}% of the model); "
              f"{report['tokens_per_step']:,} tokens per step; {report['attention']} attention"),
             (f"  per chip          state: params {_size(state['params'])}, frozen {_size(state['frozen'])}, "
              f"optimizer {_size(state['opt_state'])}; batch {_size(state['batch'])}")]
    if memory is not None:
        for key, label in (("argument", "arguments"), ("output", "outputs"), ("alias", "- donated (aliased)"),
                           ("temp", "temporaries"), ("generated_code", "generated code")):
            lines.append(f"    {label:<20}{_size(memory[key]):>12}")
        lines.append(f"    {'total':<20}{_size(memory['total']):>12} of {_size(usable)} usable HBM "
                     f"({_size(report['hbm_bytes'])} datasheet): {100 * memory['total'] / usable:.2g}%, "
                     f"{'fits' if memory['total'] <= usable else 'DOES NOT FIT'}")
    else:
        lines.append(f"    the compile ran out of HBM: {report['compile_error']}")
    lines += _rollout_lines(report)
    xla = report["xla_flops_per_chip"]
    lines.append(f"  FLOPs per step     {report['flops_per_step']:.3g} (flaxalign's count)"
                 + (f"; XLA cost analysis {xla:.3g} per chip × {report['chips']} = {xla * report['chips']:.3g} "
                    "(counts a layer scan's body once)" if xla else ""))
    step = report["step_time_s"]
    if report.get("update_s") is not None:
        rollout = report["rollout"]
        lines.append(f"  rollout time       {rollout['rollout_s']:.3g} s = prefill {rollout['prefill_s']:.3g} s + "
                     f"decode {rollout['decode_s']:.3g} s (each token reads the weights and the filled KV cache at "
                     f"{rollout['hbm_bandwidth'] / 1e9:,.0f} GB/s, or computes at the MFU below) + scoring "
                     f"{rollout['scoring_s']:.3g} s; update {report['update_s']:.3g} s")
        if rollout["rounds"] > 1:
            lines.append(f"  dynamic sampling   up to {rollout['rounds']} rollouts per step: a step takes up to "
                         f"{report['step_time_max_s']:.3g} s")
    lines.append(f"  step time          {step:.3g} s at {100 * report['mfu']:.0f}% MFU of "
                 f"{report['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip "
                 f"({report['tokens_per_step'] / step:,.0f} tokens/s)")
    lines.append(f"  compiled in        {report['compile_s']:.1f} s")
    return "\n".join(lines)

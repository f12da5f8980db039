"""The `flaxalign` command line.

    flaxalign train --config=configs/clm.py:tiny --workdir=runs/clm [--config.steps=200 ...]
    flaxalign generate --checkpoint=runs/sft --prompt="What does `len(obj)` do?" [--temperature=0 ...]
    flaxalign convert --from=runs/sft_lora --to=exports/sft --format=hf|peft|checkpoint
    flaxalign convert --from=runs/sft_lora --to=exports/sft.gguf --format=gguf [--gguf_type=q8_0]   # for llama.cpp
    flaxalign eval --config=configs/eval.py:tiny --checkpoint=runs/dpo [--workdir=DIR --config.reference=...]
    flaxalign constitutional --config=configs/constitutional.py:tiny --workdir=runs/cai --config.checkpoint=runs/sft
    flaxalign generate --checkpoint=runs/sft --prompt=... --refine_rounds=2   # self-refine: feedback → revision
    flaxalign plan --config=configs/dpo.py:tiny --topology=v5p:4x4x4 [--mfu=0.4]   # compile for a TPU slice: fits?

A user error (bad flag, missing file, indivisible mesh, unknown preset) prints one sentence and exits 2.
"""

import contextlib
import functools
import logging as pylogging
import os
import re
import signal
import sys
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

import flaxalign
from flaxalign import errors
from flaxalign.train import preemption, workdir_lock

COMMANDS = ("train", "generate", "convert", "constitutional", "pipeline", "eval", "plan")
# What each command does and the flags it reads, for `flaxalign COMMAND --help`.
COMMAND_HELP = {
    "train": ("train one stage (CLM, SFT, reward, DPO, PPO, GRPO, …) from a config file; resumes from --workdir",
              ("config", "workdir", "cpu_devices", "coordinator_address", "num_processes", "process_id")),
    "generate": ("sample responses to prompts from a run, hf:DIR or gguf:FILE",
                 ("checkpoint", "prompt", "chat_template", "system", "max_new_tokens", "temperature", "top_k",
                  "top_p", "seed", "refine_rounds", "cpu_devices")),
    "convert": ("export a run (HF, PEFT, GGUF) or import pretrained weights as a run",
                ("from", "to", "format", "gguf_type", "overwrite", "merge_parent", "cpu_devices")),
    "eval": ("evaluate a run's policy (win rate, KL, perplexity, …) into eval.json",
             ("config", "checkpoint", "workdir", "cpu_devices")),
    "pipeline": ("run the whole adaptation pipeline (CLM → SFT → reward → PPO/DPO/GRPO → eval → report)",
                 ("config", "workdir", "seeds")),
    "constitutional": ("constitutional AI: critique-and-revise SFT data and AI preference pairs",
                       ("config", "workdir", "cpu_devices")),
    "plan": ("compile a stage's train step for a TPU topology and report per-chip memory and step time",
             ("config", "topology", "mfu")),
}

config_flags.DEFINE_config_file("config", None, "Stage config file and preset, e.g. configs/clm.py:tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard events and the report (eval: "
                    "for eval.json, default <checkpoint>/eval).")
flags.DEFINE_integer("cpu_devices", 0, "Emulate this many CPU devices (to try meshes without accelerators).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process jax.distributed.")
flags.DEFINE_integer("num_processes", 0, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")
flags.DEFINE_string("checkpoint", None, "generate, eval: the workdir of a run (its latest checkpoint), or hf:DIR "
                    "/ gguf:FILE.")
flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeat the flag for several).")
flags.DEFINE_integer("max_new_tokens", 128, "generate: the most tokens to sample per prompt.")
flags.DEFINE_float("temperature", 0.7, "generate: sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "generate: sample from the k most likely tokens only (0 = off).")
flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass (1 = off).")
flags.DEFINE_string("chat_template", "auto", "generate: wrap each prompt as a user message of this template "
                    "(plain, chatml, llama3, gemma, jinja = the tokenizer's own); auto = the one the run trained with, "
                    "none = the raw prompt text.")
flags.DEFINE_string("system", "", "generate: a system message before each prompt (needs a chat template).")
flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
flags.DEFINE_integer("refine_rounds", 0, "generate: self-refine rounds (feedback → refined answer, Madaan et al. "
                     "2023); 0 = answer once.")
flags.DEFINE_integer("seeds", 0, "pipeline: runs per method (0 = the config's `seeds`).")
flags.DEFINE_string("from", None, "convert: a run directory, hf:DIR (or a directory with config.json) or gguf:FILE.")
flags.DEFINE_string("to", None, "convert: the output directory (new or empty); for --format=gguf the output file "
                    "(FILE.gguf).")
flags.DEFINE_bool("overwrite", False, "convert: write into a --to directory that already holds files (--format=gguf: "
                  "replace an existing file).")
flags.DEFINE_bool("merge_parent", False, "convert --format=peft: a LoRA run trained on another LoRA run becomes one "
                  "adapter on the original base (ranks add).")
flags.DEFINE_string("topology", None, "plan: the TPU slice to compile for, e.g. v5e:2x4, v6e:4x4, v4:2x2x1, "
                    "v5p:4x4x4 (needs the libtpu package; no TPU needed).")
flags.DEFINE_float("mfu", 0.4, "plan: the model FLOPs utilisation the predicted step time assumes.")
flags.DEFINE_string("format", None, "convert: hf (transformers directory), peft (a LoRA run's adapter), "
                    "checkpoint (a flaxalign run directory of pretrained weights) or gguf (one llama.cpp file).")
flags.DEFINE_string("gguf_type", None, "convert --format=gguf: how the weight matrices are stored: f16 (default), "
                    "bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (norms and biases stay f32).")
FLAGS = flags.FLAGS

# Fault injection for tests: `flaxalign train` sends itself SIGTERM at this start-up point ("before_jax": right after
# its handler is installed; "after_task": once the stage has built its data and model).
FAULT_SIGTERM_ENV = "FLAXALIGN_FAULT_SIGTERM_AT_STARTUP"


def fail(message: str) -> None:
    print(f"flaxalign: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2) instead of a usage dump; `--help` prints the help of the
    command given (or the list of commands) and exits 0."""
    words = _words(argv[1:])
    if any(arg in ("--help", "-h", "--helpshort", "-?") for arg in words):
        print(command_help(next((a for a in words if a in COMMANDS), None)))
        sys.exit(0)
    for arg in argv[1:]:
        if arg.startswith("--config=") and not os.path.isfile(arg[len("--config="):].split(":")[0]):
            fail(f"config file {arg[len('--config='):].split(':')[0]!r} does not exist (e.g. configs/clm.py:tiny).")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(_first_sentence(e))
    except errors.FlaxalignError as e:  # raised by a config file's get_config, e.g. an unknown preset
        fail(str(e))
    except Exception as e:
        message = _config_file_failure(e, _config_path(argv))
        if message:  # the config file itself is broken: a syntax error, or get_config raised
            fail(message)
        if isinstance(e, (AttributeError, KeyError)):  # ml_collections: --config.<field> names no field
            fail(_unknown_field_message(str(e)))
        raise


def _words(args: list[str]) -> list[str]:
    """The arguments that are not the value of a preceding `--flag value` (so `--prompt -h` is a prompt)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.lstrip("-")
        if arg.startswith("-") and "=" not in arg and name in FLAGS and not FLAGS[name].boolean:
            skip = True
        out.append(arg)
    return out


def command_help(command: str | None) -> str:
    """`flaxalign --help` (the commands) or `flaxalign COMMAND --help` (its own flags, one line each)."""
    if command is None:
        lines = ["usage: flaxalign COMMAND [flags]   (flaxalign COMMAND --help lists its flags)", "", "commands:"]
        lines += [f"  {name:<15} {text}" for name, (text, _) in COMMAND_HELP.items()]
        return "\n".join(lines)
    text, names = COMMAND_HELP[command]
    lines = [f"usage: flaxalign {command} [flags]", f"  {text}", "", "flags:"]
    for name in names:
        flag = FLAGS[name]
        described = re.sub(r"^(?:[a-z]+, )*[a-z]+: ", "", flag.help.split(";\n")[0])  # "generate: …" prefixes
        default = "" if flag.default in (None, "", []) else f" (default: {flag.default})"
        lines.append(f"  --{name:<20} {described}{default}")
    if "config" in names:
        lines.append("  --config.FIELD=VALUE   overrides one field of the config file, e.g. --config.steps=100")
    return "\n".join(lines)


def _config_path(argv: list[str]) -> str | None:
    """The file of --config=FILE[:PRESET] (or --config FILE[:PRESET])."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):].split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


def _config_file_failure(e: Exception, path: str | None) -> str | None:
    """One line for an exception raised while loading the config file at `path` (a syntax error in it, or an error
    raised by its code); None when the exception did not come from that file."""
    if not path:
        return None
    target = os.path.realpath(path)
    if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == target:
        return f"config file {path!r} is not valid Python: {e.msg} (line {e.lineno})."
    lines = [line for frame, line in traceback.walk_tb(e.__traceback__)
             if os.path.realpath(frame.f_code.co_filename) == target]
    if not lines:
        return None
    return f"config file {path!r} raised {type(e).__name__} at line {lines[-1]}: {str(e).rstrip('.')}."


def _unknown_field_message(text: str) -> str:
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", text)
    field = names[0] if names else "?"
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
    return f"unknown config field {field!r} in a --config.* flag{hint}."


def _first_sentence(e: Exception) -> str:
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if isinstance(cause, errors.FlaxalignError):
        return str(cause)
    return text.splitlines()[0] if text else type(e).__name__


class _OnlyOurInfo(pylogging.Filter):
    """Orbax and JAX log dozens of INFO lines per checkpoint; keep their warnings, drop their chatter.

    Ours are the records of loggers named `flaxalign.*` and of absl logging calls made by code of this package.
    absl names its logger "absl" for every caller (Orbax's calls too), so such a call is placed by the module it
    came from: its source file must lie inside this package's directory. A path that merely contains "flaxalign"
    (a virtualenv under ~/flaxalign/.venv holds Orbax and JAX) is not ours."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return (record.levelno >= pylogging.WARNING or record.name.split(".")[0] == "flaxalign"
                or _in_this_package(record.pathname))


_PACKAGE_DIR = os.path.dirname(os.path.realpath(flaxalign.__file__))


@functools.lru_cache(maxsize=1024)
def _in_this_package(pathname: str) -> bool:
    return os.path.realpath(pathname).startswith(_PACKAGE_DIR + os.sep)


def setup_logging():
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OnlyOurInfo())


def setup_jax():
    """Device emulation and multi-process set-up; must run before JAX touches a backend."""
    import jax

    from flaxalign import sharding
    sharding.skip_absent_tpu()
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def train(config, workdir: str) -> None:
    """`flaxalign train`: holds the workdir, builds the stage's task, trains it (resuming from the workdir's latest
    checkpoint) and writes the report. A SIGTERM that arrived while the task was built ends the run here, exit 0."""
    import jax

    from flaxalign import sharding, weights
    from flaxalign.stages import STAGES

    if config.stage not in STAGES:
        raise errors.ConfigError(f"unknown stage {config.stage!r}; known stages: {sorted(STAGES)}.")
    with locked_workdir(workdir):
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        logging.info("Mesh %s on %d devices (%d processes).", dict(mesh.shape), jax.device_count(),
                     jax.process_count())
        task = STAGES[config.stage].build_task(config, workdir, mesh)
        task.metadata.update(weights.inherited_metadata(config))
        _startup_fault("after_task")
        if preemption.any_process_requested():
            logging.warning("SIGTERM during start-up: stopping before training (nothing to save).")
            return
        _train_task(task, config, workdir, mesh)


def _train_task(task, config, workdir: str, mesh) -> None:
    import jax

    from flaxalign.train import loop, report

    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    started = time.time()
    result = loop.train(task, config, workdir, mesh)
    if jax.process_index() == 0:
        report.write_summary(workdir, config, result, time.time() - started, task.flops_per_step)
        path = report.write_report(workdir, config, result, time.time() - started)
        print(f"flaxalign: {config.stage} finished at step {result.final_step}"
              f"{' (preempted: checkpoint saved)' if result.preempted else ''}; outputs in {workdir} "
              f"(report {path}).")


@contextlib.contextmanager
def locked_workdir(workdir: str):
    """This run's hold on `workdir` (see `flaxalign.train.workdir_lock`), taken before anything is written there.
    Process 0 takes it; in a multi-process run it tells the others whether it got it, so all stop alike."""
    import jax

    with contextlib.ExitStack() as stack:
        problem = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(workdir_lock.hold(workdir))
            except errors.FlaxalignError as e:
                problem = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            if bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None))) and problem is None:
                problem = workdir_lock.WorkdirError(f"process 0 could not take --workdir={workdir} (its error line "
                                                    "says why).")
        if problem is not None:
            raise problem
        yield


def _startup_fault(point: str) -> None:
    if os.environ.get(FAULT_SIGTERM_ENV) == point:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    commands = [a for a in argv[1:] if not a.startswith("-")]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        fail(f"expected one command from {list(COMMANDS)}, got {commands or 'none'}.")
    if commands[0] == "train":  # from here on SIGTERM is a flag the run checks, never a kill (exit 0 either way)
        preemption.install()
    {"train": train_command, "generate": generate_command, "convert": convert_command, "eval": eval_command,
     "pipeline": pipeline_command, "constitutional": constitutional_command, "plan": plan_command}[commands[0]]()


def require(value, message: str) -> None:
    """A missing required flag ends the run with one line (exit 2)."""
    if not value:
        fail(message)


@contextlib.contextmanager
def user_errors(with_jax: bool = True):
    """Logging on and (unless `with_jax` is False) JAX set up; a `FlaxalignError` inside ends the run with its one
    line and exit 2."""
    setup_logging()
    try:
        if with_jax:
            setup_jax()
        yield
    except errors.FlaxalignError as e:
        fail(str(e))


def train_command() -> None:
    require(FLAGS.config is not None, "--config is required, e.g. --config=configs/clm.py:tiny.")
    require(FLAGS.workdir, "--workdir is required.")
    if "://" in FLAGS.workdir:
        fail(f"--workdir={FLAGS.workdir} is a URL; metrics, reports and tokenizers are written with local file calls, "
             "so use a path (on a pod: a filesystem shared by every host, e.g. a gcsfuse mount of the bucket).")
    try:  # every process: a workdir that is a file or read-only is refused before JAX starts
        workdir_lock.prepare(FLAGS.workdir)
    except errors.FlaxalignError as e:
        fail(str(e))
    _startup_fault("before_jax")
    with user_errors():
        preemption.reinstall()  # multi-process JAX start-up replaces the SIGTERM handler with its own
        train(FLAGS.config, FLAGS.workdir)


def generate_command() -> None:
    require(FLAGS.checkpoint, "--checkpoint is required, e.g. --checkpoint=runs/sft.")
    require(FLAGS.prompt, "--prompt is required (repeat it for several prompts).")
    if FLAGS.temperature < 0 or not 0 < FLAGS.top_p <= 1 or FLAGS.top_k < 0 or FLAGS.max_new_tokens < 1:
        fail("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0 and --max_new_tokens >= 1.")
    if FLAGS.refine_rounds < 0:
        fail(f"--refine_rounds must be >= 0, got {FLAGS.refine_rounds}.")
    with user_errors():
        from flaxalign.generate import check_template_choice, respond
        check_template_choice(FLAGS.chat_template, "--chat_template")
        if FLAGS.refine_rounds:
            return refine_and_print()
        responses = respond(FLAGS.checkpoint, FLAGS.prompt, chat_template=FLAGS.chat_template, system=FLAGS.system,
                            max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                            top_p=FLAGS.top_p, seed=FLAGS.seed)
    for prompt, response in zip(FLAGS.prompt, responses):
        print(f">>> {prompt}\n{response}\n")


def refine_and_print() -> None:
    """generate --refine_rounds=N: self-refine with the model as its own critic (weights loaded once); prints each
    prompt's draft too, so the effect of the rounds is visible."""
    from flaxalign.constitutional import self_refine
    from flaxalign.generate import model_completer

    complete = model_completer(FLAGS.checkpoint, chat_template=FLAGS.chat_template, system=FLAGS.system,
                               max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                               top_p=FLAGS.top_p, seed=FLAGS.seed, batch_size=len(FLAGS.prompt))
    answers, trace = self_refine(FLAGS.prompt, complete, FLAGS.refine_rounds)
    for answer, row in zip(answers, trace):
        done = f"{len(row['refinements'])} refinement(s)" + (", then no issues" if row["stopped"] else "")
        print(f">>> {row['prompt']}\n[draft]\n{row['draft']}\n[after {done}]\n{answer}\n")


def pipeline_command() -> None:
    require(FLAGS.config is not None, "--config is required, e.g. --config=configs/pipeline.py:tiny.")
    require(FLAGS.workdir, "--workdir is required.")
    with user_errors(with_jax=False), workdir_lock.hold(FLAGS.workdir):  # the stages (subprocesses) lock their own
        from flaxalign.pipeline import run_pipeline
        path = run_pipeline(FLAGS.config, FLAGS.workdir, FLAGS.seeds or None)
    print(f"flaxalign: pipeline finished; report {path}." if path else "flaxalign: pipeline stopped after "
          f"{FLAGS.config.stop_after}.")


def convert_command() -> None:
    for name in ("from", "to", "format"):
        require(FLAGS[name].value, f"--{name} is required, e.g. flaxalign convert --from=runs/sft --to=exports/sft "
                "--format=hf.")
    with user_errors():
        from flaxalign.convert import convert
        done = convert(FLAGS["from"].value, FLAGS.to, FLAGS.format, overwrite=FLAGS.overwrite,
                       merge_parent=FLAGS.merge_parent, gguf_type=FLAGS.gguf_type)
        print(f"flaxalign: {done}.")


def plan_command() -> None:
    require(FLAGS.config is not None, "--config is required, e.g. flaxalign plan --config=configs/dpo.py:tiny "
            "--topology=v5e:2x4.")
    require(FLAGS.topology, "--topology is required, e.g. --topology=v5e:2x4 (or v6e:4x4, v4:2x2x1, v5p:4x4x4).")
    with user_errors(with_jax=False):
        import jax
        if not jax.config.jax_platforms:  # compile-only TPU devices need no backend but the host CPU
            jax.config.update("jax_platforms", "cpu")
        from flaxalign import plan
        report = plan.plan(FLAGS.config, FLAGS.topology, mfu=FLAGS.mfu)
        print(plan.format_report(report))
        plan.require_fit(report)


def constitutional_command() -> None:
    require(FLAGS.config is not None, "--config is required, e.g. --config=configs/constitutional.py:tiny.")
    require(FLAGS.workdir, "--workdir is required (preferences.jsonl, sft.jsonl and trace.jsonl are written there).")
    with user_errors():
        from flaxalign import constitutional
        print(f"flaxalign: {constitutional.run(FLAGS.config, FLAGS.workdir)}.")


def eval_command() -> None:
    example = "e.g. flaxalign eval --config=configs/eval.py:tiny --checkpoint=runs/dpo."
    require(FLAGS.config is not None, f"--config is required, {example}")
    require(FLAGS.checkpoint, f"--checkpoint is required, {example}")
    with user_errors():
        if FLAGS.config.get("stage") != "eval":
            raise errors.ConfigError(f"flaxalign eval needs an eval config (configs/eval.py), not a "
                                     f"{FLAGS.config.get('stage')!r} config.")
        from flaxalign.eval.evaluation import evaluate
        result = evaluate(FLAGS.config, FLAGS.checkpoint, workdir=FLAGS.workdir or "")
    for name, value in result["metrics"].items():
        print(f"{name:40s} {value:.4g}" if isinstance(value, float) else f"{name:40s} {value}")
    print(f"flaxalign: eval of {FLAGS.checkpoint} (step {result['step']}) took {result['wall_time_s']:.1f}s; "
          f"results in {os.path.join(result['output_dir'], 'eval.json')}.")


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()

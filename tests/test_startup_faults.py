"""`flaxalign train` at start-up, given what a hostile or unlucky user gives it: a broken config file, a workdir that
is a file or read-only, SIGTERM before training, a second run on a busy workdir, a damaged `metrics.jsonl` on
resume. Each ends in exit 0 (SIGTERM) or exit 2 with exactly one `flaxalign: error:` line, never a traceback, and
leaves what is on disk as it was. Also: the log filter drops Orbax/JAX INFO by where it comes from, not by path text.

The default-suite cases run in-process through main's own error path (or, for the read-only workdir, a subprocess
that stops before JAX is set up); the runs that need real signals, two live runs or a real resume are
CLI subprocesses in the slow group.
"""

import hashlib
import json
import logging as pylogging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
from absl import logging

from flaxalign import main
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.train import preemption, workdir_lock
from tests import cli_helpers as cli
from tests.config_files import CONFIGS, stage_config


def error_line(capsys, action) -> str:
    """The message of `action()`, which must exit 2 with it as its only error line, last on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        action()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    assert [line for line in lines if line.startswith("flaxalign: error: ")] == lines[-1:], err[-2000:]
    return lines[-1].removeprefix("flaxalign: error: ")


def one_error_line(rc: int, err: str) -> str:
    """The same for a subprocess's exit status and stderr."""
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, (rc, err[-2000:])
    assert [line for line in lines if line.startswith("flaxalign: error: ")] == lines[-1:], err[-2000:]
    return lines[-1].removeprefix("flaxalign: error: ")


def tree_digest(root: str) -> str:
    """Every path under `root` with its bytes: equal digests = nothing added, removed or changed."""
    digest = hashlib.sha256()
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest.update(os.path.relpath(path, root).encode() + b"\0" + f.read())
        digest.update(os.path.relpath(folder, root).encode() + b"/")
    return digest.hexdigest()


@pytest.fixture
def parsed_flags():
    """`main.FLAGS` parsed by a case, reset afterwards (the flags are the process's)."""
    yield main.FLAGS
    main.FLAGS.unparse_flags()


def parse(monkeypatch, *args: str) -> None:
    argv = ["flaxalign", "train", *args]
    monkeypatch.setattr(sys, "argv", argv)  # as app.run: config_flags reads the --config.* overrides from sys.argv
    main.parse_flags(argv)


# --- broken config files -----------------------------------------------------------------------------------------

CONFIG_FILES = {  # file text, the message (a syntax error names the line; an exception names its type and line)
    "syntax error": ("import ml_collections\n\ndef get_config(arg=None:\n    return None\n",
                     "config file '{path}' is not valid Python: invalid syntax (line 3)."),
    "indentation error": ("def get_config(arg=None):\nreturn None\n",
                          "config file '{path}' is not valid Python: expected an indented block after function "
                          "definition on line 1 (line 2)."),
    "get_config raises": ("def get_config(arg=None):\n    steps = {'tiny': 10}\n    return steps[arg] / 0\n",
                          "config file '{path}' raised ZeroDivisionError at line 3: division by zero."),
    # (ml_collections loads every config file as one module, `config`, so a name another config file defined earlier
    # in this process would still be there: the misspelt name is one no config file defines)
    "get_config misspells a name": ("def get_config(arg=None):\n    return ml_colections.ConfigDict()\n",
                                    "config file '{path}' raised NameError at line 2: name 'ml_colections' is not "
                                    "defined."),
    "imports a missing module": ("import no_such_module_here\n",
                                 "config file '{path}' raised ModuleNotFoundError at line 1: No module named "
                                 "'no_such_module_here'."),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_a_broken_config_file_is_one_line_naming_it(case, tmp_path, parsed_flags, monkeypatch, capsys):
    text, expected = CONFIG_FILES[case]
    path = tmp_path / "mine.py"
    path.write_text(text)
    assert error_line(capsys, lambda: parse(monkeypatch, f"--config={path}:tiny", "--workdir=x")) == (
        expected.format(path=path))


def test_an_attribute_error_inside_a_config_file_is_not_called_an_unknown_field(tmp_path, parsed_flags,
                                                                                 monkeypatch, capsys):
    """An AttributeError from the file's own code names the file, not a --config.* flag that was never given."""
    path = tmp_path / "mine.py"
    path.write_text("def get_config(arg=None):\n    return arg.preset\n")
    assert error_line(capsys, lambda: parse(monkeypatch, f"--config={path}:tiny", "--workdir=x")) == (
        f"config file '{path}' raised AttributeError at line 2: 'str' object has no attribute 'preset'.")


# --- unusable workdirs -------------------------------------------------------------------------------------------

def test_a_workdir_that_is_a_file_is_one_line(tmp_path, parsed_flags, monkeypatch, capsys):
    path = tmp_path / "run"
    path.write_text("not a directory")
    parse(monkeypatch, f"--config={CONFIGS}/clm.py:tiny", f"--workdir={path}")
    assert error_line(capsys, main.train_command) == (
        f"--workdir={path} is a file, not a directory; give the path of a directory (it is created if it does not "
        "exist).")
    assert path.read_text() == "not a directory"


def test_a_workdir_under_a_file_is_one_line(tmp_path, parsed_flags, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    parse(monkeypatch, f"--config={CONFIGS}/clm.py:tiny", f"--workdir={tmp_path}/file/run")
    assert error_line(capsys, main.train_command) == (
        f"cannot create --workdir={tmp_path}/file/run: not a directory ({tmp_path}/file/run).")


# Run before exec'ing the CLI, in a fresh interpreter (not a preexec_fn: forking this JAX-threaded process to run
# Python in the child can deadlock). Root ignores permission bits through two capabilities; dropping them from the
# bounding set makes the exec'd `flaxalign` (still uid 0, still able to read its own files) refused a read-only
# directory like anyone else. For other users there is nothing to drop.
WITHOUT_ROOT_OVERRIDE = """
import ctypes, os, sys
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def _make_read_only(root: str) -> None:
    for folder, dirs, names in os.walk(root):
        for name in names:
            os.chmod(os.path.join(folder, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for folder, _, _ in sorted(os.walk(root), reverse=True):
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _writable_again(root: str) -> None:
    for folder, _, names in os.walk(root):
        os.chmod(folder, 0o755)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o644)


@pytest.mark.parametrize("holds_a_run", [False, True], ids=["empty", "holding a run"])
def test_a_read_only_workdir_is_one_line_and_left_as_it_was(holds_a_run, tmp_path):
    """`chmod -R a-w` on the workdir (an archived run, a mount shared read-only): refused before JAX starts, every
    file byte-identical and nothing added (not even the lock file). A real `flaxalign train` process, as only a
    process without root's permission override can be refused; the refusal comes before the run's JAX set-up (~2.5 s,
    mostly importing what the config file imports)."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    if holds_a_run:  # the files a run leaves, including the lock file of its last holder
        for name, text in {"checkpoints/4/state/data": "weights", "checkpoints/4/meta/metadata": "{}",
                           "metrics.jsonl": json.dumps({"step": 4}) + "\n", "config.json": "{}",
                           workdir_lock.LOCK_FILE: json.dumps({"pid": 1, "host": "h"}) + "\n"}.items():
            os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
    before = tree_digest(workdir)
    _make_read_only(workdir)
    try:
        command = cli.cli_command(["--config=configs/clm.py:tiny", f"--workdir={workdir}"], 1)
        proc = subprocess.run([sys.executable, "-c", WITHOUT_ROOT_OVERRIDE, *command[1:]], cwd=cli.REPO,
                              env=cli.env(), capture_output=True, text=True, timeout=120)
    finally:
        _writable_again(workdir)
    assert one_error_line(proc.returncode, proc.stderr) == (
        f"--workdir={workdir} is not writable; checkpoints, metrics and the report are written there, so give a "
        "directory you can write to.")
    assert tree_digest(workdir) == before


# --- SIGTERM during start-up ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_corpus(max_chars=100_000)
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return str(root / "corpus.txt"), Tokenizer.train(docs, str(root / "tok.model"), vocab_size=512).model_path


def test_sigterm_during_start_up_stops_before_training_in_process(corpus_and_tokenizer, tmp_path, capsys, caplog):
    """The SIGTERM arrives after `flaxalign train` installed its handler and before the task is built: the task is
    built (the signal interrupted nothing), then the run stops — no error, no checkpoint, no config.json, and the
    handler's flag, not the default action, is what took the signal."""
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    config = stage_config("clm", {"data.train": corpus, "data.tokenizer": tok, "data.seq_len": 32,
                                  "data.batch_size": 8, "steps": 5})
    preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested()
        with caplog.at_level(pylogging.INFO), main.user_errors(with_jax=False):
            main.train(config, workdir)
    finally:
        preemption.uninstall()
    assert "SIGTERM during start-up: stopping before training (nothing to save)." in caplog.text
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # uninstall put pytest's own handling back


def test_the_loop_watch_keeps_a_start_up_sigterm_and_leaves_the_cli_handler_installed():
    """Under `flaxalign train` (handler installed first) a SIGTERM before the loop is still seen by its first check,
    and the handler stays after the loop; used alone, `watching` installs and removes its own."""
    preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with preemption.watching() as watch:
            assert watch.any_process(step=1)
        assert preemption.installed() and preemption.requested()
    finally:
        preemption.uninstall()
    with preemption.watching() as watch:
        assert not watch.any_process(step=1)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not preemption.requested()


# --- the log filter ----------------------------------------------------------------------------------------------

def _absl_record(source_file: str, level: int = logging.INFO) -> pylogging.LogRecord:
    """A real absl logging call whose code lives in `source_file` (as Python attributes a call to its module)."""
    captured = []

    class Capture(pylogging.Handler):
        def emit(self, record):
            captured.append(record)

    handler, logger = Capture(), pylogging.getLogger("absl")
    logger.addHandler(handler)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    try:
        exec(compile("logging.log(level, 'checkpoint chatter')", source_file, "exec"),
             {"logging": logging, "level": level})
    finally:
        logging.set_verbosity(verbosity)
        logger.removeHandler(handler)
    (record,) = captured
    assert record.pathname == source_file and record.name == "absl"
    return record


def test_the_log_filter_keeps_our_info_and_drops_orbax_info_even_in_a_venv_named_flaxalign():
    """absl names its logger "absl" for Orbax's calls and ours alike, so the module decides. The old filter (any
    path containing "flaxalign") let through every Orbax INFO line of a virtualenv under ~/flaxalign/."""
    import orbax.checkpoint
    keep = main._OnlyOurInfo().filter
    package = os.path.dirname(os.path.realpath(main.__file__))
    orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpoint_manager.py")
    venv_orbax = "/home/me/flaxalign/.venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert keep(_absl_record(os.path.join(package, "train", "loop.py")))
    assert not keep(_absl_record(orbax_file))
    assert not keep(_absl_record(venv_orbax))
    assert not keep(_absl_record(os.path.join(package + "_extras", "x.py")))  # a sibling directory is not ours
    assert keep(_absl_record(venv_orbax, level=logging.WARNING))  # their warnings stay
    jax_info = pylogging.LogRecord("jax._src.dispatch", pylogging.INFO, "/home/me/flaxalign/.venv/lib/python3.11/"
                                   "site-packages/jax/_src/dispatch.py", 1, "compiling", None, None)
    assert not keep(jax_info)
    ours = pylogging.LogRecord("flaxalign.data", pylogging.INFO, os.path.join(package, "data", "x.py"), 1, "m",
                               None, None)
    assert keep(ours)


# --- the CLI (slow) ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_jax", "after_task"])
def test_cli_sigterm_during_start_up_exits_0_without_a_checkpoint(point, corpus_and_tokenizer, tmp_path):
    """The process sends itself SIGTERM at a named start-up point (before JAX initialises; after the stage built its
    data and model): exit 0 (not 143), the one warning, no checkpoint, no traceback, no "finished" line."""
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    rc, out, err = cli.run(cli.small_run_flags(corpus, tok, workdir), cpu_devices=1, timeout=180,
                           **{main.FAULT_SIGTERM_ENV: point})
    assert rc == 0 and "Traceback" not in err, (rc, err[-2000:])
    assert "SIGTERM during start-up: stopping before training (nothing to save)." in err
    assert "finished" not in out
    assert not os.path.exists(os.path.join(workdir, "checkpoints")) and cli.metrics(workdir) == []


@pytest.mark.slow
def test_cli_a_second_run_on_a_busy_workdir_exits_2_and_the_first_is_untouched(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    flags = cli.small_run_flags(corpus, tok, workdir, steps=100000)
    with cli.started(flags, cpu_devices=1) as first:
        deadline = time.monotonic() + cli.TIMEOUT
        while not cli.metrics(workdir):  # training: the lock was taken before anything was written
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        rc, _, err = cli.run(flags, cpu_devices=1, timeout=120)
        assert one_error_line(rc, err) == (
            f"workdir {workdir} is in use by another flaxalign run (pid {first.pid} on host {os.uname().nodename}); "
            "wait for it to finish or use another --workdir.")
        first.send_signal(signal.SIGTERM)
        rc, out, err = cli.finish(first, timeout=120)
    assert rc == 0 and "preempted: checkpoint saved" in out, err[-2000:]
    steps = [r["step"] for r in cli.metrics(workdir)]
    assert steps == list(range(1, len(steps) + 1)), "only one run wrote metrics.jsonl"


RESUMABLE = dict(steps=4, checkpoint_every=2)


@pytest.fixture(scope="module")
def finished_4_steps(corpus_and_tokenizer, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4: `--config.steps=6` resumes it from step 4."""
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path_factory.mktemp("four") / "run")
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, workdir, **RESUMABLE), cpu_devices=1)
    assert rc == 0, err[-2000:]
    assert [r["step"] for r in cli.metrics(workdir)] == [1, 2, 3, 4]
    return workdir


@pytest.mark.slow
def test_cli_resume_drops_a_torn_last_metrics_line_with_a_warning(corpus_and_tokenizer, finished_4_steps, tmp_path):
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_4_steps, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 4.1')  # a write cut short by a kill
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, workdir, **{**RESUMABLE, "steps": 6}), cpu_devices=1)
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert "Resumed from checkpoint at step 4" in err and "dropped its last line 5" in err
    assert [r["step"] for r in cli.metrics(workdir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_cli_resume_with_a_damaged_metrics_line_exits_2_and_keeps_the_checkpoints(corpus_and_tokenizer,
                                                                                  finished_4_steps, tmp_path):
    """Damage before the last line is refused after the checkpoint was restored: one line, every file of the
    checkpoints directory byte-identical, metrics.jsonl as it was."""
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_4_steps, workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:2] + ["{garbage\n"] + lines[2:])
    before, metrics_before = tree_digest(os.path.join(workdir, "checkpoints")), open(path).read()
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, workdir, **{**RESUMABLE, "steps": 6}), cpu_devices=1)
    assert one_error_line(rc, err).startswith(f"{path} line 3 is not JSON")
    assert tree_digest(os.path.join(workdir, "checkpoints")) == before
    assert open(path).read() == metrics_before


@pytest.mark.slow
def test_cli_a_two_process_run_on_a_busy_workdir_stops_on_both_processes(corpus_and_tokenizer, tmp_path):
    """Process 0 alone takes the lock and tells process 1 the outcome (one collective), so both exit 2 with one line
    at once instead of process 1 waiting for a peer that has gone."""
    from tests.train.test_workdir_lock import held_by_another_process, refusal
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    address = f"127.0.0.1:{cli.free_port()}"
    commands = [cli.cli_command(cli.small_run_flags(corpus, tok, workdir) + [
        f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"], cpu_devices=4)
        for i in range(2)]
    with held_by_another_process(workdir) as holder:
        procs = [subprocess.Popen(cmd, cwd=cli.REPO, env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True) for cmd in commands]
        try:
            results = [proc.communicate(timeout=180) for proc in procs]
        finally:
            for proc in procs:
                cli.kill_group(proc)
        lines = [one_error_line(proc.returncode, err) for proc, (_, err) in zip(procs, results)]
        assert lines == [refusal(workdir, holder.pid),
                         f"process 0 could not take --workdir={workdir} (its error line says why)."]

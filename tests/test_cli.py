"""End-to-end runs of `flaxalign train` in subprocesses: resume after SIGKILL, SIGTERM, multi-process, bad input."""

import hashlib
import math
import os
import shutil
import signal
import time

import pytest

from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from tests import cli_helpers as cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_corpus(max_chars=300_000)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    tokenizer = Tokenizer.train(docs, str(root / "tok.model"), vocab_size=512)
    return str(corpus), tokenizer.model_path


def _losses(rows, first, last):
    return {r["step"]: r["loss"] for r in rows if first <= r["step"] <= last and "loss" in r}


CHECKPOINTED = dict(steps=30, checkpoint_every=10)


@pytest.fixture(scope="module")
def straight_run(corpus_and_tokenizer, tmp_path_factory):
    """An uninterrupted 30-step run with checkpoints every 10 steps: the losses the interrupted runs must match."""
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path_factory.mktemp("straight"))
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, workdir, **CHECKPOINTED))
    assert rc == 0, err[-2000:]
    return workdir


def _resume_and_compare(corpus_and_tokenizer, straight_run, killed, from_step):
    """Runs the killed workdir again; it must resume at `from_step` and end with the straight run's losses."""
    corpus, tok = corpus_and_tokenizer
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, killed, **CHECKPOINTED))
    assert rc == 0, err[-2000:]
    assert f"Resumed from checkpoint at step {from_step}" in err
    resumed = cli.metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, 31)), "metrics.jsonl must read as one run"
    expected, got = _losses(cli.metrics(straight_run), from_step + 1, 30), _losses(resumed, from_step + 1, 30)
    assert len(expected) == 30 - from_step and got == expected  # floats compared exactly


def test_resume_after_sigkill_is_bitwise_identical(corpus_and_tokenizer, straight_run, tmp_path):
    """Killed after step 13 (its step-10 checkpoint durable): the rerun resumes at 10 with bitwise-equal losses."""
    corpus, tok = corpus_and_tokenizer
    killed = str(tmp_path / "killed")
    rc, _, _ = cli.run(cli.small_run_flags(corpus, tok, killed, **CHECKPOINTED), FLAXALIGN_FAULT_SIGKILL_AT_STEP="13")
    assert rc == -signal.SIGKILL
    assert max(r["step"] for r in cli.metrics(killed)) == 13
    _resume_and_compare(corpus_and_tokenizer, straight_run, killed, from_step=10)


def test_sigkill_during_an_async_save_falls_back_to_the_last_complete_checkpoint(corpus_and_tokenizer,
                                                                                 straight_run, tmp_path):
    """Killed right after the step-20 save was started, while Orbax still writes it: only a temporary step-20
    directory is on disk; the rerun ignores it, resumes at step 10 and ends with the straight run's losses."""
    corpus, tok = corpus_and_tokenizer
    killed = str(tmp_path / "killed")
    rc, _, _ = cli.run(cli.small_run_flags(corpus, tok, killed, **CHECKPOINTED),
                       FLAXALIGN_FAULT_SIGKILL_DURING_SAVE_AT_STEP="20")
    assert rc == -signal.SIGKILL
    on_disk = sorted(os.listdir(os.path.join(killed, "checkpoints")))
    # The kill landed mid-save (else this test would prove nothing): step 20 exists only as Orbax's tmp folder.
    assert "10" in on_disk and "20" not in on_disk, on_disk
    assert any(name.startswith("20.") and "tmp" in name for name in on_disk), on_disk
    _resume_and_compare(corpus_and_tokenizer, straight_run, killed, from_step=10)


def test_a_truncated_newest_checkpoint_falls_back_in_one_line_with_identical_losses(corpus_and_tokenizer,
                                                                                     straight_run, tmp_path):
    """The finished run's step-30 state file cut in half: the rerun says so in one warning line (no traceback),
    moves it aside to corrupt-30, resumes at step 20 and ends with the straight run's losses."""
    damaged = str(tmp_path / "damaged")
    shutil.copytree(straight_run, damaged)
    step_dir = os.path.join(damaged, "checkpoints", "30")
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, "state")) for f in names]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    corpus, tok = corpus_and_tokenizer
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, damaged, **CHECKPOINTED))
    assert rc == 0 and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    warnings = [line for line in err.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and "step 30" in warnings[0] and "corrupt-30" in warnings[0], warnings
    assert "corrupt-30" in os.listdir(os.path.join(damaged, "checkpoints"))
    assert "Resumed from checkpoint at step 20" in err
    resumed = cli.metrics(damaged)
    assert [r["step"] for r in resumed] == list(range(1, 31))
    assert _losses(resumed, 21, 30) == _losses(cli.metrics(straight_run), 21, 30)


def test_sigterm_during_an_async_save_completes_it_and_exits_0(corpus_and_tokenizer, straight_run, tmp_path):
    """SIGTERM right after the step-20 save was started: the save completes (a finished step 20, no temporary
    folder), the run stops there with exit 0, and the rerun resumes at 20 with the straight run's losses."""
    corpus, tok = corpus_and_tokenizer
    stopped = str(tmp_path / "stopped")
    rc, out, err = cli.run(cli.small_run_flags(corpus, tok, stopped, **CHECKPOINTED),
                           FLAXALIGN_FAULT_SIGTERM_DURING_SAVE_AT_STEP="20")
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert "preempted: checkpoint saved" in out
    on_disk = sorted(os.listdir(os.path.join(stopped, "checkpoints")))
    assert "20" in on_disk and not any("tmp" in name for name in on_disk), on_disk
    assert max(r["step"] for r in cli.metrics(stopped)) == 20
    _resume_and_compare(corpus_and_tokenizer, straight_run, stopped, from_step=20)


def test_sigterm_saves_a_checkpoint_and_exits_0(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path / "run")
    with cli.started(cli.small_run_flags(corpus, tok, workdir, steps=100000)) as proc:
        deadline = time.monotonic() + cli.TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r["step"] >= 3 for r in cli.metrics(workdir)):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc, out, err = cli.finish(proc, timeout=120)
    assert rc == 0, err[-2000:]
    last = max(r["step"] for r in cli.metrics(workdir))
    assert "preempted: checkpoint saved" in out
    assert last >= 3 and os.path.isdir(os.path.join(workdir, "checkpoints", str(last)))


def _run_two_processes(flags: list[str]) -> None:
    """Runs `flaxalign train` as 2 processes × 4 CPU devices (jax.distributed on localhost); both must exit 0.
    If one fails, the other is killed at once and the test fails with the failed one's output."""
    address = f"127.0.0.1:{cli.free_port()}"
    cli.run_together([cli.cli_command(flags + [f"--coordinator_address={address}", "--num_processes=2",
                                               f"--process_id={i}"], cpu_devices=4) for i in range(2)])


def test_two_processes_match_one_process(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    one = str(tmp_path / "one")
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, one, steps=3))
    assert rc == 0, err[-2000:]

    two = str(tmp_path / "two")
    _run_two_processes(cli.small_run_flags(corpus, tok, two, steps=3))
    expected, got = _losses(cli.metrics(one), 1, 3), _losses(cli.metrics(two), 1, 3)
    assert len(got) == 3
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5)


def test_checkpoint_of_two_processes_resumes_in_one_process_on_another_mesh(corpus_and_tokenizer, tmp_path):
    """Elasticity: 2 processes × 4 devices on mesh (data 2, fsdp 2, tensor 2) save at step 3; one process with 8
    devices on mesh (8, 1, 1) continues to step 6 with the losses of an uninterrupted one-process run."""
    corpus, tok = corpus_and_tokenizer
    straight = str(tmp_path / "straight")
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, straight, steps=6))
    assert rc == 0, err[-2000:]

    elastic = str(tmp_path / "elastic")
    pod_mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "checkpoint_every": 3}
    _run_two_processes(cli.small_run_flags(corpus, tok, elastic, steps=3, **pod_mesh))
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, elastic, steps=6, **{"mesh.data": 8}))
    assert rc == 0, err[-2000:]
    assert "Resumed from checkpoint at step 3" in err
    expected, got = _losses(cli.metrics(straight), 1, 6), _losses(cli.metrics(elastic), 1, 6)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.fixture(scope="module")
def workdir_with_checkpoint(corpus_and_tokenizer, tmp_path_factory):
    corpus, tok = corpus_and_tokenizer
    workdir = str(tmp_path_factory.mktemp("existing"))
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, workdir, steps=2))
    assert rc == 0, err[-2000:]
    return workdir


def _tree_digest(root: str) -> str:
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(os.path.join(root, "checkpoints"))):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


BAD_INPUTS = {
    "missing corpus": (["--config.data.train=/no/such/corpus.txt"], "does not exist"),
    "empty corpus": (["--config.data.train={empty}"], "empty"),
    "indivisible mesh": (["--config.mesh.tensor=3"], "'tensor' has size 3"),
    "unknown preset": (["--config=configs/clm.py:bogus"], "unknown preset 'bogus'"),
    "bad flag value": (["--config.steps=many"], "steps"),
    "unknown config field": (["--config.stepz=3"], "unknown config field 'stepz'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_sentence(case, corpus_and_tokenizer, workdir_with_checkpoint, tmp_path):
    corpus, tok = corpus_and_tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra, expected = BAD_INPUTS[case]
    extra = [e.format(empty=empty) for e in extra]
    before = _tree_digest(workdir_with_checkpoint)
    rc, _, err = cli.run(cli.small_run_flags(corpus, tok, workdir_with_checkpoint) + extra)
    assert rc == 2, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("flaxalign: error: ") and expected in last_line, err[-2000:]
    assert "Traceback" not in err
    assert _tree_digest(workdir_with_checkpoint) == before, "a failed run changed the existing checkpoint"


def test_demo_config_learns(clm_demo_run):
    """The loss falls by at least 30 % from its first value and eval loss is reported."""
    workdir, out = clm_demo_run
    rows = cli.metrics(workdir)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 300
    assert losses[-1] <= 0.7 * losses[0], f"loss {losses[0]:.3f} → {losses[-1]:.3f}"
    assert rows[-1]["eval_loss"] < 0.7 * losses[0]
    assert rows[-1]["eval_perplexity"] == pytest.approx(math.exp(rows[-1]["eval_loss"]), rel=1e-6)
    assert os.path.exists(os.path.join(workdir, "report.md")) and "report" in out


def _sft_flags(workdir, clm_workdir, *extra):
    return ["--config=configs/sft.py:tiny", f"--workdir={workdir}",
            f"--config.init_from=checkpoint:{clm_workdir}", *extra]


def test_sft_from_the_clm_checkpoint_lowers_held_out_completion_loss(sft_demo_run):
    evals = [(r["step"], r["eval_loss"]) for r in cli.metrics(sft_demo_run) if "eval_loss" in r]
    assert evals[0][0] == 0, "the starting checkpoint is evaluated before the first step"
    assert evals[-1][1] <= 0.75 * evals[0][1], f"held-out completion loss {evals[0][1]:.3f} → {evals[-1][1]:.3f}"


def test_resuming_sft_with_another_lora_rank_is_refused(clm_demo_run, tmp_path):
    clm_workdir, _ = clm_demo_run
    workdir = str(tmp_path / "lora")
    rc, _, err = cli.run(_sft_flags(workdir, clm_workdir, "--config.lora.rank=4", "--config.steps=2",
                                    "--config.eval_at_start=False"))
    assert rc == 0, err[-2000:]
    rc, _, err = cli.run(_sft_flags(workdir, clm_workdir, "--config.lora.rank=8", "--config.steps=4"))
    assert rc == 2
    assert "different model config (changed: lora.rank)" in err.strip().splitlines()[-1]


def test_lora_target_matching_nothing_exits_2(clm_demo_run, tmp_path):
    clm_workdir, _ = clm_demo_run
    rc, _, err = cli.run(_sft_flags(str(tmp_path / "w"), clm_workdir, "--config.lora.rank=4",
                                    "--config.lora.targets=nothing_like_this"))
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("flaxalign: error: ")


def test_clm_continues_from_a_checkpoint_with_lora(clm_demo_run, tmp_path):
    """configs/clm.py takes init_from, lora and adapters like configs/sft.py: continued pretraining with LoRA starts
    from the checkpoint's weights and tokenizer (its first loss is the trained model's, not a random one's)."""
    clm_workdir, _ = clm_demo_run
    workdir = str(tmp_path / "more")
    rc, _, err = cli.run(["--config=configs/clm.py:tiny", f"--workdir={workdir}",
                          f"--config.init_from=checkpoint:{clm_workdir}", "--config.lora.rank=4",
                          "--config.steps=3", "--config.log_every=1"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    trained_loss = [r["loss"] for r in cli.metrics(clm_workdir) if "loss" in r][-1]
    first = cli.metrics(workdir)[0]["loss"]
    assert first == pytest.approx(trained_loss, rel=0.1)
    assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))  # the checkpoint's tokenizer is reused

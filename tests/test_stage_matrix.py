"""Every stage × {full fine-tuning, LoRA, bottleneck adapters, QLoRA} (a covering set of the pairs: PEFT_CASES)
through `flaxalign train`: each trains 4 steps with a checkpoint at step 2, and a second process, started from a
copy of that run with its step-4 checkpoint removed (the state a crash after step 2 leaves), resumes at step 2 and
logs steps 3 and 4 with metrics bitwise equal to the
uninterrupted run's — every logged number, not only the loss, so the data position, the RNG, the optimizer and (PPO)
the KL coefficient all have to come back. A combination refused by design (a quantized base with full fine-tuning)
exits 2 with one line instead.

The upstream runs are the matrix's own full runs (CLM → SFT → reward model → PPO/GRPO), at tiny shapes, so the
whole matrix is ~35 short processes. They run a few at a time (`FLAXALIGN_TEST_PARALLEL`, default min(4, CPUs)), each
after the runs it reads from, and share a persistent XLA compilation cache, so a resumed process does not compile
again what its uninterrupted twin compiled.
"""

import concurrent.futures
import os
import shutil
import threading

import pytest

from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from tests import cli_helpers as cli

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_AT = 4, 2
TIMING = {"step_time", "tokens_per_sec", "mfu"}  # wall-clock metrics: the only ones allowed to differ
METHODS = {"full": {}, "lora": {"lora.rank": 4}, "adapters": {"adapters.placement": "houlsby"},
           "qlora": {"lora.rank": 4, "quantization.base": "nf4"}, "qfull": {"quantization.base": "nf4"}}
SHAPES = {"data.seq_len": 32, "data.batch_size": 4}
ROLLOUT = {"data.max_prompt_len": 16, "rollout.max_new_tokens": 4, "eval_prompts": 0}
# The flags of each stage on top of the common ones; {NAME} is the workdir of run NAME (its upstream).
STAGE_FLAGS = {
    "clm": {"data.train": "{corpus}", "data.tokenizer": "{tokenizer}", **SHAPES},
    "sft": {"init_from": "checkpoint:{sft_from}", "data.train": "builtin:arithmetic_sft?n=64", **SHAPES},
    "reward": {"init_from": "checkpoint:{from_sft}", "data.train": "builtin:arithmetic_preferences?n=64",
               "normalize.num_prompts": 0, **SHAPES},
    "dpo": {"init_from": "checkpoint:{from_sft}", "data.train": "builtin:arithmetic_preferences?n=64",
            "eval_kl.num_prompts": 0, **SHAPES},
    "ppo": {"init_from": "checkpoint:{from_sft}", "reward_from": "checkpoint:{from_reward}",
            "data.train": "builtin:arithmetic_prompts?n=64", "data.batch_size": 4, "ppo.epochs": 1,
            "ppo.num_minibatches": 2, **ROLLOUT},
    # rewards from the reward model only: an untrained policy never answers right, so exact_answer would give
    # all-zero advantages and nothing to compare
    "grpo": {"init_from": "checkpoint:{from_sft}", "reward_from": "checkpoint:{from_reward}", "rewards": "",
             "data.train": "builtin:arithmetic_prompts?n=64&max=9", "data.batch_size": 2, "grpo.group_size": 2,
             "grpo.num_minibatches": 2, **ROLLOUT},
}
UPSTREAM = {"clm": {}, "sft": {"sft_from": "clm-full"}, "reward": {"from_sft": "sft-full"},
            "dpo": {"from_sft": "sft-full"}, "ppo": {"from_sft": "sft-full", "from_reward": "reward-full"},
            "grpo": {"from_sft": "sft-full", "from_reward": "reward-full"}}
# Refused by design in every stage: a quantized base needs something else to train (LoRA or adapters).
QFULL = ("quantization.base='nf4' stores the frozen base quantized, but full fine-tuning trains every weight: add "
         "LoRA (lora.rank > 0) or adapters, or set quantization.base='none'.")
REFUSED = {(stage, "qfull"): QFULL for stage in ("sft", "ppo")}
# Every stage with full fine-tuning (the other runs' upstream), and each PEFT method in three or four stages — a
# covering design rather than the whole product, for CI time: every stage resumes with a PEFT method, and LoRA,
# adapters and QLoRA each resume in a supervised stage and in an RL stage.
PEFT_CASES = {"clm": ("lora",), "sft": ("adapters", "qlora"), "reward": ("lora",), "dpo": ("lora", "qlora"),
              "ppo": ("adapters", "qlora"), "grpo": ("lora", "adapters")}
TRAINED = [f"{stage}-{method}" for stage in STAGE_FLAGS for method in ("full", *PEFT_CASES[stage])]


def _flags(name: str, root: str, data: dict) -> list[str]:
    """The flags of run NAME ("STAGE-METHOD", or "STAGE-METHOD-resumed": the same flags in another workdir)."""
    stage, method = name.split("-")[:2]
    paths = {key: os.path.join(root, run) for key, run in UPSTREAM[stage].items()}
    values = {"steps": STEPS, "checkpoint_every": CHECKPOINT_AT, "keep_checkpoints": 3, "log_every": 1,
              "eval_every": 0, **({} if stage == "clm" else {"eval_at_start": False}), **STAGE_FLAGS[stage],
              **METHODS[method]}
    values = {k: str(v).format(**paths, **data) for k, v in values.items()}
    return [f"--config=configs/{stage}.py:tiny", f"--workdir={os.path.join(root, name)}"] + [
        f"--config.{k}={v}" for k, v in values.items()]


class Runs:
    """Each run started once, after the runs it reads from, at most `parallel` processes at a time. A run's future
    gives (returncode, stdout, stderr)."""

    def __init__(self, root: str, data: dict, parallel: int, env: dict):
        self.root, self.data, self.env = root, data, env
        self._slots = threading.Semaphore(parallel)
        self._lock = threading.RLock()
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._live: set = set()
        # a thread per run (each waits for its upstream first), so no run waits for a free thread
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4 * len(TRAINED))

    def workdir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def result(self, name: str) -> tuple[int, str, str]:
        return self.submit(name).result()

    def submit(self, name: str) -> concurrent.futures.Future:
        with self._lock:
            if name not in self._futures:
                straight = name.removesuffix("-resumed")
                stage = straight.split("-")[0]
                deps = [straight] if name.endswith("-resumed") else list(UPSTREAM[stage].values())
                dep_futures = [self.submit(d) for d in deps]
                self._futures[name] = self._pool.submit(self._run, name, dep_futures)
            return self._futures[name]

    def _run(self, name: str, deps: list) -> tuple[int, str, str]:
        for dep in deps:  # an upstream that failed fails this run with its own message
            rc, _, err = dep.result()
            assert rc == 0, f"an upstream run of {name} failed:\n{err[-2000:]}"
        straight = name.removesuffix("-resumed")
        if name != straight:
            _copy_as_interrupted(self.workdir(straight), self.workdir(name))
        with self._slots:
            proc = cli.start(_flags(name, self.root, self.data), cpu_devices=1, **self.env)
            self._live.add(proc)
            try:
                return cli.finish(proc)
            finally:
                self._live.discard(proc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(self._live):
            cli.kill_group(proc)


def _copy_as_interrupted(straight: str, resumed: str) -> None:
    """The workdir a run killed right after its step-2 checkpoint leaves: the straight run's files without the
    later checkpoints (metrics.jsonl past step 2 is dropped by the resumed run itself)."""
    shutil.copytree(straight, resumed)
    for step in os.listdir(os.path.join(resumed, "checkpoints")):
        if step.isdigit() and int(step) > CHECKPOINT_AT:
            shutil.rmtree(os.path.join(resumed, "checkpoints", step))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    docs = stdlib_corpus(max_chars=100_000)
    (root / "corpus.txt").write_text("\n\n".join(docs))
    tokenizer = Tokenizer.train(docs, str(root / "tok.model"), vocab_size=512)
    env = {}  # the runs share the suite's compilation cache (conftest.py): they compile the same few programs
    parallel = int(os.environ.get("FLAXALIGN_TEST_PARALLEL", min(4, os.cpu_count() or 1)))
    matrix = Runs(str(root / "runs"), {"corpus": str(root / "corpus.txt"), "tokenizer": tokenizer.model_path},
                  parallel, env)
    os.makedirs(matrix.root)
    for item in request.session.items:  # start every selected case now, so independent runs overlap
        case = getattr(item, "callspec", None) and item.callspec.params.get("trained")
        if item.module is request.module and case:
            matrix.submit(f"{case}-resumed")
    yield matrix
    matrix.close()


def _by_step(workdir: str) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in cli.metrics(workdir)}


def _method_in_checkpoint(workdir: str) -> str:
    from flaxalign.train import checkpoint

    meta = checkpoint.read_metadata(workdir)
    if meta.get("lora"):
        return "qlora" if (meta.get("quantization") or {}).get("base", "none") != "none" else "lora"
    return "adapters" if meta["model"].get("adapter_placement", "none") != "none" else "full"


@pytest.mark.parametrize("trained", TRAINED)
def test_resumed_run_continues_bitwise_like_the_uninterrupted_one(trained, runs):
    rc, _, err = runs.result(trained)
    assert rc == 0, err[-3000:]
    straight = _by_step(runs.workdir(trained))
    assert sorted(straight) == list(range(1, STEPS + 1))
    assert _method_in_checkpoint(runs.workdir(trained)) == trained.split("-")[1], "the method flag had no effect"

    rc, _, err = runs.result(f"{trained}-resumed")
    assert rc == 0, err[-3000:]
    assert f"Resumed from checkpoint at step {CHECKPOINT_AT}." in err
    resumed = _by_step(runs.workdir(f"{trained}-resumed"))
    assert sorted(resumed) == list(range(1, STEPS + 1)), "metrics.jsonl must read as one run"
    for step in range(CHECKPOINT_AT + 1, STEPS + 1):
        assert resumed[step] == straight[step], f"step {step} after resume differs"  # floats compared exactly
    assert all(v == v for row in straight.values() for v in row.values()), "NaN in the metrics"


@pytest.mark.parametrize("stage, method", sorted(REFUSED))
def test_combination_refused_by_design_exits_2_with_one_line(stage, method, runs):
    for upstream in UPSTREAM[stage].values():
        assert runs.result(upstream)[0] == 0, f"upstream {upstream} failed"
    rc, _, err = cli.run(_flags(f"{stage}-{method}", runs.root, runs.data), cpu_devices=1, timeout=120)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert [line for line in lines if line.startswith("flaxalign: error:")] == [lines[-1]]
    assert lines[-1] == f"flaxalign: error: {REFUSED[stage, method]}"

"""Every test sees 8 emulated CPU devices; this must run before JAX initialises its backends."""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA compiles dominate this suite's time, and many tests (and the CLI runs they start, which inherit the environment)
# compile the same programs: a persistent compilation cache (keyed by the program, compile options and jax version;
# results are those of a fresh compile) lets every later compile of one read it from disk. `rm -rf .cache/jax-tests`
# empties it; CI's fresh clone starts with it empty.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".cache", "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from tests import cli_helpers as cli  # noqa: E402


@pytest.fixture(scope="session")
def clm_demo_run(tmp_path_factory):
    """The demo's CLM run: tiny preset, built-in corpus, 300 steps, one CPU device. Returns (workdir, stdout)."""
    workdir = str(tmp_path_factory.mktemp("clm_demo"))
    rc, out, err = cli.run(["--config=configs/clm.py:tiny", f"--workdir={workdir}"], cpu_devices=1, optimized=True)
    assert rc == 0, err[-2000:]
    return workdir, out


@pytest.fixture(scope="session")
def sft_demo_run(clm_demo_run, tmp_path_factory):
    """The demo's SFT run from the CLM checkpoint (tiny preset, 400 steps, full fine-tuning). Returns its workdir."""
    workdir = str(tmp_path_factory.mktemp("sft_demo"))
    rc, _, err = cli.run(["--config=configs/sft.py:tiny", f"--workdir={workdir}",
                          f"--config.init_from=checkpoint:{clm_demo_run[0]}"], cpu_devices=1, optimized=True)
    assert rc == 0, err[-2000:]
    return workdir


@pytest.fixture(scope="session")
def rl_upstream(tmp_path_factory):
    """Quick starting points for RL runs whose learning is not the point: {"clm": a 4-step CLM run (tiny, 200k
    characters), "reward": a 4-step reward model from it}."""
    runs = {"clm": str(tmp_path_factory.mktemp("upstream_clm")), "reward": str(tmp_path_factory.mktemp("upstream_rm"))}
    quick = {"steps": 4, "checkpoint_every": 0, "log_every": 4, "eval_every": 0, "data.batch_size": 4}
    for config, workdir, extra in (
            ("clm", runs["clm"], {"data.max_chars": 200_000, "data.seq_len": 32}),
            ("reward", runs["reward"], {"init_from": f"checkpoint:{runs['clm']}", "eval_at_start": False})):
        rc, _, err = cli.run([f"--config=configs/{config}.py:tiny", f"--workdir={workdir}"] + [
            f"--config.{k}={v}" for k, v in {**quick, **extra}.items()], cpu_devices=1)
        assert rc == 0, err[-2000:]
    return runs


def pytest_configure(config):
    """Tests compile far more than they compute: the quick-compile flags (`cli_helpers.QUICK_COMPILE_FLAGS`) for this
    process and, through its environment, the CLI runs it starts. XLA reads XLA_FLAGS when JAX creates its first
    backend, which no test module does at import. A session that runs `tpu` tests leaves out the XLA CPU flags:
    libtpu parses XLA_FLAGS too, and a flag its XLA does not define ends the process without a word."""
    expr = config.getoption("markexpr") or ""
    tpu = "tpu" in re.findall(r"\w+", expr) and "not tpu" not in expr
    for flag in cli.QUICK_COMPILE_FLAGS.split():
        name = flag.split("=")[0]
        if name in os.environ.get("XLA_FLAGS", "") or (tpu and name.startswith("--xla_cpu_")):
            continue  # a flag the developer set (with any value) is left as set
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def pytest_addoption(parser):
    parser.addoption("--no-skips", action="store_true",
                     help="a skipped test fails (CI: a test that silently stops running is a failure); "
                          "FLAXALIGN_REQUIRE_PARITY=1 in the environment implies it")


def _no_skips(config) -> bool:
    return config.getoption("--no-skips") or os.environ.get("FLAXALIGN_REQUIRE_PARITY") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _no_skips(item.config):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under --no-skips / FLAXALIGN_REQUIRE_PARITY=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _no_skips(collector.config):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped at collection under --no-skips: {reason}"

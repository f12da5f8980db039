"""Every test sees 8 emulated CPU devices; this must run before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from tests import cli_helpers as cli  # noqa: E402


@pytest.fixture(scope="session")
def clm_demo_run(tmp_path_factory):
    """The demo's CLM run: tiny preset, built-in corpus, 300 steps, one CPU device. Returns (workdir, stdout)."""
    workdir = str(tmp_path_factory.mktemp("clm_demo"))
    rc, out, err = cli.run(["--config=configs/clm.py:tiny", f"--workdir={workdir}"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    return workdir, out


@pytest.fixture(scope="session")
def sft_demo_run(clm_demo_run, tmp_path_factory):
    """The demo's SFT run from the CLM checkpoint (tiny preset, 400 steps, full fine-tuning). Returns its workdir."""
    workdir = str(tmp_path_factory.mktemp("sft_demo"))
    rc, _, err = cli.run(["--config=configs/sft.py:tiny", f"--workdir={workdir}",
                          f"--config.init_from=checkpoint:{clm_demo_run[0]}"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    return workdir

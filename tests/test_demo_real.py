"""launch/demo_real.sh at a few steps per stage: SmolLM2-135M-Instruct from its GGUF file through the pipeline's
`smollm2_135m` preset (LoRA SFT, DPO and GRPO, evaluations on held-out questions, the report), then the PEFT and
merged HF exports and, with the parity extra installed, launch/check_export.py's logits check in transformers."""

import importlib.util
import json
import os
import subprocess

import pytest

from tests import cli_helpers as cli

pytestmark = pytest.mark.parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A stage block's args replace the preset's, so each keeps the preset's flags (data specs) and adds its own after
# them (a repeated --config.X: the last one wins).
REDUCED = {
    "sft": "--config.steps=2 --config.data.batch_size=2 --config.data.seq_len=48",
    "dpo": "--config.steps=2 --config.data.batch_size=2 --config.data.seq_len=48 --config.eval_every=0 "
           "--config.eval_at_start=False --config.eval_kl.num_prompts=0",
    "grpo": "--config.steps=1 --config.data.batch_size=2 --config.grpo.group_size=2 --config.grpo.num_minibatches=1 "
            "--config.rollout.max_new_tokens=8",
    "eval": "--config.num_prompts=4 --config.num_examples=2 --config.max_new_tokens=8 --config.batch_size=4 "
            "--config.text_files= --config.mc_file=",
}
TIMEOUT = 1200  # ≈ 4 minutes alone on 2 cores: 11 processes that each load the 135M model


def _preset():
    spec = importlib.util.spec_from_file_location("pipeline_config", os.path.join(REPO, "configs/pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smollm2_135m")


def test_demo_real_runs_the_pipeline_from_the_gguf_and_exports_what_transformers_loads(tmp_path):
    from flaxalign import config_blocks

    if not os.path.isfile(config_blocks.smollm2_gguf()):
        pytest.skip(f"{config_blocks.smollm2_gguf()} not found: run launch/fetch_smollm2.sh.")
    preset = _preset()
    flags = [f"--config.{stage}.args={preset[stage].args} {extra}" for stage, extra in REDUCED.items()]
    workdir = tmp_path / "demo_real"
    # optimised XLA: at SmolLM2-135M's size running outweighs compiling (BUILD_NOTES, "Test-suite time, stop 35")
    proc = subprocess.Popen(["bash", "launch/demo_real.sh", *flags], cwd=REPO,
                            env=cli.env(optimized=True, WORKDIR=str(workdir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        cli.kill_group(proc)
    assert proc.returncode == 0, out[-3000:]

    for stage, steps in (("sft", 2), ("dpo_s0", 2), ("grpo_s0", 1)):
        with open(workdir / stage / "run_summary.json") as f:
            assert json.load(f)["final_step"] == steps  # the reduced flags won over the preset's
    from flaxalign.data.sources import read_records

    train = {r["messages"][0]["content"] for r in read_records(
        "builtin:arithmetic_sft?n=4096&max=99&chat=1&split=train", "sft")}
    for name in ("base", "sft", "dpo_s0", "grpo_s0"):
        with open(workdir / "eval" / name / "eval.json") as f:
            result = json.load(f)
        assert result["metrics"]["exact_match/n"] == 4
        assert result["examples"] and not {e["prompt"] for e in result["examples"]} & train  # held-out questions
    report = (workdir / "report.md").read_text()
    assert "| metric | base (pretrained) | SFT | DPO | GRPO |" in report and "| grpo_s0 | 1 |" in report
    assert (workdir / "exports/dpo_lora/adapter_config.json").is_file()
    assert (workdir / "exports/dpo_merged/config.json").is_file()
    if all(importlib.util.find_spec(name) for name in ("peft", "torch", "transformers")):
        assert out.count("max |logit − run's logit|") == 2, out[-3000:]
    else:
        assert "were not loaded in transformers" in out

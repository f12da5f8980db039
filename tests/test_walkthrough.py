"""README's walkthrough "Your own data on a real model", run end to end on SmolLM2-135M-Instruct with two steps per
stage: fetch → chat → LoRA SFT on own message rows → LoRA DPO from it → convert → transformers / PEFT. Asserts what a
user would trip over: the chat template travels from SFT to DPO to the export (apply_chat_template gives the
training prompt token for token), the HF export has the run's logits and `generate()` stops at the end of the turn,
and the PEFT export names and pins its base (`--merge_parent`: one adapter on the GGUF base with the run's
logits)."""

import json
import os
import re

import numpy as np
import pytest

from tests import cli_helpers as cli
from tests.interop.test_gguf_parity import _find_gguf

pytestmark = pytest.mark.parity

QUESTION = "What is 7 plus 5?"
# The README block's commands, as the test runs them ({gguf} is `$(launch/fetch_smollm2.sh)`, paths relative to
# the test's folder); each must appear in README.md, so that the two cannot drift apart.
COMMANDS = [
    ("generate", f'--checkpoint={{gguf}} --chat_template=chatml --temperature=0 --prompt="{QUESTION}"'),
    ("train", "--config=configs/sft.py:smollm2_135m --workdir=runs/my_sft --config.data.train=my_sft.jsonl"),
    ("train", "--config=configs/dpo.py:smollm2_135m --workdir=runs/my_dpo --config.init_from=checkpoint:runs/my_sft "
              "--config.data.train=my_prefs.jsonl"),
    ("generate", f'--checkpoint=runs/my_dpo --temperature=0 --prompt="{QUESTION}"'),
    ("convert", "--from=runs/my_dpo --to=exports/my_dpo --format=hf"),
    ("convert", "--from={gguf} --to=exports/smollm2 --format=hf"),
    ("convert", "--from=runs/my_dpo --to=exports/my_dpo_lora --format=peft --merge_parent"),
]
# Two steps per stage on CPU: short rows, small batches, no sampled KL eval, the GGUF named directly (and short
# answers from generate).
FAST = {"train": "--config.steps=2 --config.data.seq_len=48 --config.data.batch_size=2 --config.eval_every=0 "
                 "--config.init_from=gguf:{gguf}",
        "dpo": "--config.steps=2 --config.data.seq_len=48 --config.data.batch_size=2 --config.eval_every=0 "
               "--config.eval_kl.num_prompts=0"}
PAIRS = [(f"What is {a} plus {b}?", f"{a + b}.", f"{a + b + 1}.") for a, b in [(2, 3), (4, 4), (6, 1), (3, 5), (9, 2),
                                                                              (1, 1), (5, 5), (8, 3), (2, 7), (6, 6)]]


def _readme_block() -> str:
    text = open(os.path.join(cli.REPO, "README.md")).read()
    block = text.split("#### Your own data on a real model", 1)[1].split("```python", 1)[0]
    return re.sub(r"\s*\\\n\s*", " ", block).replace("$(launch/fetch_smollm2.sh)", "{gguf}")


def _flags(line: str) -> list[str]:
    return [flag.replace('"', "") for flag in re.findall(r'--\S+="[^"]*"|--\S+', line)]


def _write_data(folder) -> None:
    with open(folder / "my_sft.jsonl", "w") as f:
        for question, good, _ in PAIRS:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": good}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(folder / "my_prefs.jsonl", "w") as f:
        for question, good, bad in PAIRS:
            f.write(json.dumps({"prompt": [{"role": "user", "content": question}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")


def test_readme_walkthrough_from_gguf_to_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    gguf = _find_gguf()
    readme = _readme_block()
    for command, args in COMMANDS:
        assert f"flaxalign {command} {args}" in readme, f"README's walkthrough lost: flaxalign {command} {args}"

    _write_data(tmp_path)
    outputs = []
    for index, (command, args) in enumerate(COMMANDS):
        line = args.format(gguf=gguf)
        if command == "train":
            line += " " + (FAST["dpo"] if "dpo.py" in line else FAST["train"].format(gguf=gguf))
        elif command == "generate":
            line += " --max_new_tokens=24"
        flags = [re.sub(r"=(runs|exports|my_)", lambda m: f"={tmp_path}/{m.group(1)}", flag)
                 .replace("checkpoint:runs", f"checkpoint:{tmp_path}/runs") for flag in _flags(line)]
        # optimised XLA: at SmolLM2-135M's size running outweighs compiling (BUILD_NOTES, "Test-suite time, stop 35")
        code, out, err = cli.run(flags, cpu_devices=1, command=command, timeout=600, optimized=True)
        assert code == 0, f"step {index} ({command}) failed:\n{err[-3000:]}"
        outputs.append(out + err)
    run_sft, run_dpo = tmp_path / "runs/my_sft", tmp_path / "runs/my_dpo"
    assert "chat template: chatml, as checkpoint:" in outputs[2]  # DPO inherited SFT's template, and said so

    from flaxalign import weights
    from flaxalign.data.chat import JINJA, render_chat
    from flaxalign.data.tokenizer import load_tokenizer
    from flaxalign.interop import apply_lm
    from flaxalign.interop import peft as peft_dirs

    assert weights.metadata(str(run_sft))["chat_template"] == "chatml"
    assert weights.metadata(str(run_dpo))["chat_template"] == "chatml"
    from flaxalign.generate import model_completer
    assert model_completer(str(run_dpo), max_new_tokens=4).chat_template == "chatml"  # generate's "auto"
    assert model_completer(f"gguf:{gguf}", max_new_tokens=4).chat_template == ""  # pretrained: none recorded

    # The HF export: the training template, token for token; the run's logits; generate() ends the turn.
    exported = str(tmp_path / "exports/my_dpo")
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template == JINJA["chatml"]
    assert weights.metadata(f"hf:{exported}")["chat_template"] == "chatml"  # runs from the export inherit it
    ours = load_tokenizer(weights.metadata(str(run_dpo))["tokenizer"])
    messages = [{"role": "user", "content": QUESTION}]
    trained = render_chat(messages, ours, "chatml", add_generation_prompt=True).ids
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0].tolist() == trained
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    import jax

    from flaxalign import sharding
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        config, params = weights.run_weights(str(run_dpo), mesh)
    tokens = np.asarray([trained], np.int32)
    run_logits = np.asarray(apply_lm(config, params, tokens, np.ones_like(tokens)))
    with torch.no_grad():
        np.testing.assert_allclose(model(**prompt).logits.numpy(), run_logits, atol=2e-4, rtol=0)
        short = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**short, max_new_tokens=48, do_sample=False)
    new = out[0, short["input_ids"].shape[1]:].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(new) < 48, tokenizer.decode(new)

    # The PEFT export: one adapter (8 + 8 ranks) on the GGUF base, named and pinned; PEFT gives the run's logits.
    adapter = str(tmp_path / "exports/my_dpo_lora")
    adapter_config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(gguf) and adapter_config["r"] == 16
    assert "2 chained LoRA runs summed into one adapter" in outputs[6]
    assert transformers.AutoTokenizer.from_pretrained(adapter).chat_template == JINJA["chatml"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exports/smollm2"),
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
        np.testing.assert_allclose(adapted(**prompt).logits.numpy(), run_logits, atol=2e-4, rtol=0)

    # Without --merge_parent the adapter applies to the SFT run's merged weights, and says so; on the GGUF base
    # load_peft_adapter refuses it.
    alone = str(tmp_path / "exports/my_dpo_alone")
    code, out, err = cli.run([f"--from={run_dpo}", f"--to={alone}", "--format=peft"], cpu_devices=1,
                             command="convert")
    assert code == 0 and "applies to the merged weights of the LoRA run" in out, err[-2000:]
    gguf_params = weights.run_weights(f"gguf:{gguf}", mesh)[1]
    from flaxalign import errors
    with pytest.raises(errors.CheckpointError, match="trained on other base weights"):
        peft_dirs.load_peft_adapter(alone, config, jax.device_get(gguf_params))
    assert peft_dirs.load_peft_adapter(adapter, config, jax.device_get(gguf_params))[0].rank == 16

"""Every user error README documents for `flaxalign train` (and the stage config checks behind them) ends the run with
exactly one line `flaxalign: error: …` and exit status 2, no traceback, and leaves an existing checkpoint untouched.

The cases run in-process through the code the CLI runs — `main.parse_flags` for flag errors, `main.train_command`
for the workdir checks, `main.user_errors` around `main.train` for everything a stage decides — so ~50 cases cost
seconds; two representative ones also go through `python -m flaxalign.main` (slow group). The run directories the
stages read (a LoRA CLM run, a reward model) carry the real metadata of tasks built by the stages' own `build_task`,
next to a placeholder state (no case reads weights).
"""

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxalign import main
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from tests import cli_helpers as cli
from tests.config_files import CONFIGS, stage_config


def error_line(capsys, action) -> str:
    """The message after `flaxalign: error: ` of `action()`, which must exit 2 with it as its only error line, last
    on stderr, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        action()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("flaxalign: error: ")] == lines[-1:], err[-2000:]
    return lines[-1].removeprefix("flaxalign: error: ")


def train_error(capsys, stage: str, values: dict, workdir: str) -> str:
    def action():
        with main.user_errors(with_jax=False):  # JAX is set up by conftest (8 CPU devices), as --cpu_devices=8
            main.train(stage_config(stage, values), workdir)
    return error_line(capsys, action)


def _run_directory(stage: str, values: dict, workdir: str) -> None:
    """A run directory as `flaxalign train` leaves it, as far as the checks under test read it: a step-0 checkpoint
    carrying the metadata (model, LoRA, tokenizer, resume identity) of the task the stage's own `build_task` built
    from `values`. The train state saved is a placeholder: every case here stops before weights are read, and
    initialising and saving the real tiny model costs ~140 XLA compiles on 8 devices (~20 s)."""
    from flaxalign import sharding
    from flaxalign.stages import STAGES
    from flaxalign.train.checkpoint import Checkpointer

    config = stage_config(stage, values)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    task = STAGES[stage].build_task(config, workdir, mesh)
    saver = Checkpointer(os.path.join(workdir, "checkpoints"))
    saver.save(0, {"placeholder": np.zeros((), np.float32)}, task.train_data.get_state(), task.metadata)
    saver.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases name: a corpus, its tokenizer, an empty file, bad JSONL files, the run directory of a LoRA CLM
    run (vocab 512) and of a reward model (vocab 1024, the same tokenizer)."""
    root = tmp_path_factory.mktemp("errors")
    docs = stdlib_corpus(max_chars=100_000)
    (root / "corpus.txt").write_text("\n\n".join(docs))
    (root / "empty.txt").write_text("")
    good = json.dumps({"prompt": "What is 2 + 2?", "completion": " The answer is 4."})
    (root / "malformed.jsonl").write_text(good + "\n{\"prompt\": \"What is\n")
    (root / "no_completion.jsonl").write_text(good + "\n" + json.dumps({"prompt": "What is 3 + 3?"}) + "\n")
    pq.write_table(pa.table({"question": ["What is 2 + 2?"], "response": [" The answer is 4."]}),
                   root / "qa.parquet")
    (root / "broken.parquet").write_bytes((root / "qa.parquet").read_bytes()[:-20])  # its footer cut off
    paths = {name.split(".")[0]: str(root / name) for name in (
        "corpus.txt", "empty.txt", "malformed.jsonl", "no_completion.jsonl", "qa.parquet", "broken.parquet")}
    paths["tok"] = Tokenizer.train(docs, str(root / "tok.model"), vocab_size=512).model_path
    paths["clm_run"], paths["rm_run"] = str(root / "clm_lora"), str(root / "rm")
    _run_directory("clm", {"data.train": paths["corpus"], "data.tokenizer": paths["tok"], "data.seq_len": 32,
                           "data.batch_size": 8, "lora.rank": 4}, paths["clm_run"])
    _run_directory("reward", {"data.train": "builtin:arithmetic_preferences?n=16", "data.tokenizer": paths["tok"],
                              "model.vocab_size": 1024, "data.seq_len": 32, "data.batch_size": 8}, paths["rm_run"])
    return paths


SMALL = {"data.seq_len": 32, "data.batch_size": 8, "steps": 0}  # steps 0: a case that does not fail ends at once
QUIET = {"eval_at_start": False}
BASE = {  # a valid run of each stage on 8 devices; each case changes a few fields
    "clm": {"data.train": "{corpus}", "data.tokenizer": "{tok}", **SMALL},
    "sft": {"init_from": "checkpoint:{clm_run}", "data.train": "builtin:arithmetic_sft?n=16", **SMALL, **QUIET},
    "reward": {"data.tokenizer": "{tok}", "data.train": "builtin:arithmetic_preferences?n=32", **SMALL, **QUIET},
    "dpo": {"init_from": "checkpoint:{clm_run}", "data.train": "builtin:arithmetic_preferences?n=32",
            "eval_kl.num_prompts": 0, **SMALL, **QUIET},
    # the RL stages start from a random policy of the reward model's vocabulary, with the same tokenizer
    "ppo": {"data.tokenizer": "{tok}", "model.vocab_size": 1024, "reward_from": "checkpoint:{rm_run}",
            "data.train": "builtin:arithmetic_prompts?n=32", "data.batch_size": 8, "ppo.num_minibatches": 1,
            "eval_prompts": 0, "steps": 0, **QUIET},
    "grpo": {"data.tokenizer": "{tok}", "model.vocab_size": 1024, "data.train": "builtin:arithmetic_prompts?n=32",
             "data.batch_size": 8, "grpo.group_size": 2, "grpo.num_minibatches": 2, "eval_prompts": 0, "steps": 0,
             **QUIET},
    "online_dpo": {"data.tokenizer": "{tok}", "model.vocab_size": 1024, "data.train": "builtin:arithmetic_prompts?n=32",
                   "data.batch_size": 8, "eval_prompts": 0, "steps": 0, **QUIET},
    # a student from scratch taught by the CLM run (its tokenizer)
    "distill": {"teacher_from": "checkpoint:{clm_run}", "data.train": "builtin:arithmetic_prompts?n=32",
                "data.batch_size": 8, "eval_prompts": 0, "steps": 0, **QUIET},
}
# (stage, changed fields, the message). README: "bad flag, unknown config field or preset, missing or empty corpus,
# a mesh that does not divide the devices"; DPO's "loss_type that does not exist, beta <= 0, reference_from with
# another vocabulary"; "a batch that does not divide is an error naming the axes and sizes"; JSONL "one sentence
# naming the file, the line and the field"; the rest are the stages' own checks of their config.
STAGE_CASES = {
    "NaN learning rate": (
        "clm", {"optim.lr": float("nan")},
        "optim.lr=nan must be finite and > 0."),
    "negative learning rate": (
        "sft", {"optim.lr": -1e-4},
        "optim.lr=-0.0001 must be finite and > 0."),
    "beta2 of one": (
        "dpo", {"optim.b2": 1.0},
        "optim.b2=1.0 must be in [0, 1)."),
    "infinite epsilon": (
        "reward", {"optim.eps": float("inf")},
        "optim.eps=inf must be finite and > 0."),
    "missing corpus": (
        "clm", {"data.train": "/no/such/corpus.txt"},
        "data path '/no/such/corpus.txt' does not exist."),
    "empty corpus": (
        "clm", {"data.train": "{empty}"},
        "corpus '{empty}' is empty: the file has no non-blank text."),
    "mesh does not divide the devices": (
        "clm", {"mesh.tensor": 3},
        "mesh axis 'tensor' has size 3, which does not divide the 8 devices."),
    "two free mesh axes": (
        "clm", {"mesh.fsdp": -1},
        "only one mesh axis may be -1, got ['data', 'fsdp'] (config.mesh)."),
    "batch does not divide the mesh": (
        "clm", {"data.batch_size": 4},
        "global batch size dimension 4 (act_batch) is not divisible by mesh axes data of size 8."),
    "batch not divisible by grad_accum": (
        "clm", {"grad_accum": 3},
        "data.batch_size=8 is not divisible by grad_accum=3."),
    "sequence longer than the model": (
        "clm", {"data.seq_len": 257},
        "data.seq_len=257 exceeds model.max_seq_len=256."),
    "unknown stage": (
        "clm", {"stage": "rlhf"},
        "unknown stage 'rlhf'; known stages: ['clm', 'distill', 'dpo', 'grpo', 'online_dpo', 'ppo', 'reward', 'sft']."),
    "init_from of an unknown kind": (
        "clm", {"init_from": "s3:bucket/run"},
        "init_from='s3:bucket/run' is not supported; use checkpoint:DIR (a flaxalign run), hf:DIR (a transformers "
        "model directory) or gguf:FILE."),
    "init_from a missing run": (
        "sft", {"init_from": "checkpoint:/no/such/run"},
        "checkpoint path '/no/such/run' does not exist."),
    "init_from a missing hf directory": (
        "sft", {"init_from": "hf:/no/such/model"},
        "init_from='hf:/no/such/model': '/no/such/model' is not a directory (an HF model directory)."),
    "LoRA and adapters at once": (
        "sft", {"lora.rank": 4, "adapters.placement": "houlsby"},
        "use either LoRA (lora.rank > 0) or bottleneck adapters, not both at once."),
    "unknown quantization": (
        "sft", {"lora.rank": 4, "quantization.base": "fp4"},
        "quantization.base must be one of ['none', 'int8', 'nf4'], not 'fp4'."),
    "quantized base with full fine-tuning": (
        "dpo", {"quantization.base": "nf4"},
        "quantization.base='nf4' stores the frozen base quantized, but full fine-tuning trains every weight: add LoRA "
        "(lora.rank > 0) or adapters, or set quantization.base='none'."),
    "nf4 blocks not dividing a weight's inputs": (
        "sft", {"lora.rank": 4, "quantization.base": "nf4", "quantization.block_size": 128},
        "quantization.base='nf4' needs every quantized weight's input size to be a multiple of "
        "quantization.block_size=128, but layers/attn/k has 64 inputs; use a block_size that divides it or "
        "quantization.base='int8'."),
    "double quantisation of int8": (
        "reward", {"adapters.placement": "houlsby", "quantization.base": "int8", "quantization.double_quant": True},
        "quantization.double_quant quantizes nf4 block scales; set quantization.base='nf4' or turn double_quant off."),
    "LoRA targets matching nothing": (
        "sft", {"lora.rank": 4, "lora.targets": "nothing_like_this"},
        "lora.targets='nothing_like_this' with lora.exclude=[] matches no linear parameter; available: "
        "['layers/attn/k', 'layers/attn/o', 'layers/attn/q', 'layers/attn/v', 'layers/mlp/down', 'layers/mlp/gate', "
        "'layers/mlp/up']."),
    "unknown LoRA variant": (
        "sft", {"lora.rank": 4, "lora.variant": "vera"},
        "lora.variant must be one of ['lora', 'rslora', 'dora'], not 'vera'."),
    "SFT without a tokenizer": (
        "sft", {"init_from": ""},
        "SFT needs a tokenizer: set data.tokenizer, or init_from a run or a model that has one."),
    "tokenizer larger than the vocabulary": (
        "sft", {"init_from": "", "data.tokenizer": "{tok}", "model.vocab_size": 256},
        "the tokenizer has 512 tokens but the model's vocab_size is 256."),
    "Parquet column mapped to a column the file lacks": (
        "sft", {"data.train": "{qa}", "data.columns.prompt": "question", "data.columns.completion": "answer"},
        "{qa} row 0: no column 'answer' (data.columns.completion names it); the file has 'question', 'response'."),
    "truncated Parquet file": (
        "sft", {"data.train": "{broken}"},
        "{broken}: not a readable Parquet file (Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file)."),
    "data.format that has no records of the stage's kind": (
        "dpo", {"data.format": "gsm8k"},
        "data.format=gsm8k gives sft, prompt records, not preference records; use data.format=trl with "
        "data.columns for this stage."),
    "malformed JSONL": (
        "sft", {"data.train": "{malformed}"},
        "{malformed} line 2: malformed JSON (Invalid control character at column 20)."),
    "JSONL record without its field": (
        "sft", {"data.train": "{no_completion}"},
        "{no_completion} line 2: missing field 'completion' (sft records need prompt and completion, or messages)."),
    "unknown loss_type": (
        "dpo", {"loss.loss_type": "dpo2"},
        "unknown loss_type 'dpo2'; valid: sigmoid, robust, hinge, ipo, sigmoid_norm, exo_pair, nca_pair, bco_pair, "
        "sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, orpo, simpo, cpo, kto."),
    "beta not positive": (
        "dpo", {"loss.beta": 0.0},
        "loss.beta must be > 0, got 0.0."),
    "beta negative": (
        "dpo", {"loss.beta": -0.1},
        "loss.beta must be > 0, got -0.1."),
    "robust DPO with label smoothing of one half or more": (
        "dpo", {"loss.loss_type": "robust", "loss.label_smoothing": 0.6},
        "loss_type 'robust' needs label_smoothing < 0.5, got 0.6."),
    "EXO without label smoothing": (
        "dpo", {"loss.loss_type": "exo_pair"},
        "loss_type 'exo_pair' needs 0 < label_smoothing < 1 (EXO recommends 1e-3), got 0.0."),
    "label smoothing of 1": (
        "dpo", {"loss.label_smoothing": 1.0},
        "loss.label_smoothing must be in [0, 1), got 1.0."),
    "unknown reference": (
        "dpo", {"reference": "frozen"},
        "unknown reference 'frozen'; valid: auto, copy, base, precomputed."),
    "base reference without LoRA": (
        "dpo", {"reference": "base"},
        "reference='base' needs LoRA (lora.rank > 0) or adapters; full fine-tuning uses 'copy' or 'precomputed'."),
    "copy reference with LoRA": (
        "dpo", {"reference": "copy", "lora.rank": 4},
        "with LoRA or adapters the reference is the frozen base: use reference='base' or 'precomputed'."),
    "reference_from with the base reference": (
        "dpo", {"reference": "base", "lora.rank": 4, "reference_from": "checkpoint:{clm_run}"},
        "reference_from needs reference='copy' or 'precomputed' (the 'base' reference is the policy's own frozen "
        "base)."),
    "reference_from with another vocabulary": (
        "dpo", {"reference_from": "checkpoint:{rm_run}"},
        "the reference checkpoint {rm_run} has vocab_size=1024 but the policy has 512; the reference model must use "
        "the policy's vocabulary."),
    "eval_kl prompts not dividing the mesh": (
        "dpo", {"eval_kl.num_prompts": 32},
        "eval_kl.num_prompts (held-out prompts, at most the data.eval set) = 3 rows do not split over the mesh: "
        "global batch size dimension 3 (act_batch) is not divisible by mesh axes data of size 8."),
    "eval_kl longer than the model": (
        "dpo", {"data.train": "builtin:arithmetic_preferences?n=80", "eval_kl.num_prompts": 8,
                "eval_kl.max_new_tokens": 300},
        "eval_kl: prompts of 16 tokens + max_new_tokens=300 exceed model.max_seq_len=256."),
    "PPO without a reward model": (
        "ppo", {"reward_from": ""},
        "PPO needs a reward model: set reward_from=checkpoint:DIR (a configs/reward.py run)."),
    "PPO reward_from a policy run": (
        "ppo", {"reward_from": "checkpoint:{clm_run}"},
        "reward_from={clm_run} is a 'clm' run, not a reward model (train one with configs/reward.py)."),
    "PPO reward model of another vocabulary": (
        "ppo", {"model.vocab_size": 512, "init_from": "checkpoint:{clm_run}", "data.tokenizer": ""},
        "the reward checkpoint {rm_run} has vocab_size=1024 but the policy has 512; the reward model must use the "
        "policy's vocabulary."),
    "unknown value_from": (
        "ppo", {"value_from": "critic"},
        "unknown value_from 'critic'; valid: auto, reward, policy."),
    "value model from the reward model with LoRA": (
        "ppo", {"value_from": "reward", "lora.rank": 4},
        "with LoRA or adapters the value model is the policy's frozen base with its own LoRA or adapters: use "
        "value_from='policy' (or 'auto')."),
    "PPO zero epochs": (
        "ppo", {"ppo.epochs": 0},
        "ppo.epochs must be >= 1."),
    "PPO gamma above 1": (
        "ppo", {"ppo.gamma": 1.5},
        "ppo.gamma must be in [0, 1]."),
    "PPO unknown KL estimator": (
        "ppo", {"ppo.kl_estimator": "k4"},
        "ppo.kl_estimator must be one of k1, k2, k3."),
    "greedy rollouts": (
        "ppo", {"rollout.temperature": 0.0},
        "rollout.temperature must be > 0 for on-policy RL, got 0.0."),
    "an unknown KV-cache dtype": (
        "grpo", {"rollout.cache_dtype": "int4"},
        "rollout.cache_dtype='int4' is not one of ['auto', 'bfloat16', 'float32']."),
    "PPO prompt + response longer than the model": (
        "ppo", {"data.max_prompt_len": 250},
        "data.max_prompt_len=250 + rollout.max_new_tokens=16 exceeds model.max_seq_len=256."),
    "PPO batch not split into minibatches": (
        "ppo", {"data.batch_size": 6, "ppo.num_minibatches": 4},
        "data.batch_size = 6 rollout rows must split into 4 minibatches of a multiple of grad_accum=1 rows."),
    "PPO rollout not dividing the mesh": (
        "ppo", {"data.batch_size": 4},
        "data.batch_size (the rollout) = 4 rows do not split over the mesh: global batch size dimension 4 "
        "(act_batch) is not divisible by mesh axes data of size 8."),
    "PPO micro-batch not dividing the mesh": (
        "ppo", {"ppo.num_minibatches": 4},
        "data.batch_size / ppo.num_minibatches / grad_accum (a micro-batch) = 2 rows do not split over the mesh: "
        "global batch size dimension 2 (act_batch) is not divisible by mesh axes data of size 8."),
    "PPO eval prompts not dividing the mesh": (
        "ppo", {"eval_prompts": 64},
        "eval_prompts (held-out prompts, at most the data.eval set) = 1 row does not split over the mesh: global "
        "batch size dimension 1 (act_batch) is not divisible by mesh axes data of size 8."),
    "GRPO without rewards": (
        "grpo", {"rewards": ""},
        "GRPO needs rewards: name reward functions in `rewards` and/or set reward_from."),
    "unknown reward function": (
        "grpo", {"rewards": "exact_answr"},
        "unknown reward function 'exact_answr'; give a built-in (exact_answer, answer_format, answer_closeness) or "
        "'package.module:function'."),
    "reward weights not numbers": (
        "grpo", {"reward_weights": "one"},
        "reward_weights='one' must be comma-separated numbers."),
    "GRPO group of one": (
        "grpo", {"grpo.group_size": 1},
        "grpo.group_size must be >= 2 (the baseline needs other samples)."),
    "distillation without a teacher": (
        "distill", {"teacher_from": ""},
        "distillation needs a teacher: set teacher_from=checkpoint:DIR, hf:DIR or gguf:FILE."),
    "a teacher with another vocabulary": (
        "distill", {"teacher_from": "checkpoint:{rm_run}"},
        "the teacher checkpoint {rm_run} has vocab_size=1024 but the policy has 512; the teacher model must use the "
        "policy's vocabulary."),
    "distillation on dataset completions from prompt records": (
        "distill", {"distill.lmbda": 0.5},
        "builtin:arithmetic_prompts holds prompt records, not sft records."),
    "sequence-level KD with every step on-policy": (
        "distill", {"distill.seq_kd": True},
        "distill.seq_kd samples from the teacher on the 1 − lmbda share of steps that are not on-policy: set "
        "distill.lmbda < 1 (0: always the teacher's samples)."),
    "GRPO with an unknown scale_rewards": (
        "grpo", {"grpo.scale_rewards": "max"},
        "Unknown grpo.scale_rewards 'max'; valid ones: group, batch, none."),
    "online DPO with a reference-free loss": (
        "online_dpo", {"loss.loss_type": "orpo"},
        "Unknown DPO loss_type 'orpo'; valid ones: sigmoid, robust, hinge, ipo, sigmoid_norm, exo_pair, nca_pair, "
        "bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop."),
    "online DPO without rewards": (
        "online_dpo", {"rewards": ""},
        "Online DPO needs rewards: name reward functions in `rewards` and/or set reward_from."),
    "online DPO pairs that do not divide the mesh": (
        "online_dpo", {"data.batch_size": 4},
        "data.batch_size / grad_accum (the pairs of a micro-batch) = 4 rows do not split over the mesh: global batch "
        "size dimension 4 (act_batch) is not divisible by mesh axes data of size 8."),
    "GRPO overlong buffer longer than the response": (
        "grpo", {"grpo.overlong_buffer": 64},
        "grpo.overlong_buffer=64 exceeds rollout.max_new_tokens=12: the penalty ramps over the last tokens of a "
        "response."),
    "GRPO delta with CISPO": (
        "grpo", {"grpo.policy_loss": "cispo", "grpo.delta": 2.0},
        "grpo.delta bounds the clipped surrogate's ratio; policy_loss=cispo caps it with cispo_max_weight."),
    "unknown GRPO algorithm": (
        "grpo", {"grpo.algorithm": "ppo"},
        "Unknown grpo.algorithm 'ppo'; valid ones: grpo, rloo, reinforce_pp, reinforce_pp_baseline."),
    "GRPO prompt + response longer than the model": (
        "grpo", {"rollout.max_new_tokens": 250},
        "data.max_prompt_len=24 + rollout.max_new_tokens=250 exceeds model.max_seq_len=256."),
    "GRPO rows not split into minibatches": (
        "grpo", {"grpo.group_size": 3, "data.batch_size": 3},
        "data.batch_size × group_size = 9 rollout rows must split into 2 minibatches of a multiple of grad_accum=1 "
        "rows."),
    "GRPO prompts not dividing the mesh": (
        "grpo", {"data.batch_size": 2, "grpo.group_size": 8},
        "data.batch_size (the prompts of a rollout) = 2 rows do not split over the mesh: global batch size "
        "dimension 2 (act_batch) is not divisible by mesh axes data of size 8."),
    "GRPO micro-batch not dividing the mesh": (
        "grpo", {"grpo.num_minibatches": 4},
        "data.batch_size × grpo.group_size / grpo.num_minibatches / grad_accum (a micro-batch) = 4 rows do not "
        "split over the mesh: global batch size dimension 4 (act_batch) is not divisible by mesh axes data of size "
        "8."),
    "GRPO eval prompts not dividing the mesh": (
        "grpo", {"eval_prompts": 128},
        "eval_prompts (held-out prompts, at most the data.eval set) = 1 row does not split over the mesh: global "
        "batch size dimension 1 (act_batch) is not divisible by mesh axes data of size 8."),
    "reward normalisation prompts not dividing the mesh": (
        "reward", {"init_from": "checkpoint:{clm_run}", "data.tokenizer": "", "normalize.num_prompts": 64},
        "normalize.num_prompts (held-out prompts, at most the data.eval set) = 3 rows do not split over the mesh: "
        "global batch size dimension 3 (act_batch) is not divisible by mesh axes data of size 8."),
}



def _resolve(values: dict, files: dict) -> dict:
    return {k: v.format(**files) if isinstance(v, str) else v for k, v in values.items()}


@pytest.mark.parametrize("case", sorted(STAGE_CASES))
def test_stage_config_error_is_one_line_exit_2(case, files, tmp_path, capsys):
    stage, changed, expected = STAGE_CASES[case]
    values = _resolve({**BASE[stage], **changed}, files)
    assert train_error(capsys, stage, values, str(tmp_path / "run")) == expected.format(**files)
    assert not os.path.exists(tmp_path / "run" / "checkpoints"), "a refused run wrote a checkpoint"


def _checkpoint_digest(workdir: str) -> str:
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(os.path.join(workdir, "checkpoints"))):
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


RESUME_CASES = {  # README: "a changed model shape is refused with the changed fields named", "a resume with a
    # different [LoRA config] is refused"; the checkpoint is the LoRA CLM run's (rank 4)
    "changed model shape": ({"model.d_ff": 256}, "model.d_ff"),
    "different LoRA rank": ({"lora.rank": 8}, "lora.rank"),
    "different LoRA targets and alpha": ({"lora.targets": "layers/attn/q", "lora.alpha": 8.0},
                                         "lora.alpha, lora.targets"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_with_another_model_is_refused_and_leaves_the_checkpoint(case, files, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(files["clm_run"], workdir)
    before = _checkpoint_digest(workdir)
    changed, fields = RESUME_CASES[case]
    values = _resolve({**BASE["clm"], "lora.rank": 4, **changed}, files)
    assert train_error(capsys, "clm", values, workdir) == (
        f"the checkpoint at step 0 in {workdir}/checkpoints was trained with a different model config (changed: "
        f"{fields}); use a new --workdir or the same model settings.")
    assert _checkpoint_digest(workdir) == before


@pytest.fixture
def parsed_flags():
    """`main.FLAGS` parsed by a case, reset afterwards (the flags are the process's)."""
    yield main.FLAGS
    main.FLAGS.unparse_flags()


CLM = os.path.join(CONFIGS, "clm.py")
FLAG_CASES = {  # argv after `flaxalign train`; README: "bad flag, unknown config field or preset"
    "unknown preset": (
        [f"--config={CLM}:bogus"],
        "unknown preset 'bogus' for configs/clm.py; choose one of ['small', 'tiny']."),
    "missing config file": (
        ["--config=configs/nope.py:tiny"],
        "config file 'configs/nope.py' does not exist (e.g. configs/clm.py:tiny)."),
    "unknown config field": (
        [f"--config={CLM}:tiny", "--config.stepz=3"],
        "unknown config field 'stepz' in a --config.* flag (did you mean 'steps'?)."),
    "unknown nested config field": (
        [f"--config={CLM}:tiny", "--config.optim.learning_rate=3"],
        "unknown config field 'learning_rate' in a --config.* flag."),
    "bad flag value": (
        [f"--config={CLM}:tiny", "--config.steps=many"],
        "flag --config.steps=many: invalid literal for int() with base 10: 'many'"),
    "unknown flag": (
        [f"--config={CLM}:tiny", "--workdirr=x"],
        "Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flag_error_is_one_line_exit_2(case, parsed_flags, monkeypatch, capsys):
    argv, expected = FLAG_CASES[case]
    argv = ["flaxalign", "train", *argv]
    monkeypatch.setattr(sys, "argv", argv)  # as app.run: config_flags reads the --config.* overrides from sys.argv
    assert error_line(capsys, lambda: main.parse_flags(argv)) == expected


COMMAND_CASES = {  # checked before any JAX work; README: "`gs://` workdirs are refused"
    "gs:// workdir": (["--workdir=gs://bucket/run"],
                      "--workdir=gs://bucket/run is a URL; metrics, reports and tokenizers are written with local file "
                      "calls, so use a path (on a pod: a filesystem shared by every host, e.g. a gcsfuse mount of the "
                      "bucket)."),
    "no workdir": ([], "--workdir is required."),
    "no config": (None, "--config is required, e.g. --config=configs/clm.py:tiny."),
}


@pytest.mark.parametrize("case", sorted(COMMAND_CASES))
def test_train_command_error_is_one_line_exit_2(case, parsed_flags, monkeypatch, capsys):
    extra, expected = COMMAND_CASES[case]
    argv = ["flaxalign", "train"] + ([] if extra is None else [f"--config={CLM}:tiny", *extra])
    monkeypatch.setattr(sys, "argv", argv)
    main.parse_flags(argv)
    assert error_line(capsys, main.train_command) == expected


def test_unknown_command_is_one_line_exit_2(capsys):
    assert error_line(capsys, lambda: main.main(["flaxalign", "trian"])) == (
        "expected one command from ['train', 'generate', 'convert', 'constitutional', 'pipeline', 'eval', 'plan'], "
        "got ['trian'].")


def test_help_lists_the_commands_and_each_commands_own_flags(capsys):
    """`flaxalign --help` lists the commands; `flaxalign COMMAND --help` that command's flags, one line each, and
    no other command's; every flag of the CLI belongs to some command (a new flag must be placed), exit 0."""
    defined = {flag.name for flag in main.FLAGS.flags_by_module_dict()[main.__name__]}
    assert set().union(*(names for _, names in main.COMMAND_HELP.values())) == defined
    assert set(main.COMMAND_HELP) == set(main.COMMANDS)

    def help_text(*argv):
        with pytest.raises(SystemExit) as e:
            main.parse_flags(["flaxalign", *argv])
        assert e.value.code == 0
        return capsys.readouterr().out

    listing = help_text("--help")
    assert all(f"  {command} " in listing for command in main.COMMANDS)
    generate = help_text("generate", "--help")
    assert "--system" in generate and "--temperature" in generate and "(default: 0.7)" in generate
    assert "--topology" not in generate and "--overwrite" not in generate and "generate:" not in generate
    assert len([line for line in generate.splitlines() if line.startswith("  --")]) == len(
        main.COMMAND_HELP["generate"][1])
    assert "--config.FIELD=VALUE" in help_text("-h", "train")
    # a flag's value is not a request for help, nor a command
    assert main._words(["generate", "--prompt", "-h", "--system", "plan"]) == ["generate", "--prompt", "--system"]
    assert main._words(["generate", "--overwrite", "-h"]) == ["generate", "--overwrite", "-h"]


SUBPROCESS_CASES = {  # the real entry point: one before JAX starts, one from inside a stage after JAX logged
    "gs:// workdir": (["--config=configs/clm.py:tiny", "--workdir=gs://bucket/run"], COMMAND_CASES["gs:// workdir"][1]),
    "PPO without a reward model": (["--config=configs/ppo.py:tiny", "--workdir={tmp}/run"],
                                   STAGE_CASES["PPO without a reward model"][2]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_cli_prints_one_error_line_and_exits_2(case, tmp_path):
    argv, expected = SUBPROCESS_CASES[case]
    rc, out, err = cli.run([a.format(tmp=tmp_path) for a in argv], cpu_devices=1, timeout=120)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert [line for line in lines if line.startswith("flaxalign: error: ")] == [f"flaxalign: error: {expected}"]
    assert lines[-1] == f"flaxalign: error: {expected}"
    assert not os.path.exists(tmp_path / "run" / "checkpoints")

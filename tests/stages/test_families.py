"""Issue 17's acceptance: training works on every model family in every stage with full weights, LoRA and QLoRA.

Each of four families — Qwen3 (the llama family with q/k norms and head_dim ≠ d/heads), Gemma 3 (q/k norms,
q·k/√scalar, a local RoPE base, windowed layers and a global one), Gemma 2 (no q/k norms, attention and final logit
soft caps, windows on alternate layers) and Phi-3 (a window on every layer, untied head) — at tiny shapes goes
through the whole chain CLM → SFT → reward model → DPO / PPO / GRPO, each stage built by its own `build_task` (the
path `flaxalign train` takes) and trained 2 steps in-process, then saved with `Checkpointer` (with the task's
metadata) into the run directory the next stage reads through `init_from` / `reward_from`. Only the CLM run states
the family's model fields; every later stage takes its architecture from its upstream run, so the family has to come
through the chain.

The training method rotates (`METHOD`): each family trains with full weights, LoRA and QLoRA (an nf4 base) in
two stages each, and each stage trains with all three across the families — so downstream runs also start from LoRA
runs (merged) and QLoRA runs (dequantized and merged). Per run: finite losses, the trained params moved (LoRA's B
factors, which start at zero, all of them, on every linear weight), the frozen base bitwise unchanged with the
family's own norms in it (q/k norms, Gemma's post-attention / post-MLP norms: float32, never quantized), and the
family's fields in the task's metadata (its model config). The offline stages (CLM, SFT, reward model, DPO) take
their steps on one batch, and its loss falls; PPO and GRPO sample a fresh rollout each step.

In the default suite (it is issue 17's acceptance): 24 short runs, ~2.5 minutes on 2 cores, most of it compiling.
"""

import os
import re

import jax
import numpy as np
import pytest

from flaxalign import sharding, weights
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.stages import STAGES as BUILDERS
from flaxalign.train import checkpoint, loop
from flaxalign.train.checkpoint import Checkpointer
from flaxalign.train.jit import CompiledStep
from tests import helpers
from tests.config_files import stage_config

STEPS = 2
# Tiny preset (vocab 512, d_model 64, 4 heads, 2 KV heads, d_ff 192) with each family's fields. Every matmul input
# (64, H·hd = 128, d_ff = 192) is a multiple of nf4's block size 64.
FAMILIES = {
    "qwen3": {"qk_norm": True, "head_dim": 32},
    "gemma3": {"family": "gemma", "n_layers": 3, "qk_norm": True, "head_dim": 32, "query_pre_attn_scalar": 8.0,
               "rope_local_theta": 1000.0, "sliding_window": 16, "full_attention_layers": (2,)},
    "gemma2": {"family": "gemma", "head_dim": 32, "query_pre_attn_scalar": 8.0, "sliding_window": 16,
               "full_attention_layers": (1,), "attn_softcap": 5.0, "final_softcap": 3.0},
    "phi3": {"family": "phi3", "n_kv_heads": 4, "tie_embeddings": False, "sliding_window": 16},
}
METHODS = {"full": {}, "lora": {"lora.rank": 4}, "qlora": {"lora.rank": 4, "quantization.base": "nf4"}}
STAGES = ("clm", "sft", "reward", "dpo", "ppo", "grpo")


def method(family: str, stage: str) -> str:
    """Rotates over full / LoRA / QLoRA: family i, stage j trains with method (i + j) mod 3."""
    return tuple(METHODS)[(list(FAMILIES).index(family) + STAGES.index(stage)) % len(METHODS)]


def test_rotation_covers_every_method_in_every_family_and_every_stage():
    for family in FAMILIES:
        assert {method(family, stage) for stage in STAGES} == set(METHODS), family
    for stage in STAGES:
        assert {method(family, stage) for family in FAMILIES} == set(METHODS), stage


SHAPES = {"data.seq_len": 32, "data.batch_size": 4}
ROLLOUT = {"data.max_prompt_len": 16, "rollout.max_new_tokens": 4, "eval_prompts": 0}
UPSTREAM = {"clm": {}, "sft": {"init_from": "clm"}, "reward": {"init_from": "sft"}, "dpo": {"init_from": "sft"},
            "ppo": {"init_from": "sft", "reward_from": "reward"}, "grpo": {"init_from": "sft", "reward_from": "reward"}}
STAGE_FLAGS = {
    "clm": {"data.train": "{corpus}", "data.eval": "{eval_corpus}", "data.tokenizer": "{tokenizer}", **SHAPES},
    "sft": {"data.train": "builtin:arithmetic_sft?n=32", **SHAPES},
    "reward": {"data.train": "builtin:arithmetic_preferences?n=32", "normalize.num_prompts": 0, **SHAPES},
    "dpo": {"data.train": "builtin:arithmetic_preferences?n=32", "eval_kl.num_prompts": 0, **SHAPES},
    "ppo": {"data.train": "builtin:arithmetic_prompts?n=32", "data.batch_size": 4, "ppo.epochs": 1,
            "ppo.num_minibatches": 2, **ROLLOUT},
    # scored by the reward model only (an untrained policy never answers right: exact_answer would give all-zero
    # advantages)
    "grpo": {"data.train": "builtin:arithmetic_prompts?n=32&max=9", "rewards": "", "data.batch_size": 2,
             "grpo.group_size": 2, "grpo.num_minibatches": 2, **ROLLOUT},
}


class Chains:
    """Each (family, stage) run built, trained and saved once, after the runs it reads from."""

    def __init__(self, root: str, data: dict):
        self.root, self.data = root, data
        self.mesh = helpers.mesh((1, 1, 1))
        self.runs: dict = {}

    def workdir(self, family: str, stage: str) -> str:
        return os.path.join(self.root, family, stage)

    def run(self, family: str, stage: str) -> dict:
        if (family, stage) not in self.runs:
            sources = {field: self.workdir(family, self.run(family, upstream)["stage"])
                       for field, upstream in UPSTREAM[stage].items()}
            self.runs[family, stage] = self._train(family, stage, sources)
        return self.runs[family, stage]

    def _train(self, family: str, stage: str, sources: dict) -> dict:
        values = {"optim.warmup_steps": 0, "optim.lr": 3e-3, "steps": STEPS,
                  **{k: v.format(**self.data) if isinstance(v, str) else v for k, v in STAGE_FLAGS[stage].items()},
                  **METHODS[method(family, stage)],
                  **{field: f"checkpoint:{path}" for field, path in sources.items()}}
        if stage == "clm":  # later stages take the architecture from their init_from run
            values.update({f"model.{k}": v for k, v in FAMILIES[family].items()})
        config = stage_config(stage, values)
        workdir = self.workdir(family, stage)
        task = BUILDERS[stage].build_task(config, workdir, self.mesh)
        task.metadata.update(weights.inherited_metadata(config))  # as `flaxalign train` does

        state, shardings, restored = loop.initial_state(task, 0, self.mesh,
                                                        Checkpointer(os.path.join(workdir, "checkpoints")))
        assert restored is None
        start = jax.tree.map(np.asarray, state)
        step_fn = CompiledStep(task.train_step, self.mesh, shardings)
        losses, batch = [], None
        for step in range(STEPS):
            if task.prepare is not None:  # PPO / GRPO: a rollout of the next prompts, scored
                batch, _ = task.prepare(state, step, sharding.global_batch(next(task.train_data), self.mesh))
            elif batch is None:  # the offline stages: every step on the first batch
                batch = sharding.global_batch(next(task.train_data), self.mesh)
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        saver = Checkpointer(os.path.join(workdir, "checkpoints"))
        saver.save(STEPS, state, task.train_data.get_state(), task.metadata)
        saver.close()
        return {"stage": stage, "metadata": task.metadata, "start": start,
                "state": jax.tree.map(np.asarray, state), "losses": losses}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    docs = stdlib_corpus(max_chars=60_000)
    (root / "corpus.txt").write_text("\n\n".join(docs[1:]))
    (root / "eval.txt").write_text(docs[0])
    tokenizer = Tokenizer.train(docs, str(root / "tok.model"), vocab_size=512)
    return Chains(str(root / "runs"), {"corpus": str(root / "corpus.txt"), "eval_corpus": str(root / "eval.txt"),
                                       "tokenizer": tokenizer.model_path})


def _paths(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_the_family(chains, family, stage):
    run = chains.run(family, stage)
    meta, start, state, losses = run["metadata"], run["start"], run["state"], run["losses"]
    trained = method(family, stage)

    # the family reached the model: every field its CLM run set, through init_from for every later stage
    for key, value in FAMILIES[family].items():
        got = meta["model"][key]
        assert (list(got) if isinstance(got, (tuple, list)) else got) == (
            list(value) if isinstance(value, tuple) else value), (key, got)
    assert meta["model"]["family"] == FAMILIES[family].get("family", "llama")
    assert meta["stage"] == stage
    saved = checkpoint.read_metadata(chains.workdir(family, stage))
    assert saved["model"]["family"] == meta["model"]["family"]

    # the method is the one asked for
    assert bool(meta.get("lora")) == (trained != "full"), meta.get("lora")
    assert ((meta.get("quantization") or {}).get("base", "none") == "nf4") == (trained == "qlora")

    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    if stage not in ("ppo", "grpo"):
        assert losses[-1] < losses[0], losses
    before, after = _paths(start.params), _paths(state.params)
    assert before.keys() == after.keys()
    moved = [k for k in after if not np.array_equal(after[k], before[k])]
    assert moved, "no trained param moved"
    if trained == "full":
        # every weight of the policy (or reward model) is trained; the LM's own matmuls all move
        assert not any("lora" in k for k in after)
        assert any("layers" in k for k in moved), moved
    else:
        lora_b = [k for k in after if "lora" in k and k.endswith("['b']")]
        assert lora_b and all(k in moved for k in lora_b), sorted(set(lora_b) - set(moved))
        # Llama's adapter names on every linear weight of every family (Phi-3's fused tensors are split on load)
        adapted = {match.groups() for k in lora_b for match in [re.search(r"\['(attn|mlp)'\]\['(\w+)'\]", k)]}
        assert adapted == {("attn", n) for n in "qkvo"} | {("mlp", n) for n in ("gate", "up", "down")}, adapted
        assert jax.tree.leaves(start.frozen), "LoRA trains on a frozen base"
        # the family's own norms are frozen base params in float32 (never LoRA targets, never quantized)
        norms = {k: v for k, v in _paths(state.frozen).items() if re.search(r"(q_norm|k_norm|post_\w+_norm)", k)}
        want = {"q_norm", "k_norm"} if FAMILIES[family].get("qk_norm") else set()
        want |= {"post_attn_norm", "post_mlp_norm"} if meta["model"]["family"] == "gemma" else set()
        assert {re.search(r"(q_norm|k_norm|post_\w+_norm)", k).group(1) for k in norms} == want, sorted(norms)
        assert all(v.dtype == np.float32 for v in norms.values()), {k: v.dtype for k, v in norms.items()}
    if trained == "qlora":
        codes = [leaf for leaf in jax.tree.leaves(start.frozen) if leaf.dtype == np.uint8]
        assert codes, "an nf4 base is stored as codes"
    frozen_before, frozen_after = _paths(start.frozen), _paths(state.frozen)
    assert frozen_before.keys() == frozen_after.keys()
    for k in frozen_after:
        np.testing.assert_array_equal(frozen_after[k], frozen_before[k], err_msg=k)

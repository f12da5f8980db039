"""Distillation into a student: GKD (generalized JSD to the teacher over the whole vocabulary) on the student's own
samples (`distill.lmbda` of the steps), the dataset's completions or — `distill.seq_kd` — the teacher's samples
(sequence-level KD). Presets: `tiny` (CPU tests: a one-layer
student from scratch, the tiny teacher's tokenizer).

    flaxalign train --config=configs/distill.py:tiny --workdir=runs/gkd --config.teacher_from=checkpoint:runs/sft
    flaxalign train --config=configs/distill.py:tiny --workdir=runs/gkd_lora --config.init_from=checkpoint:runs/clm \
        --config.teacher_from=checkpoint:runs/sft --config.lora.rank=8 --config.distill.beta=0
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    # a one-layer student (the tiny teacher has two) trained from scratch on the teacher's tokenizer
    "tiny": dict(steps=300, lr=3e-3, batch_size=16, max_prompt_len=24, max_new_tokens=12, n_layers=1),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/distill.py")
    c = ml_collections.ConfigDict()
    c.stage = "distill"
    c.seed = 0
    c.steps = p["steps"]  # iterations: one response per prompt of data.batch_size prompts, one update
    # checkpoint:DIR, hf:DIR or gguf:FILE: the student's starting weights; "" = a random `model`
    c.init_from = p.get("init_from", "")
    # the teacher (checkpoint:DIR, hf:DIR or gguf:FILE), frozen; same vocabulary and tokenizer as the student
    c.teacher_from = ""
    c.model = config_blocks.model(arg, remat=p.get("remat", "minimal"), n_layers=p["n_layers"])

    # prompts (prompt records); batch_size prompts per step
    c.data = config_blocks.prompt_data("builtin:arithmetic_prompts?max=9", max_prompt_len=p["max_prompt_len"],
                                       batch_size=p["batch_size"])
    c.rollout = config_blocks.rollout(p["max_new_tokens"], temperature=0.9)
    # beta: 0 = forward KL(teacher ‖ student), 1 = reverse KL, between = generalized JSD; temperature of both
    # distributions in the loss (1, as TRL's GKD loss; the samples are drawn at rollout.temperature, TRL's 0.9);
    # lmbda: the share of steps on the student's own samples (TRL's default is 0.5); the other steps train on the
    # teacher's samples with seq_kd (sequence-level KD), else on the dataset's completions (then data.train holds
    # sft records: prompt/completion or messages)
    c.distill = ml_collections.ConfigDict(dict(beta=0.5, temperature=1.0, lmbda=1.0, seq_kd=False))

    c.lora = config_blocks.lora()
    c.lora.rank = p.get("lora_rank", 0)
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=0, schedule="constant", final_lr_fraction=1.0, b1=0.9, b2=0.99, eps=1e-8,
        weight_decay=0.0, clip_norm=1.0, total_steps=0))

    c.mesh = config_blocks.mesh()
    c.mesh.data, c.mesh.fsdp = p.get("mesh_data", -1), p.get("mesh_fsdp", 1)
    c.grad_accum = p.get("grad_accum", 1)
    c.loss_chunk = 256
    c.log_every = 5
    c.eval_every = p.get("eval_every", 100)
    c.eval_at_start = True
    c.eval_prompts = p.get("eval_prompts", 128)  # held-out prompts the student answers at every evaluation
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 5
    return c

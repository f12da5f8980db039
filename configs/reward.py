"""Reward model (backbone + scalar head, Bradley–Terry loss), full or LoRA. Presets: `tiny` (CPU tests, the demo).

    flaxalign train --config=configs/reward.py:tiny --workdir=runs/rm --config.init_from=checkpoint:runs/sft
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    "tiny": dict(steps=1200, lr=3e-3, warmup_steps=10, seq_len=64, batch_size=16),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/reward.py")
    c = ml_collections.ConfigDict()
    c.stage = "reward"
    c.seed = 0
    c.steps = p["steps"]
    c.init_from = ""  # checkpoint:DIR of an SFT run: its backbone and tokenizer (the LM head is dropped)
    c.model = config_blocks.model(arg)
    c.center_coef = 0.0  # + c·(r_c + r_r)²: keeps rewards centred at 0 (TRL's center_rewards_coefficient)

    c.data = ml_collections.ConfigDict()
    c.data.train = "builtin:arithmetic_preferences"  # preference records (prompt/chosen/rejected or messages)
    c.data.eval = ""  # "" = hold out eval_fraction of the training records
    c.data.eval_fraction = 0.1
    c.data.max_examples = 0
    c.data.format = "trl"  # trl | hh_rlhf | alpaca | gsm8k | ultrafeedback (flaxalign.data.formats)
    c.data.columns = config_blocks.record_columns()  # {field: your column}; "" = the column of that name
    c.data.tokenizer = ""  # "" = the init_from checkpoint's tokenizer
    c.data.chat_template = ""  # message lists: plain | chatml | llama3 | gemma | jinja (the tokenizer's own) | auto;
    # "" = the init_from run's (else plain)
    c.data.overlong = "truncate_prompt_left"
    c.data.seq_len = p["seq_len"]
    c.data.batch_size = p["batch_size"]

    c.lora = config_blocks.lora()
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)

    # After training: sample the init_from (SFT) policy on held-out prompts; gain/bias make its rewards N(0, 1).
    c.normalize = ml_collections.ConfigDict(dict(num_prompts=64, max_new_tokens=24))

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=p["warmup_steps"], schedule="cosine", final_lr_fraction=0.1, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    c.optim.total_steps = c.get_ref("steps")

    c.mesh = config_blocks.mesh()
    c.grad_accum = 1
    c.loss_chunk = 256
    c.log_every = 10
    c.eval_every = 200
    c.eval_at_start = True
    c.eval_batches = 26  # all 409 held-out pairs of the built-in data at batch 16
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

"""Preference optimisation: DPO and its variants, ORPO, SimPO, CPO and KTO — `loss.loss_type` picks the method.
Presets: `tiny` (CPU tests, the demo), `smollm2_135m` (LoRA DPO of SmolLM2-135M-Instruct from its GGUF file;
fetch it first with launch/fetch_smollm2.sh), `llama3_8b` (LoRA DPO of Llama-3-8B on a TPU pod slice; check the fit
first with `flaxalign plan --config=configs/dpo.py:llama3_8b --topology=v5e:2x4`), `llama3_8b_long` (the same at 4096
tokens per sequence).

    flaxalign train --config=configs/dpo.py:tiny --workdir=runs/dpo --config.init_from=checkpoint:runs/sft
    flaxalign train --config=configs/dpo.py:tiny --workdir=runs/dpo_lora --config.init_from=checkpoint:runs/sft \
        --config.lora.rank=8                         # reference = the base with the adapter off: no copy
    flaxalign train --config=configs/dpo.py:tiny --workdir=runs/ipo --config.init_from=checkpoint:runs/sft \
        --config.loss.loss_type=ipo --config.loss.beta=0.5
    flaxalign train --config=configs/dpo.py:tiny --workdir=runs/kto --config.init_from=checkpoint:runs/sft \
        --config.loss.loss_type=kto --config.data.train=builtin:arithmetic_kto
    flaxalign train --config=configs/dpo.py:smollm2_135m --workdir=runs/smollm2_dpo
"""

import ml_collections

from flaxalign import config_blocks
from flaxalign.losses import preference

PRESETS = {
    "tiny": dict(steps=120, lr=2e-4, warmup_steps=10, seq_len=64, batch_size=16),
    "smollm2_135m": dict(steps=30, lr=5e-5, warmup_steps=3, seq_len=64, batch_size=8, lora_rank=8, eval_every=10,
                         eval_batches=4, eval_kl_prompts=8, init_from=f"gguf:{config_blocks.smollm2_gguf()}"),
    # Llama-3-8B(-Instruct) DPO with LoRA on a TPU pod slice: params, LoRA and optimizer state sharded over every chip
    # (FSDP), activations recomputed in the backward pass, each step's 64 pairs as 4 micro-batches (on v5e:2x4, 16
    # rows of 1024 tokens per chip at once would take 96 % of HBM in activations; 4 take 34 % with the frozen base in
    # bfloat16, 57 % in float32); weights from
    # init_from=hf:DIR (local files).
    "llama3_8b": dict(steps=1000, lr=5e-5, warmup_steps=50, seq_len=1024, batch_size=64, grad_accum=4, lora_rank=16,
                      eval_every=100, eval_batches=8, eval_kl_prompts=32, remat="full", mesh_data=1, mesh_fsdp=-1),
    # The same at 4096 tokens per sequence: 16 pairs per step, one pair per chip at a time on v5e:2x4 (splash
    # attention: 10.4 GiB of 15.75 per chip with the frozen base in float32; dense attention needs 19.5 GiB of
    # temporaries).
    "llama3_8b_long": dict(model="llama3_8b", steps=1000, lr=5e-5, warmup_steps=50, seq_len=4096, batch_size=16,
                           grad_accum=2, lora_rank=16, eval_every=100, eval_batches=8, eval_kl_prompts=32,
                           remat="full", mesh_data=1, mesh_fsdp=-1),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/dpo.py")
    c = ml_collections.ConfigDict()
    c.stage = "dpo"
    c.seed = 0
    c.steps = p["steps"]
    # checkpoint:DIR of an SFT run, hf:DIR or gguf:FILE: the starting policy (and reference) and its tokenizer
    c.init_from = p.get("init_from", "")
    c.model = config_blocks.model(p.get("model", arg), remat=p.get("remat", "minimal"))

    # sigmoid (DPO; label_smoothing > 0 = cDPO) robust hinge ipo sigmoid_norm exo_pair nca_pair bco_pair sppo_hard
    # aot aot_unpaired apo_zero apo_down discopop | orpo simpo cpo (no reference) | kto (unpaired data). The DPO
    # family's own hyper-parameters (label_smoothing, discopop_tau, …) come from its registry.
    c.loss = ml_collections.ConfigDict(dict(
        loss_type="sigmoid", beta=0.1, **preference.DPO_HYPER_DEFAULTS, simpo_gamma=0.5, cpo_alpha=1.0,
        desirable_weight=1.0, undesirable_weight=1.0,
        rpo_alpha=0.0))  # > 0: RPO, + α · the chosen response's NLL per token (TRL's rpo_alpha)
    c.reference = "auto"  # auto | copy (frozen copy) | base (LoRA/adapters off) | precomputed (log-probs stored once)
    c.reference_from = ""  # checkpoint:DIR of another reference model (same vocabulary); "" = the starting policy

    c.data = ml_collections.ConfigDict()
    c.data.train = "builtin:arithmetic_preferences"  # preference records; kto records (or builtin:arithmetic_kto)
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
    c.lora.rank = p.get("lora_rank", 0)
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)

    # KL(policy ‖ reference) on held-out prompts at every evaluation, from sampled responses (0 prompts = off)
    c.eval_kl = ml_collections.ConfigDict(dict(num_prompts=p.get("eval_kl_prompts", 32), max_new_tokens=24))

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=p["warmup_steps"], schedule="cosine", final_lr_fraction=0.1, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    c.optim.total_steps = c.get_ref("steps")

    c.mesh = config_blocks.mesh()
    c.mesh.data, c.mesh.fsdp = p.get("mesh_data", -1), p.get("mesh_fsdp", 1)
    c.grad_accum = p.get("grad_accum", 1)
    c.loss_chunk = 256
    c.log_every = 10
    c.eval_every = p.get("eval_every", 40)
    c.eval_at_start = True
    c.eval_batches = p.get("eval_batches", 26)  # tiny: all 409 held-out pairs of the built-in data at batch 16
    c.checkpoint_every = 40
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

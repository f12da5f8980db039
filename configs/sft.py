"""Supervised fine-tuning: full, LoRA, adapters or QLoRA. Presets: `tiny` (CPU tests, the demo pipeline),
`smollm2_135m` (LoRA SFT of SmolLM2-135M-Instruct from its GGUF file; fetch it first with launch/fetch_smollm2.sh),
`llama3_8b_qlora` (QLoRA SFT of Llama-3-8B on one TPU v5e chip: an NF4 base with LoRA r=16, sequences of 2048;
check the fit with `flaxalign plan --config=configs/sft.py:llama3_8b_qlora --topology=v5e:1x1`), `llama3_8b_long`
(LoRA SFT of Llama-3-8B on sequences of 8192 tokens, FSDP over a v5e:2x4 slice).

    flaxalign train --config=configs/sft.py:tiny --workdir=runs/sft --config.init_from=checkpoint:runs/clm
    flaxalign train --config=configs/sft.py:tiny --workdir=runs/sft_lora --config.init_from=checkpoint:runs/clm \
        --config.lora.rank=8
    flaxalign train --config=configs/sft.py:smollm2_135m --workdir=runs/smollm2_sft
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    "tiny": dict(steps=400, lr=3e-3, warmup_steps=10, seq_len=128, batch_size=16),
    "smollm2_135m": dict(steps=30, lr=3e-4, warmup_steps=3, seq_len=128, batch_size=8, lora_rank=8, eval_every=10,
                         eval_batches=4, init_from=f"gguf:{config_blocks.smollm2_gguf()}", chat_template="chatml"),
    # QLoRA (Dettmers et al. 2023) of Llama-3-8B on a single 16 GiB chip: the NF4 base (double-quantized scales)
    # holds 4.1 bits per weight, 8 sequences of 2048 tokens per step as 8 micro-batches of 1, activations
    # recomputed in the backward pass; weights from init_from=hf:DIR (quantized as they load).
    "llama3_8b_qlora": dict(model="llama3_8b", steps=1000, lr=2e-4, warmup_steps=30, seq_len=2048, batch_size=8,
                            grad_accum=8, lora_rank=16, quantization="nf4", remat="full", eval_every=100,
                            eval_batches=4, chat_template="llama3"),
    # Long-context LoRA SFT of Llama-3-8B on a TPU pod slice: 64 sequences of 8192 tokens per step as 8 micro-batches
    # (one sequence per chip at a time on v5e:2x4, FSDP over every chip), activations recomputed; attention never holds
    # a [T, T] matrix (splash on TPU): 10.3 GiB of 15.75 per chip (frozen base in float32), where dense attention
    # needs 21 GiB of temporaries.
    "llama3_8b_long": dict(model="llama3_8b", steps=1000, lr=2e-4, warmup_steps=30, seq_len=8192, batch_size=64,
                           grad_accum=8, lora_rank=16, remat="full", eval_every=100, eval_batches=4,
                           chat_template="llama3", mesh_data=1, mesh_fsdp=-1),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/sft.py")
    c = ml_collections.ConfigDict()
    c.stage = "sft"
    c.seed = 0
    c.steps = p["steps"]
    # checkpoint:DIR of a CLM/SFT run, hf:DIR or gguf:FILE: the model, weights and tokenizer; "" = random init
    c.init_from = p.get("init_from", "")
    # used only without init_from; compute settings (dtype, remat, …) always apply
    c.model = config_blocks.model(p.get("model", arg), remat=p.get("remat", "minimal"))

    c.data = ml_collections.ConfigDict()
    c.data.train = "builtin:sft"  # sft records: prompt+completion or messages (JSONL, tfds:NAME, builtin:sft)
    # more sft record specs (comma-separated, TRL layout) mixed into train in proportion to their sizes, e.g.
    # builtin:sft?n=1000 to keep a task-tuned model a language model
    c.data.mix = ""
    c.data.eval = ""  # "" = hold out eval_fraction of the training records
    c.data.eval_fraction = 0.05
    c.data.max_examples = 0  # 0 = all
    c.data.format = "trl"  # trl | hh_rlhf | alpaca | gsm8k | ultrafeedback (flaxalign.data.formats)
    c.data.columns = config_blocks.record_columns()  # {field: your column}; "" = the column of that name
    c.data.tokenizer = ""  # "" = the init_from checkpoint's tokenizer
    # message lists: plain | chatml | llama3 | gemma | jinja (the tokenizer's own) | auto; "" = the init_from
    # run's (else plain)
    c.data.chat_template = p.get("chat_template", "")
    c.data.overlong = "truncate_prompt_left"  # or "drop"; counted in the data log line
    c.data.seq_len = p["seq_len"]
    c.data.batch_size = p["batch_size"]

    c.lora = config_blocks.lora()
    c.lora.rank = p.get("lora_rank", 0)

    # Bottleneck adapters on the frozen base instead (placement houlsby | pfeiffer); named sets for multi-task.
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)
    c.quantization.base = p.get("quantization", "none")
    c.quantization.double_quant = c.quantization.base == "nf4"

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=p["warmup_steps"], schedule="cosine", final_lr_fraction=0.1, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    c.optim.total_steps = c.get_ref("steps")

    c.mesh = config_blocks.mesh()
    c.mesh.data, c.mesh.fsdp = p.get("mesh_data", -1), p.get("mesh_fsdp", 1)
    c.grad_accum = p.get("grad_accum", 1)
    c.loss_chunk = 256
    c.log_every = 10
    c.eval_every = p.get("eval_every", 100)
    c.eval_at_start = True
    c.eval_batches = p.get("eval_batches", 8)
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

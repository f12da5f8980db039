"""Causal-LM pretraining. Presets: `tiny` (CPU tests and the demo), `small` (benchmark shapes).

    flaxalign train --config=configs/clm.py:tiny --workdir=runs/clm --config.steps=200
"""

import ml_collections

from flaxalign import config_blocks, errors

DATA = {
    "tiny": dict(seq_len=128, batch_size=16, max_chars=1_500_000),
    "small": dict(seq_len=256, batch_size=8, max_chars=0),
}
TRAIN = {
    "tiny": dict(steps=300, lr=3e-3, warmup_steps=20),
    "small": dict(steps=2000, lr=1e-3, warmup_steps=100),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in DATA:
        raise errors.ConfigError(f"unknown preset {arg!r} for configs/clm.py; choose one of {sorted(DATA)}.")
    c = ml_collections.ConfigDict()
    c.stage = "clm"
    c.seed = 0
    c.steps = TRAIN[arg]["steps"]
    c.init_from = ""  # checkpoint:DIR continues pretraining from another run (its model, weights, tokenizer)
    c.model = config_blocks.model(arg)

    c.data = ml_collections.ConfigDict()
    c.data.train = "builtin:stdlib"  # a text file, folder or glob; builtin:stdlib = Python's own documentation
    c.data.eval = ""  # "" = hold out eval_fraction of the training documents
    c.data.eval_fraction = 0.02
    c.data.format = "trl"  # trl | hh_rlhf | alpaca | gsm8k | ultrafeedback (flaxalign.data.formats)
    c.data.columns = config_blocks.record_columns()  # {field: your column}; "" = the column of that name
    c.data.max_chars = DATA[arg]["max_chars"]  # 0 = the whole corpus
    c.data.tokenizer = ""  # a sentencepiece .model; "" = train one into the workdir
    c.data.vocab_size = c.model.get_ref("vocab_size")
    c.data.seq_len = DATA[arg]["seq_len"]
    c.data.batch_size = DATA[arg]["batch_size"]  # global, in sequences

    # Parameter-efficient training on a frozen base (as in configs/sft.py): LoRA (rank > 0) or bottleneck adapters.
    c.lora = config_blocks.lora()
    c.adapters = config_blocks.adapters()
    c.quantization = config_blocks.quantization()  # the frozen base as int8 / nf4 (QLoRA)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = TRAIN[arg]["lr"]
    c.optim.warmup_steps = TRAIN[arg]["warmup_steps"]
    c.optim.total_steps = c.get_ref("steps")
    c.optim.schedule = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.mesh = config_blocks.mesh()
    c.grad_accum = 1
    c.loss_chunk = 256  # sequence positions per chunk of the LM-head + cross-entropy

    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 8
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.max_nonfinite_steps = 5  # consecutive steps with a NaN/inf loss or grad norm (skipped) before the run stops
    return c

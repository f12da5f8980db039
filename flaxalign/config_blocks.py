"""The config blocks every stage's config file shares (`configs/*.py`, ml_collections), so that a LoRA, adapter,
mesh or prompt-data field is defined once for all stages."""

import dataclasses
import os

import ml_collections

from flaxalign import errors
from flaxalign.data import formats
from flaxalign.models.config import ADAPTER_FIELDS, ModelConfig, preset

MODELS_ENV = "FLAXALIGN_MODELS"  # where fetched weights live (launch/fetch_*.sh write there, presets read there)
SMOLLM2_FILE = os.path.join("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # from launch/fetch_smollm2.sh
GEMMA3_FILE = os.path.join("gemma3", "gemma-3-270m-q4_k_m.gguf")  # from launch/fetch_gemma3.sh


def models_dir() -> str:
    """The one place presets look for fetched weights: $FLAXALIGN_MODELS, default the repository's .cache/."""
    return os.path.abspath(os.environ.get(MODELS_ENV) or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache"))


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct (GGUF) where launch/fetch_smollm2.sh puts it; the smollm2_135m presets start from it."""
    return os.path.join(models_dir(), SMOLLM2_FILE)


def gemma3_gguf() -> str:
    """Gemma-3-270M (Q4_K_M GGUF) where launch/fetch_gemma3.sh puts it (Gemma terms: fetched, never committed)."""
    return os.path.join(models_dir(), GEMMA3_FILE)


def preset_values(arg: str, presets: dict, config_file: str) -> dict:
    """`presets[arg]`, or a ConfigError naming the file and its presets."""
    if arg not in presets:
        raise errors.ConfigError(f"unknown preset {arg!r} for {config_file}; choose one of {sorted(presets)}.")
    return presets[arg]


def model(name: str, **values) -> ml_collections.ConfigDict:
    """The `model` block: every architecture and compute field of `ModelConfig` (so that any of them, e.g.
    `--config.model.remat=full` or the shape of another preset, can be set from the command line), the preset's
    values, compute dtype "auto" (bfloat16 on GPU/TPU, float32 on CPU), then `values`. Adapter fields live in the
    `adapters` block."""
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in ADAPTER_FIELDS}
    return ml_collections.ConfigDict({**fields, **preset(name), "dtype": "auto", **values})


def lora() -> ml_collections.ConfigDict:
    """LoRA on the frozen base (`rank` 0 = off); see `flaxalign.peft.lora.LoraConfig`."""
    return ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, targets="all-linear", exclude=[], variant="lora", dropout=0.0, init="kaiming",
        rank_pattern={}, alpha_pattern={}, modules_to_save=[]))


def adapters() -> ml_collections.ConfigDict:
    """Bottleneck adapters trained on a frozen base (`placement` "none" = off)."""
    return ml_collections.ConfigDict(dict(
        placement="none", reduction=16, names=["task"], active="", activation="relu"))


def quantization() -> ml_collections.ConfigDict:
    """How the frozen base of LoRA / adapters is stored (`base` "none" = in model.frozen_dtype; "int8" or "nf4":
    QLoRA); see
    `flaxalign.peft.quant.QuantConfig`."""
    return ml_collections.ConfigDict(dict(base="none", block_size=64, double_quant=False))


def rollout(max_new_tokens: int, temperature: float) -> ml_collections.ConfigDict:
    """How an RL stage samples (`onpolicy.Sampling`): up to `max_new_tokens` at `temperature`, top-k / top-p off;
    `cache_dtype` the KV cache's dtype (auto = the compute dtype; bfloat16 halves the cache's memory under float32
    compute — slower on a CPU, which converts bfloat16 in software — and the learner still recomputes its log-probs
    in the compute dtype)."""
    return ml_collections.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                                          cache_dtype="auto"))


def mesh() -> ml_collections.ConfigDict:
    """Mesh axis sizes; -1 = all remaining devices."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def record_columns() -> ml_collections.ConfigDict:
    """The `data.columns` block: every field a `data.format` reads, mapped to the file's column ("" = same name),
    so `--config.data.columns.prompt=question` works from the command line."""
    return ml_collections.ConfigDict(formats.columns_block())


def record_format() -> ml_collections.ConfigDict:
    """A `format` + `columns` block for a record file that is not under `data` (eval's prompts)."""
    return ml_collections.ConfigDict(dict(format="trl", columns=record_columns()))


def prompt_data(train: str, *, max_prompt_len: int, batch_size: int) -> ml_collections.ConfigDict:
    """The `data` block of the RL stages: `prompt` records, left-truncated to `max_prompt_len` (counted)."""
    return ml_collections.ConfigDict(dict(
        train=train,  # prompt records {"prompt", "answer"?} (JSONL, tfds:NAME, builtin:...)
        eval="",  # "" = hold out eval_fraction of the training records
        eval_fraction=0.05, max_examples=0,
        format="trl",  # trl | hh_rlhf | alpaca | gsm8k | ultrafeedback (flaxalign.data.formats)
        columns=record_columns(),  # {field: your column}; "" = the column of that name
        tokenizer="",  # "" = the init_from checkpoint's tokenizer
        # message-list prompts: plain | chatml | llama3 | gemma | jinja (the tokenizer's own) | auto;
        # "" = the init_from run's (else plain)
        chat_template="",
        max_prompt_len=max_prompt_len, batch_size=batch_size))

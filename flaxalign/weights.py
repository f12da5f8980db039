"""Where a stage's weights come from, below the stages: `init_from`, `reference_from`, `reward_from`, the weights of
a finished run (for generation, evaluation, conversion) and their metadata.

A *source* is a flaxalign run directory (`checkpoint:DIR`, or a bare path) or pretrained weights (`hf:DIR`,
`gguf:FILE`, see `interop/pretrained.py`). Every loader reads into given shardings, so no full copy is made on one
device first. A run's model is rebuilt from its metadata as the `TrainableModel` it trained (full, LoRA, adapters,
quantized base), so any of them reads back the same way: `run_weights` merges LoRA and dequantizes a quantized base.
"""

import hashlib
import json
import os
from collections.abc import Callable

import jax

from flaxalign import errors, models, sharding
from flaxalign.interop import hf, pretrained
from flaxalign.models import adapters, heads
from flaxalign.peft import lora, quant
from flaxalign.policy import UNUSED_BY_SCALAR, TrainableModel
from flaxalign.train import checkpoint

REWARD_NORMALIZATION_FILE = "reward_normalization.json"


# --- naming a source -------------------------------------------------------------------------------------------


def parse_source(spec: str, field: str = "init_from") -> str:
    """The source of `checkpoint:DIR` (a flaxalign run: DIR), `hf:DIR` or `gguf:FILE` (the spec itself)."""
    kind, _, path = spec.partition(":")
    if kind == "checkpoint" and path:
        return path
    if kind in pretrained.KINDS and path:
        return spec
    raise errors.ConfigError(
        f"{field}={spec!r} is not supported; use checkpoint:DIR (a flaxalign run), hf:DIR (a transformers model "
        "directory) or gguf:FILE.")


def source_of(spec: str) -> str:
    """The source of a command-line path: `checkpoint:DIR`, `hf:DIR`, `gguf:FILE`, or a bare path — a file ending in
    .gguf, a directory with config.json and no checkpoints/ (an HF model) or a flaxalign run."""
    if spec.partition(":")[0] in ("checkpoint", *pretrained.KINDS):
        return parse_source(spec, "checkpoint")
    if spec.endswith(".gguf"):
        return f"gguf:{spec}"
    if os.path.isfile(os.path.join(spec, "config.json")) and not os.path.isdir(os.path.join(spec, "checkpoints")):
        return f"hf:{spec}"
    return spec


def directory_of(source: str) -> str:
    """The folder or file a source names."""
    return source.partition(":")[2] if pretrained.is_pretrained(source) else source


def metadata(source: str) -> dict:
    """A run's checkpoint metadata, or the model config and tokenizer of pretrained weights."""
    return pretrained.metadata(source) if pretrained.is_pretrained(source) else checkpoint.read_metadata(source)


def resolve_model(config) -> tuple[models.ModelConfig, dict, str]:
    """(model config, metadata of the `init_from` source or {}, the source or ""). With `init_from` the
    architecture is the source's and only compute settings (dtype, attention, remat, scan) come from this config;
    the `adapters` block adds bottleneck adapters on top."""
    source = parse_source(config.init_from) if config.get("init_from") else ""
    meta = metadata(source) if source else {}
    if source:
        compute = {k: config.model[k] for k in models.config.COMPUTE_ONLY_FIELDS if k in config.model}
        values = {**meta["model"], **compute}
    else:
        values = config.model.to_dict()
    return models.ModelConfig.from_dict({**values, **adapter_fields(config)}), meta, source


def inherited_metadata(config) -> dict:
    """Run-metadata entries a stage takes over from its `init_from` source (`flaxalign train` adds them to every
    run's metadata): `hf_source`, the HF family, special ids and window spelling of the HF or GGUF model at the start
    of the chain (`interop.hf_config.source_fields`), so that `convert --format=hf` writes a model started from a
    Mistral as a Mistral however many runs later. {} without a source or when the source has none (random init, a
    run from before it was kept)."""
    if not config.get("init_from"):
        return {}
    kept = metadata(parse_source(config.init_from)).get(hf.SOURCE_FIELD)
    return {hf.SOURCE_FIELD: kept} if kept else {}


def adapter_fields(config) -> dict:
    """Model-config fields for bottleneck adapters trained on a frozen base (`adapters.placement` != "none")."""
    block = config.get("adapters")
    if block is None or block.placement == "none":
        return {}
    names = tuple(block.names)
    return {"adapter_placement": block.placement, "adapter_reduction": int(block.reduction),
            "adapter_names": names, "adapter_activation": block.activation,
            "active_adapter": block.active or names[0]}


def trainable_model(config, model_config: models.ModelConfig, *, drop: tuple = (), seed: int | None = None
                    ) -> TrainableModel:
    """The model a stage config trains: its `lora` and `quantization` blocks on `model_config` (which carries the
    `adapters` block)."""
    block = config.get("lora")
    lora_config = lora.LoraConfig.from_dict(block) if block is not None and block.rank else None
    quant_block = config.get("quantization")
    quant_config = quant.QuantConfig.from_dict(quant_block) if quant_block is not None else None
    return TrainableModel(model_config, lora_config, quant_config, drop=drop,
                          seed=config.seed if seed is None else seed)


def same_vocabulary(policy_meta: dict, source: str, model_config: models.ModelConfig, field: str) -> dict:
    """The model config (as a dict) of a run that must score the policy's tokens — a reference or reward model —
    after checking its vocabulary size and tokenizer are the policy's."""
    meta = metadata(source)
    vocab = meta.get("model", {}).get("vocab_size")
    if vocab != model_config.vocab_size:
        raise errors.ConfigError(
            f"the {field} checkpoint {source} has vocab_size={vocab} but the policy has {model_config.vocab_size}; "
            f"the {field} model must use the policy's vocabulary.")
    theirs, ours = meta.get("tokenizer", ""), policy_meta.get("tokenizer", "")
    # compared only when the policy's tokenizer is on this machine (`plan` may run where it is not; training then
    # stops at loading it, with its own error)
    if theirs and ours and os.path.exists(ours) and _file_digest(theirs) != _file_digest(ours):
        raise errors.ConfigError(
            f"the {field} checkpoint {source} was trained with tokenizer {theirs}, which differs from the policy's "
            f"{ours}; the {field} model must use the policy's vocabulary.")
    # its own architecture and adapter sets (the active one included), the policy's compute settings
    theirs_model = {k: v for k, v in meta.get("model", {}).items()
                    if k not in models.config.COMPUTE_ONLY_FIELDS or k in models.config.ADAPTER_FIELDS}
    return {**model_config.without_adapters().to_dict(), **theirs_model}


def policy_tokenizer(config, meta: dict) -> dict:
    """{"tokenizer": the path of the tokenizer a stage speaks} (`data.tokenizer`, else the `init_from` source's, else
    ""), the `policy_meta` `same_vocabulary` compares a reference, reward model or teacher with."""
    return {"tokenizer": config.data.get("tokenizer", "") or meta.get("tokenizer", "")}


def _file_digest(path: str) -> str:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")  # a tokenizer folder is its tokenizer.json (`load_tokenizer`)
    if not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- a run's weights -------------------------------------------------------------------------------------------


def run_model(meta: dict, *, drop: tuple = (), **compute) -> TrainableModel:
    """The `TrainableModel` a run trained, from its checkpoint metadata (`compute` overrides compute-only fields)."""
    model_config = models.ModelConfig.from_dict({**meta["model"], **compute})
    lora_config = lora.LoraConfig.from_dict(meta["lora"]) if meta.get("lora") else None
    quant_config = quant.QuantConfig.from_dict(meta["quantization"]) if meta.get("quantization") else None
    return TrainableModel(model_config, lora_config, quant_config, drop=drop)


def _run_parts(path: str, model: TrainableModel, meta: dict, mesh) -> tuple:
    """(trained part, frozen part) of `model` as a run saved them, read into their shardings."""
    params_part, frozen_part = checkpoint.model_parts(meta)
    trained = checkpoint.load_params(
        path, model.abstract_trainable,
        sharding.tree_shardings(model.trainable_logical, model.abstract_trainable, mesh), part=params_part)
    frozen = {}
    if model.frozen_base:
        frozen = checkpoint.load_params(
            path, model.abstract_frozen, sharding.tree_shardings(model.frozen_logical, model.abstract_frozen, mesh),
            part=frozen_part)
    return trained, frozen


def run_weights(path: str, mesh, **compute) -> tuple[models.ModelConfig, dict]:
    """(model config, float32 params in their shardings) of the policy a run trained — CLM, SFT, DPO, PPO or GRPO;
    full, LoRA (merged), a quantized base (dequantized) or bottleneck adapters (kept, the run's active set on) —
    for generation, evaluation and export. `compute` overrides compute-only model fields (e.g. dtype)."""
    meta = metadata(path)
    if meta.get("stage") == "reward":
        raise errors.ConfigError(f"{path} is a reward model; it scores sequences and cannot generate.")
    if pretrained.is_pretrained(path):
        model_config = models.ModelConfig.from_dict({**meta["model"], **compute})
        _, abstract, logical = models.abstract_model(model_config)
        return model_config, pretrained.initializer(path)(sharding.tree_shardings(logical, abstract, mesh))
    model = run_model(meta, **compute)
    trained, frozen = _run_parts(path, model, meta, mesh)
    _, abstract, logical = models.abstract_model(model.config)
    merged = jax.jit(model.merged, out_shardings=sharding.tree_shardings(logical, abstract, mesh))(trained, frozen)
    return model.config, merged


def run_parts(path: str, mesh, *, drop: tuple = ()) -> tuple[TrainableModel, dict, dict]:
    """(the run's model, its trained part, its frozen part), unmerged: e.g. a LoRA run's adapters for a PEFT export."""
    meta = metadata(path)
    model = run_model(meta, drop=drop)
    return (model, *_run_parts(path, model, meta, mesh))


def initializer(model_config: models.ModelConfig, source: str, *, drop: tuple = ()) -> Callable | None:
    """`init(shardings) -> params` reading the starting weights of a run or pretrained source into the float32 base
    layout of `model_config` (no adapter sets; less the top-level params in `drop`), or None without a source
    (random init). A LoRA run's adapters are merged and a quantized base dequantized on the way."""
    if not source:
        return None
    if pretrained.is_pretrained(source):
        return pretrained.initializer(source, drop)
    meta = checkpoint.read_metadata(source)
    source_drop = drop + tuple(d for d in UNUSED_BY_SCALAR if meta.get("stage") == "reward" and d not in drop)
    model = run_model(meta, drop=source_drop)
    if model.config.adapter_placement != "none":
        raise errors.ConfigError(
            f"{source} trained bottleneck adapters, which cannot be merged into its weights; start from the run it "
            "started from, or use the adapters run itself with `flaxalign generate`/`eval`.")
    if not model.frozen_base:  # full fine-tuning: its trained params are the model
        return _full_run_initializer(source, model_config, checkpoint.model_parts(meta)[0], drop)

    def init(shardings):
        mesh = jax.tree.leaves(shardings)[0].mesh
        trained, frozen = _run_parts(source, model, meta, mesh)
        return jax.jit(model.merged, out_shardings=shardings)(trained, frozen)

    return init


def _full_run_initializer(source: str, model_config: models.ModelConfig, part: str, drop: tuple) -> Callable:
    """`init(shardings, quantizer=None)` reading a full-fine-tuning run's params; with a `quantizer` one weight at a
    time, each layer weight quantized before the next is read (the float32 base never whole on the devices)."""
    _, abstract, logical = models.abstract_model(model_config)
    abstract, logical = ({k: v for k, v in tree.items() if k not in drop} for tree in (abstract, logical))
    if model_config.adapter_placement != "none":
        abstract, logical = adapters.split_trainable(abstract)[1], adapters.split_trainable(logical)[1]

    def init(shardings, quantizer=None):
        if quantizer is None:
            return checkpoint.load_params(source, abstract, shardings, part=part)
        mesh = jax.tree.leaves(shardings)[0].mesh
        float_shardings = lora.flatten_paths(sharding.tree_shardings(logical, abstract, mesh))
        out = {}
        for path, leaf in lora.flatten_paths(abstract).items():
            value = checkpoint.load_params(source, leaf, float_shardings[path], part=f"{part}/{path}")
            quantized = quantizer.stacked(path, value)
            out[path] = value if quantized is None else quantized
        return lora.unflatten_paths(out)

    init.quantizes = True
    return init


# --- reward models ---------------------------------------------------------------------------------------------


def reward_model(source: str, model_config: models.ModelConfig):
    """(abstract params, logical axes, loader(shardings) -> params) of a reward model — a reward run trained fully,
    with LoRA (merged), a quantized base (dequantized) or adapters (kept, its active set on), or an `hf:`
    `*ForSequenceClassification` directory — as `{"model": backbone, "head": head}`, frozen, for scoring.
    `model_config` is the reward model's own (`reward_from`)."""
    _, abstract, logical = models.abstract_model(model_config)
    drop = UNUSED_BY_SCALAR
    abstract_rm = {"model": {k: v for k, v in abstract.items() if k not in drop},
                   "head": heads.abstract_scalar_head(model_config.d_model)}
    logical_rm = {"model": {k: v for k, v in logical.items() if k not in drop}, "head": heads.HEAD_LOGICAL}
    if pretrained.is_pretrained(source):
        return abstract_rm, logical_rm, pretrained.reward_initializer(source, drop=drop)

    def load(shardings):
        mesh = jax.tree.leaves(shardings)[0].mesh
        meta = metadata(source)
        model = run_model(meta, drop=drop)
        trained, frozen = _run_parts(source, model, meta, mesh)
        return {"model": jax.jit(model.merged, out_shardings=shardings["model"])(trained, frozen),
                "head": checkpoint.load_params(source, abstract_rm["head"], shardings["head"], part="params/head")}

    return abstract_rm, logical_rm, load


def reward_from(source: str, policy_meta: dict, policy_config: models.ModelConfig):
    """(reward model config, abstract params, logical axes, loader) of `reward_from`: a reward run or a
    `*ForSequenceClassification` directory that scores the policy's tokens."""
    meta = metadata(source)
    if meta.get("stage") != "reward":
        raise errors.ConfigError(f"reward_from={source} is a {meta.get('stage')!r} run, not a reward model "
                                 "(train one with configs/reward.py).")
    rm_config = models.ModelConfig.from_dict(same_vocabulary(policy_meta, source, policy_config, "reward"))
    return (rm_config, *reward_model(source, rm_config))


def reward_normalization(source: str) -> dict:
    """{"gain", "bias", …} of a reward run (`reward_normalization.json` in its workdir), or gain 1 / bias 0 when it
    was trained without normalisation (or is pretrained)."""
    path = os.path.join(directory_of(source), REWARD_NORMALIZATION_FILE)
    if not os.path.exists(path):
        return {"gain": 1.0, "bias": 0.0}
    with open(path) as f:
        return json.load(f)

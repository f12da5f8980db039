"""What the language-modelling stages (CLM, SFT) share: the masked token loss over full, LoRA or adapter params,
their train/eval steps, and the task builder with `init_from`. CLM and SFT differ only in their data.

Trained params: everything (full training), the LoRA leaves (`lora.rank > 0`; plus `lora.modules_to_save`), or the
bottleneck adapters (`adapters.placement`); in the last two the base is frozen in `state.frozen` and never copied.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp

from flaxalign import errors, models, sharding
from flaxalign.data.loader import BatchIterator
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.losses.lm import token_cross_entropy
from flaxalign.models import adapters
from flaxalign.peft import lora
from flaxalign.stages import pretrained
from flaxalign.train import checkpoint
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task


def clm_loss(params, frozen, batch, rng, *, graphdef, chunk_size, layer_transform=None):
    """(Σ token losses, (loss-token count, {})) of one batch of packed sequences. `layer_transform`: see
    `CausalLM.__call__` (LoRA applied per layer)."""
    del frozen, rng  # the CLM loss uses neither
    model = models.merge(graphdef, params)
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], layer_transform=layer_transform)
    loss_sum, count = token_cross_entropy(hidden, model.unembedding(), batch["targets"], batch["loss_mask"],
                                          chunk_size=chunk_size)
    return loss_sum, (count, {})


def model_params(trainable, frozen, rng, *, lora_config, adapters_only=False):
    """(params, layer_transform) of the trained model, for `CausalLM.__call__`: the trained params themselves (full
    training), the bottleneck adapters joined to the frozen base, or — with LoRA — the frozen base with
    `trainable["saved"]` (modules trained fully) put in and `trainable["lora"]` applied. The base is never copied:
    scanned layers are adapted inside the layer scan, one layer at a time, so adapted weights and their full-size
    gradients never exist for the whole stack at once. LoRA dropout runs only when an rng is given (training)."""
    if adapters_only:
        return adapters.join(trainable, frozen), None
    if lora_config is None:
        return trainable, None
    lora_tree = trainable["lora"]
    base = lora.replace_leaves(frozen, trainable["saved"])
    layer_rng, top_rng = jax.random.split(rng) if rng is not None and lora_config.dropout > 0 else (None, None)
    top = {k: v for k, v in lora_tree.items() if k != "layers"}  # e.g. an adapted lm_head
    params = lora.apply_lora(base, top, lora_config, dropout_rng=top_rng) if top else base
    if "layers" not in lora_tree:
        return params, None
    n_layers = jax.tree.leaves(base["layers"])[0].shape[0]
    rngs = None if layer_rng is None else jax.random.split(layer_rng, n_layers)

    def adapt_layer(layer_params, extra):
        lora_layer, rng_layer = extra
        return lora.apply_lora({"layers": layer_params}, {"layers": lora_layer}, lora_config,
                               dropout_rng=rng_layer)["layers"]

    return params, (adapt_layer, (lora_tree["layers"], rngs))


def lm_loss(trainable, frozen, batch, rng, *, graphdef, chunk_size, lora_config, adapters_only=False):
    """The masked token cross-entropy of the model whose params are `trainable` (full fine-tuning), the LoRA leaves
    on the frozen base, or the bottleneck adapters of a frozen base (`adapters_only`); see `model_params`."""
    params, layer_transform = model_params(trainable, frozen, rng, lora_config=lora_config,
                                           adapters_only=adapters_only)
    return clm_loss(params, None, batch, rng, graphdef=graphdef, chunk_size=chunk_size,
                    layer_transform=layer_transform)


def lm_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int, chunk_size: int, lora_config,
             adapters_only=False):
    """One optimizer update of the trained params (all weights, the LoRA leaves or the bottleneck adapters)."""
    loss_fn = functools.partial(lm_loss, graphdef=graphdef, chunk_size=chunk_size, lora_config=lora_config,
                                adapters_only=adapters_only)
    return gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)


def lm_eval_step(state, batch, *, graphdef, chunk_size, lora_config, adapters_only=False):
    loss_sum, (count, _) = lm_loss(state.params, state.frozen, batch, None, graphdef=graphdef,
                                    chunk_size=chunk_size, lora_config=lora_config, adapters_only=adapters_only)
    return {"loss": loss_sum, "count": count}


def data_iterators(train: dict, evaluation: dict, config):
    """(shuffled train iterator, eval-batch factory) over a stage's row arrays, this process's share of each global
    batch of `config.data.batch_size`; the factory yields up to `config.eval_batches` unshuffled eval batches."""
    batch_size = config.data.batch_size
    if batch_size % jax.process_count():
        raise errors.ConfigError(
            f"data.batch_size={batch_size} is not divisible by the {jax.process_count()} processes.")
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train_data = BatchIterator(train, batch_size, seed=config.seed, shuffle=True, **process)

    def eval_batches():
        n = min(config.eval_batches, math.ceil(len(next(iter(evaluation.values()))) / batch_size))
        it = BatchIterator(evaluation, batch_size, seed=0, shuffle=False, **process)
        return (next(it) for _ in range(n))

    return train_data, eval_batches


def adapter_fields(config) -> dict:
    """Model-config fields for bottleneck adapters trained on a frozen base (`adapters.placement` != "none")."""
    block = config.get("adapters")
    if block is None or block.placement == "none":
        return {}
    names = tuple(block.names)
    return {"adapter_placement": block.placement, "adapter_reduction": int(block.reduction),
            "adapter_names": names, "adapter_activation": block.activation,
            "active_adapter": block.active or names[0]}


def parse_init_from(spec: str, field: str = "init_from") -> str:
    """The weights source of `checkpoint:DIR` (a flaxalign run: DIR), `hf:DIR` or `gguf:FILE` (pretrained weights:
    the spec itself, see `stages/pretrained.py`)."""
    kind, _, path = spec.partition(":")
    if kind == "checkpoint" and path:
        return path
    if kind in pretrained.KINDS and path:
        return spec
    raise errors.ConfigError(
        f"{field}={spec!r} is not supported; use checkpoint:DIR (a flaxalign run), hf:DIR (a transformers model "
        "directory) or gguf:FILE.")


def weights_source(spec: str) -> str:
    """The weights source of a command-line path: `checkpoint:DIR`, `hf:DIR`, `gguf:FILE`, or a bare path — a file
    ending in .gguf, a directory with config.json and no checkpoints/ (an HF model) or a flaxalign run."""
    if spec.partition(":")[0] in ("checkpoint", *pretrained.KINDS):
        return parse_init_from(spec, "checkpoint")
    if spec.endswith(".gguf"):
        return f"gguf:{spec}"
    if os.path.isfile(os.path.join(spec, "config.json")) and not os.path.isdir(os.path.join(spec, "checkpoints")):
        return f"hf:{spec}"
    return spec


def source_metadata(source: str) -> dict:
    """The metadata of a weights source: a run's checkpoint metadata, or the model config and tokenizer of
    pretrained weights."""
    return pretrained.metadata(source) if pretrained.is_pretrained(source) else checkpoint.read_metadata(source)


def resolve_model(config) -> tuple[models.ModelConfig, dict, str]:
    """(model config, metadata of the `init_from` source or {}, the source or ""). With `init_from` the
    architecture is the source's and only compute settings (dtype, attention, remat, scan) come from this config;
    the `adapters` block adds bottleneck adapters on top."""
    init_path = parse_init_from(config.init_from) if config.get("init_from") else ""
    meta = source_metadata(init_path) if init_path else {}
    if init_path:
        compute = {k: config.model[k] for k in models.config.COMPUTE_ONLY_FIELDS if k in config.model}
        values = {**meta["model"], **compute}
    else:
        values = config.model.to_dict()
    return models.ModelConfig.from_dict({**values, **adapter_fields(config)}), meta, init_path


def stage_tokenizer(config, meta: dict, model_config: models.ModelConfig, stage: str):
    """The tokenizer of a stage: `data.tokenizer`, else the `init_from` run's; its ids must fit the model's vocab."""
    path = config.data.tokenizer or meta.get("tokenizer", "")
    if not path:
        raise errors.ConfigError(f"{stage} needs a tokenizer: set data.tokenizer, or init_from a run or a model "
                                 "that has one.")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise errors.ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size}.")
    return tokenizer


def lora_from(config):
    block = config.get("lora")
    return lora.LoraConfig.from_dict(block) if block is not None and block.rank else None


def without(tree: dict, drop: tuple) -> dict:
    return {k: v for k, v in tree.items() if k not in drop}


def base_initializer(model_config: models.ModelConfig, init_path: str, *, drop: tuple = ()):
    """`init_base(shardings)` reading the base weights of the `init_from` run (less the top-level params named in
    `drop`, e.g. a reward model's unused `lm_head`), or None (random init)."""
    if not init_path:
        return None
    if pretrained.is_pretrained(init_path):
        return pretrained.initializer(init_path, drop)
    meta = checkpoint.read_metadata(init_path)
    lora_of_run = meta.get("lora")
    if lora_of_run:
        return functools.partial(merged_lora_weights, init_path, model_config,
                                 lora.LoraConfig.from_dict(lora_of_run), drop)
    _, abstract_base, _ = models.abstract_model(model_config)
    abstract_base = without(abstract_base, drop)
    if model_config.adapter_placement != "none":  # the checkpoint holds the base only
        abstract_base = adapters.split_trainable(abstract_base)[1]
    return functools.partial(checkpoint.load_params, init_path, abstract_base, part=checkpoint.model_parts(meta)[0])


def abstract_lora_params(abstract_base, base_logical, lora_config):
    """(ShapeDtypeStructs, logical axes) of the LoRA params, without allocating them."""
    logical = {}

    def init(params):
        lora_params, logical["axes"] = lora.init_lora(params, base_logical, lora_config, jax.random.PRNGKey(0))
        return lora_params

    return jax.eval_shape(init, abstract_base), logical["axes"]


def lora_run_weights(path: str, model_config: models.ModelConfig, lora_config, mesh, drop: tuple = ()):
    """(frozen base, {"lora": adapters, "saved": modules trained fully}) of a LoRA run, in their shardings."""
    _, abstract, logical = models.abstract_model(model_config)
    abstract, logical = without(abstract, drop), without(logical, drop)
    params_part, frozen_part = checkpoint.model_parts(checkpoint.read_metadata(path))
    base = checkpoint.load_params(path, abstract, sharding.tree_shardings(logical, abstract, mesh), part=frozen_part)
    abstract_lora, lora_logical = abstract_lora_params(abstract, logical, lora_config)
    saved = lora.modules_to_save_paths(abstract, lora_config)
    abstract_trained = {"lora": abstract_lora, "saved": lora.select_leaves(abstract, saved)}
    trained_logical = {"lora": lora_logical, "saved": lora.select_leaves(logical, saved)}
    trained = checkpoint.load_params(path, abstract_trained,
                                     sharding.tree_shardings(trained_logical, abstract_trained, mesh), part=params_part)
    return base, trained


def merged_lora_weights(path: str, model_config: models.ModelConfig, lora_config, drop: tuple, shardings):
    """The full weights of a LoRA run: its frozen base with its `modules_to_save` put in and its LoRA merged,
    created in `shardings` (so DPO or a reward model can start from a LoRA SFT run)."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    base, trained = lora_run_weights(path, model_config, lora_config, mesh, drop)

    def merge(base, trained):
        return lora.merge(lora.replace_leaves(base, trained["saved"]), trained["lora"], lora_config)

    return jax.jit(merge, out_shardings=shardings)(base, trained)


def load_run_weights(path: str, mesh, **compute) -> tuple[models.ModelConfig, dict]:
    """(model config, full params in their shardings) of the policy a run trained — CLM, SFT or DPO, full, LoRA
    (merged) or bottleneck adapters (kept, the run's active set on) — for generation and evaluation. `compute`
    overrides compute-only model fields (e.g. dtype)."""
    meta = source_metadata(path)
    if meta.get("stage") == "reward":
        raise errors.ConfigError(f"{path} is a reward model; it scores sequences and cannot generate.")
    model_config = models.ModelConfig.from_dict({**meta["model"], **compute})
    _, abstract, logical = models.abstract_model(model_config)
    if model_config.adapter_placement != "none":
        trained, base = adapters.split_trainable(abstract)
        trained_logical, base_logical = adapters.split_trainable(logical)
        params = adapters.join(
            checkpoint.load_params(path, trained, sharding.tree_shardings(trained_logical, trained, mesh)),
            checkpoint.load_params(path, base, sharding.tree_shardings(base_logical, base, mesh), part="frozen"))
        return model_config, params
    return model_config, base_initializer(model_config, path)(sharding.tree_shardings(logical, abstract, mesh))


def param_layout(model_config: models.ModelConfig, lora_config=None, *, seed: int = 0, init_base=None,
                 reference_copy: bool = False, drop: tuple = ()) -> dict:
    """Which params a stage trains and which it keeps frozen, as the `Task` fields `abstract_params`,
    `params_logical`, `init_params`, `abstract_frozen`, `frozen_logical`, `init_frozen`.

    Trained: everything (frozen = {}, or with `reference_copy` a frozen copy of the starting weights: the reference
    model of DPO-style stages), the LoRA leaves (`lora_config`; frozen = the base), or the bottleneck adapters (when
    the model config has an adapter placement; frozen = the base). In the last two the frozen base doubles as the
    reference model, with no copy. `init_base(shardings) -> params` gives the starting weights (random if None).
    Top-level params named in `drop` (e.g. the `lm_head` a reward model does not use) are left out."""
    adapters_only = model_config.adapter_placement != "none"
    if adapters_only and lora_config is not None:
        raise errors.ConfigError("use either LoRA (lora.rank > 0) or bottleneck adapters, not both at once.")
    _, abstract_full, full_logical = models.abstract_model(model_config)
    abstract_full, full_logical = without(abstract_full, drop), without(full_logical, drop)
    abstract_base, base_logical = abstract_full, full_logical
    if adapters_only:
        abstract_adapters, abstract_base = adapters.split_trainable(abstract_full)
        adapter_logical, base_logical = adapters.split_trainable(full_logical)
    def base_only(params):
        params = without(params, drop)
        return adapters.split_trainable(params)[1] if adapters_only else params

    init_base = init_base or (lambda shardings: models.init_params(model_config, seed, shardings, select=base_only))
    if adapters_only:
        return {
            "abstract_params": abstract_adapters, "params_logical": adapter_logical,
            "init_params": lambda shardings, frozen: models.init_params(
                model_config, seed, shardings, select=lambda p: adapters.split_trainable(without(p, drop))[0]),
            "abstract_frozen": abstract_base, "frozen_logical": base_logical, "init_frozen": init_base}
    if lora_config is None and reference_copy:
        return {"abstract_params": abstract_base, "params_logical": base_logical,
                    "init_params": lambda shardings, frozen: jax.jit(
                        lambda f: jax.tree.map(jnp.copy, f), out_shardings=shardings)(frozen),
                    "abstract_frozen": abstract_base, "frozen_logical": base_logical, "init_frozen": init_base}
    if lora_config is None:
        return {"abstract_params": abstract_base, "params_logical": base_logical,
                    "init_params": lambda shardings, frozen: init_base(shardings)}
    abstract_lora, lora_logical = abstract_lora_params(abstract_base, base_logical, lora_config)
    saved = lora.modules_to_save_paths(abstract_base, lora_config)

    def init_trained(shardings, frozen):
        def create(base):
            lora_params, _ = lora.init_lora(base, base_logical, lora_config, jax.random.PRNGKey(seed))
            return {"lora": lora_params, "saved": jax.tree.map(jnp.copy, lora.select_leaves(base, saved))}
        return jax.jit(create, out_shardings=shardings)(frozen)

    return {"abstract_params": {"lora": abstract_lora, "saved": lora.select_leaves(abstract_base, saved)},
                "params_logical": {"lora": lora_logical, "saved": lora.select_leaves(base_logical, saved)},
                "init_params": init_trained, "abstract_frozen": abstract_base, "frozen_logical": base_logical,
                "init_frozen": init_base}


def resume_identity(model_config: models.ModelConfig, lora_config, **more) -> dict:
    """What a checkpoint must have been trained with to be resumed by this run."""
    return {"model": model_config.checkpoint_identity(), "lora": lora_config.to_dict() if lora_config else None,
            **more}


def make_task(name: str, model_config: models.ModelConfig, optim_cfg, *, lora_config=None, seed: int = 0,
              grad_accum: int = 1, chunk_size: int = 256, init_base=None, train_data=None, eval_batches=None,
              tokens_per_step: int = 0, flops_per_step: float = 0.0, metadata: dict | None = None) -> Task:
    """The task of an LM stage (`name`: "clm", "sft"). `init_base(shardings) -> params` gives the starting weights
    (random if None). Trained params: see `param_layout`."""
    layout = param_layout(model_config, lora_config, seed=seed, init_base=init_base)
    graphdef, _, _ = models.abstract_model(model_config)
    optimizer = make_optimizer(optim_cfg)
    step_kwargs = {"graphdef": graphdef, "chunk_size": chunk_size, "lora_config": lora_config,
                       "adapters_only": model_config.adapter_placement != "none"}
    identity = resume_identity(model_config, lora_config)
    return Task(
        name=name, optimizer=optimizer,
        train_step=functools.partial(lm_step, optimizer=optimizer, schedule=learning_rate_schedule(optim_cfg),
                                     grad_accum=grad_accum, **step_kwargs),
        eval_step=functools.partial(lm_eval_step, **step_kwargs),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step,
        metadata={"stage": name, "model": model_config.to_dict(), "resume_identity": identity,
                  "lora": identity["lora"], **(metadata or {})},
        **layout)

"""Supervised fine-tuning: L = −Σ_t m_t log p_θ(y_t | x, y_<t), the mask m on completion (or assistant) tokens only,
normalised by the global number of loss tokens. Full fine-tuning, or LoRA on a frozen base (`lora.rank > 0`)."""

import functools
import math

import jax
import jax.numpy as jnp

from flaxalign import errors, models
from flaxalign.models import adapters
from flaxalign.data.loader import BatchIterator
from flaxalign.data.sft_data import build_sft_datasets
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.peft import lora
from flaxalign.stages.checks import check_shapes
from flaxalign.stages.clm import clm_loss
from flaxalign.train import checkpoint
from flaxalign.train.optim import learning_rate_schedule, make_optimizer
from flaxalign.train.step import gradient_step
from flaxalign.train.task import Task


def sft_loss(trainable, frozen, batch, rng, *, graphdef, chunk_size, lora_config, adapters_only=False):
    """The masked token cross-entropy of the model whose params are `trainable` (full fine-tuning) or, with LoRA,
    the frozen base with `trainable["saved"]` (modules trained fully) put in and `trainable["lora"]` applied — the
    base is never copied. The scanned layers are adapted inside the layer scan, one layer at a time, so adapted
    weights and their full-size gradients never exist for the whole stack at once. LoRA dropout runs in training
    steps only (eval passes no rng). With `adapters_only`, `trainable` is the bottleneck adapters of a frozen base."""
    if adapters_only:
        return clm_loss(adapters.join(trainable, frozen), None, batch, rng, graphdef=graphdef, chunk_size=chunk_size)
    if lora_config is None:
        return clm_loss(trainable, None, batch, rng, graphdef=graphdef, chunk_size=chunk_size)
    lora_tree = trainable["lora"]
    base = lora.replace_leaves(frozen, trainable["saved"])
    layer_rng, top_rng = jax.random.split(rng) if rng is not None and lora_config.dropout > 0 else (None, None)
    top = {k: v for k, v in lora_tree.items() if k != "layers"}  # e.g. an adapted lm_head
    params = lora.apply_lora(base, top, lora_config, dropout_rng=top_rng) if top else base
    layer_transform = None
    if "layers" in lora_tree:
        n_layers = jax.tree.leaves(base["layers"])[0].shape[0]
        rngs = None if layer_rng is None else jax.random.split(layer_rng, n_layers)

        def adapt_layer(layer_params, extra):
            lora_layer, rng_layer = extra
            return lora.apply_lora({"layers": layer_params}, {"layers": lora_layer}, lora_config,
                                   dropout_rng=rng_layer)["layers"]

        layer_transform = (adapt_layer, (lora_tree["layers"], rngs))
    return clm_loss(params, None, batch, rng, graphdef=graphdef, chunk_size=chunk_size,
                    layer_transform=layer_transform)


def sft_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int, chunk_size: int, lora_config,
             adapters_only=False):
    """One optimizer update of the trained params (all weights, the LoRA leaves or the bottleneck adapters)."""
    loss_fn = functools.partial(sft_loss, graphdef=graphdef, chunk_size=chunk_size, lora_config=lora_config,
                                adapters_only=adapters_only)
    return gradient_step(loss_fn, state, batch, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)


def sft_eval_step(state, batch, *, graphdef, chunk_size, lora_config, adapters_only=False):
    loss_sum, (count, _) = sft_loss(state.params, state.frozen, batch, None, graphdef=graphdef,
                                    chunk_size=chunk_size, lora_config=lora_config, adapters_only=adapters_only)
    return {"loss": loss_sum, "count": count}


def _adapter_fields(config) -> dict:
    """Model-config fields for bottleneck adapters trained on a frozen base (`adapters.placement` != "none")."""
    block = config.get("adapters")
    if block is None or block.placement == "none":
        return {}
    names = tuple(block.names)
    return {"adapter_placement": block.placement, "adapter_reduction": int(block.reduction),
            "adapter_names": names, "adapter_activation": block.activation,
            "active_adapter": block.active or names[0]}


def _parse_init_from(spec: str) -> str:
    kind, _, path = spec.partition(":")
    if kind != "checkpoint" or not path:
        raise errors.ConfigError(
            f"init_from={spec!r} is not supported; use checkpoint:DIR (a CLM or SFT workdir).")
    return path


def abstract_lora_params(abstract_base, base_logical, lora_config):
    """(ShapeDtypeStructs, logical axes) of the LoRA params, without allocating them."""
    logical = {}

    def init(params):
        lora_params, logical["axes"] = lora.init_lora(params, base_logical, lora_config, jax.random.PRNGKey(0))
        return lora_params

    return jax.eval_shape(init, abstract_base), logical["axes"]


def make_task(model_config: models.ModelConfig, optim_cfg, *, lora_config=None, seed: int = 0,
              grad_accum: int = 1, chunk_size: int = 256, init_base=None, train_data=None, eval_batches=None,
              tokens_per_step: int = 0, flops_per_step: float = 0.0, metadata: dict | None = None) -> Task:
    """The SFT task. `init_base(shardings) -> params` gives the starting weights (random if None). Trained params:
    everything (full fine-tuning), the LoRA leaves (`lora_config`), or the bottleneck adapters (when the model
    config has an adapter placement; the base is frozen)."""
    adapters_only = model_config.adapter_placement != "none"
    if adapters_only and lora_config is not None:
        raise errors.ConfigError("use either LoRA (lora.rank > 0) or bottleneck adapters, not both at once.")
    graphdef, abstract_full, full_logical = models.abstract_model(model_config)
    abstract_base, base_logical = abstract_full, full_logical
    if adapters_only:
        abstract_adapters, abstract_base = adapters.split_trainable(abstract_full)
        adapter_logical, base_logical = adapters.split_trainable(full_logical)
    base_only = (lambda p: adapters.split_trainable(p)[1]) if adapters_only else None
    init_base = init_base or (lambda shardings: models.init_params(model_config, seed, shardings, select=base_only))
    optimizer = make_optimizer(optim_cfg)
    step_kwargs = dict(graphdef=graphdef, chunk_size=chunk_size, lora_config=lora_config, adapters_only=adapters_only)
    identity = {"model": model_config.checkpoint_identity(),
                "lora": lora_config.to_dict() if lora_config else None}
    if adapters_only:
        trained = dict(
            abstract_params=abstract_adapters, params_logical=adapter_logical,
            init_params=lambda shardings, frozen: models.init_params(
                model_config, seed, shardings, select=lambda p: adapters.split_trainable(p)[0]),
            abstract_frozen=abstract_base, frozen_logical=base_logical, init_frozen=init_base)
    elif lora_config is None:
        trained = dict(abstract_params=abstract_base, params_logical=base_logical,
                       init_params=lambda shardings, frozen: init_base(shardings))
    else:
        abstract_lora, lora_logical = abstract_lora_params(abstract_base, base_logical, lora_config)
        saved = lora.modules_to_save_paths(abstract_base, lora_config)

        def init_trained(shardings, frozen):
            def create(base):
                lora_params, _ = lora.init_lora(base, base_logical, lora_config, jax.random.PRNGKey(seed))
                return {"lora": lora_params, "saved": jax.tree.map(jnp.copy, lora.select_leaves(base, saved))}
            return jax.jit(create, out_shardings=shardings)(frozen)

        trained = dict(abstract_params={"lora": abstract_lora, "saved": lora.select_leaves(abstract_base, saved)},
                       params_logical={"lora": lora_logical, "saved": lora.select_leaves(base_logical, saved)},
                       init_params=init_trained, abstract_frozen=abstract_base, frozen_logical=base_logical,
                       init_frozen=init_base)
    return Task(
        name="sft", optimizer=optimizer,
        train_step=functools.partial(sft_step, optimizer=optimizer, schedule=learning_rate_schedule(optim_cfg),
                                     grad_accum=grad_accum, **step_kwargs),
        eval_step=functools.partial(sft_eval_step, **step_kwargs),
        train_data=train_data, eval_batches=eval_batches, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step,
        metadata={"stage": "sft", "model": model_config.to_dict(), "resume_identity": identity,
                  "lora": identity["lora"], **(metadata or {})},
        **trained)


def build_task(config, workdir: str, mesh) -> Task:
    """Model and tokenizer from `init_from` (a CLM/SFT run), SFT data from `data.train`, LoRA from `lora`."""
    data_cfg = config.data
    init_path = _parse_init_from(config.init_from) if config.init_from else ""
    meta = checkpoint.read_metadata(init_path) if init_path else {}
    if init_path:  # the architecture is the checkpoint's; only compute settings come from this config
        compute = {k: config.model[k] for k in models.config.COMPUTE_ONLY_FIELDS if k in config.model}
        model_values = {**meta["model"], **compute}
    else:
        model_values = config.model.to_dict()
    model_config = models.ModelConfig.from_dict({**model_values, **_adapter_fields(config)})
    tokenizer_path = data_cfg.tokenizer or meta.get("tokenizer", "")
    if not tokenizer_path:
        raise errors.ConfigError("SFT needs a tokenizer: set data.tokenizer or init_from=checkpoint:DIR.")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise errors.ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size}.")
    check_shapes(config, model_config, mesh)
    lora_config = lora.LoraConfig.from_dict(config.lora) if config.lora.rank else None

    data = build_sft_datasets(data_cfg, tokenizer)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_data = BatchIterator(data.train, data_cfg.batch_size, seed=config.seed, shuffle=True, **process)

    def eval_batches():
        n = min(config.eval_batches, math.ceil(len(data.eval["inputs"]) / data_cfg.batch_size))
        it = BatchIterator(data.eval, data_cfg.batch_size, seed=0, shuffle=False, **process)
        return (next(it) for _ in range(n))

    tokens = data_cfg.batch_size * data_cfg.seq_len
    _, abstract_base, _ = models.abstract_model(model_config)
    if model_config.adapter_placement != "none":  # the checkpoint holds the base only
        abstract_base = adapters.split_trainable(abstract_base)[1]
    init_base = None
    if init_path:
        init_base = functools.partial(checkpoint.load_params, init_path, abstract_base)
    return make_task(
        model_config, config.optim, lora_config=lora_config, seed=config.seed, grad_accum=config.grad_accum,
        chunk_size=config.loss_chunk, init_base=init_base, train_data=train_data, eval_batches=eval_batches,
        tokens_per_step=tokens, flops_per_step=tokens * model_config.flops_per_token(data_cfg.seq_len),
        metadata={"tokenizer": tokenizer.model_path, "init_from": config.init_from, "data": data.stats})

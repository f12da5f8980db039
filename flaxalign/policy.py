"""The models a stage trains, as roles: one `TrainableModel` owns full fine-tuning, LoRA, bottleneck adapters and a
quantized frozen base (QLoRA), so that stages never branch on the method.

A trainable model is built from (ModelConfig, LoRA config or None, quantization config or None); bottleneck
adapters are the model config's `adapter_placement`. It owns

    the param layout   trained part (abstract, logical axes, init) and frozen part (the base, possibly quantized)
    the forward        `model(trainable, frozen, rng)`: a `CausalLM` whose adapted weights compute in activation
                       space (LoRA), dequantize per layer (QLoRA) or run the active adapter set
    the reference      `reference_model(...)`: the frozen base with adapters off (no copy), or for full
                       fine-tuning a frozen copy of the starting weights (or of another checkpoint)
    merged weights     `merged(trainable, frozen)`: plain float32 params, for export and run weights
    its identity       what a checkpoint must have been trained with (`resume_identity`)

    method     trained part                                frozen part
    full       every weight                                {} (or the reference copy: `layout_with_reference`)
    lora       {"lora": A/B (+ DoRA m), "saved": modules}   the base, in model.frozen_dtype or quantized
    adapters   the adapter sets                             the base, in model.frozen_dtype or quantized

A scalar model (reward model, PPO's value model) is a trainable backbone without LM head plus a head
(`ScalarModel`); a value model on a frozen base shares the policy's base with its own adapters (`sibling`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxalign import errors, models, sharding
from flaxalign.models import adapters, heads
from flaxalign.peft import adapted, lora, quant

UNUSED_BY_SCALAR = ("lm_head",)  # a scalar model scores hidden states; its LM head is not part of it


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _float32(tree: Any) -> Any:
    """A frozen base stored in bfloat16 / float16 (`model.frozen_dtype`) as float32, for merging and new factors."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if _is_float(x) else x, tree)


def _without(tree: dict, drop: tuple) -> dict:
    return {k: v for k, v in tree.items() if k not in drop}


@dataclasses.dataclass(frozen=True)
class TrainableModel:
    """One language model a stage trains (module docstring). `drop`: top-level params it does not hold."""

    config: models.ModelConfig
    lora: lora.LoraConfig | None = None
    quant: quant.QuantConfig | None = None
    drop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.lora is not None and not self.lora.enabled:
            object.__setattr__(self, "lora", None)
        if self.quant is not None and not self.quant.enabled:
            object.__setattr__(self, "quant", None)
        if self._adapters and self.lora is not None:
            raise errors.ConfigError("use either LoRA (lora.rank > 0) or bottleneck adapters, not both at once.")
        if self.quant is not None and not self.frozen_base:
            raise errors.ConfigError(
                f"quantization.base={self.quant.base!r} stores the frozen base quantized, but full fine-tuning "
                "trains every weight: add LoRA (lora.rank > 0) or adapters, or set quantization.base='none'.")
        if self.quant is not None:
            self._quantized_base()  # checks every weight can be quantized (one line naming the first that cannot)

    # --- what it is ------------------------------------------------------------------------------------------

    @property
    def _adapters(self) -> bool:
        return self.config.adapter_placement != "none"

    @property
    def frozen_base(self) -> bool:
        """True when the base weights are frozen (LoRA, adapters): the reference is then the base itself."""
        return self.lora is not None or self._adapters

    @functools.cached_property
    def graphdef(self):
        return models.abstract_model(self.config)[0]

    @functools.cached_property
    def _reference_graphdef(self):
        """The module with no adapter set active (for adapters: the base model)."""
        return models.abstract_model(dataclasses.replace(self.config, active_adapter=""))[0]

    @functools.cached_property
    def _full(self) -> tuple[dict, dict]:
        """(abstract params, logical axes) of the whole model, less `drop`."""
        _, abstract, logical = models.abstract_model(self.config)
        return _without(abstract, self.drop), _without(logical, self.drop)

    @functools.cached_property
    def _float_base(self) -> tuple[dict, dict]:
        """(abstract, logical) of the base in float32: everything but the adapter sets."""
        abstract, logical = self._full
        if self._adapters:
            return adapters.split_trainable(abstract)[1], adapters.split_trainable(logical)[1]
        return abstract, logical

    @functools.lru_cache(maxsize=1)  # noqa: B019 - the model is frozen and hashable; one entry per instance
    def _quantized_base(self) -> tuple[dict, dict]:
        return quant.abstract_quantized_tree(*self._float_base, self.quant)

    def _lora_saved_paths(self) -> list[str]:
        return lora.modules_to_save_paths(self._float_base[0], self.lora)

    def identity(self) -> dict:
        """What a checkpoint of this model must have been trained with (compared on resume)."""
        out = {"model": self.config.checkpoint_identity(), "lora": self.lora.to_dict() if self.lora else None}
        if self.quant is not None:
            out["quantization"] = self.quant.to_dict()
        return out

    def metadata(self) -> dict:
        """Saved with every checkpoint: how to read this model back (`weights.run_weights`)."""
        return {"model": self.config.to_dict(), "lora": self.lora.to_dict() if self.lora else None,
                "quantization": self.quant.to_dict() if self.quant else None}

    # --- layout ----------------------------------------------------------------------------------------------

    @property
    def abstract_frozen(self) -> Any:
        if not self.frozen_base:
            return {}
        if self.quant:
            return self._quantized_base()[0]
        dtype = jnp.dtype(self.config.frozen_storage_dtype)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if _is_float(x) else x.dtype),
                            self._float_base[0])

    @property
    def frozen_logical(self) -> Any:
        if not self.frozen_base:
            return {}
        return self._quantized_base()[1] if self.quant else self._float_base[1]

    @functools.cached_property
    def _trainable(self) -> tuple[Any, Any]:
        abstract, logical = self._full
        if self._adapters:
            return adapters.split_trainable(abstract)[0], adapters.split_trainable(logical)[0]
        if self.lora is None:
            return abstract, logical
        base, base_logical = self._float_base
        holder = {}

        def init(params):
            lora_params, holder["axes"] = lora.init_lora(params, base_logical, self.lora, jax.random.PRNGKey(0))
            return lora_params

        abstract_lora = jax.eval_shape(init, base)
        saved = self._lora_saved_paths()
        return ({"lora": abstract_lora, "saved": lora.select_leaves(base, saved)},
                {"lora": holder["axes"], "saved": lora.select_leaves(base_logical, saved)})

    @property
    def abstract_trainable(self) -> Any:
        return self._trainable[0]

    @property
    def trainable_logical(self) -> Any:
        return self._trainable[1]

    def init_frozen(self, shardings: Any, init_base: Callable | None) -> Any:
        """The frozen base in `shardings` ({} for full fine-tuning), read by `init_base(float shardings)` (random
        init when None). A quantized base is quantized as it is read: one layer at a time by sources that take a
        `quantizer` (`init_base.quantizes`: pretrained and full-fine-tuning runs), else whole after reading."""
        if not self.frozen_base:
            return {}
        if self.quant is None:
            base = self._read_base(init_base, shardings)  # float32; cast whole (a transient float32 copy)
            dtype = jnp.dtype(self.config.frozen_storage_dtype)
            if all(x.dtype == dtype or not _is_float(x) for x in jax.tree.leaves(base)):
                return base
            return jax.jit(lambda b: jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, b),
                           out_shardings=shardings)(base)
        float_base, logical = self._float_base
        if getattr(init_base, "quantizes", False):
            return init_base(shardings, quantizer=quant.LayerwiseQuantizer(self.quant, logical, shardings))
        mesh = jax.tree.leaves(shardings)[0].mesh
        base = self._read_base(init_base, sharding.tree_shardings(logical, float_base, mesh))
        return jax.jit(lambda b: quant.quantize_tree(b, logical, self.quant), out_shardings=shardings)(base)

    def _read_base(self, init_base, shardings):
        if init_base is not None:
            base = init_base(shardings)
            return adapters.split_trainable(base)[1] if self._adapters else base
        select = (lambda p: adapters.split_trainable(_without(p, self.drop))[1]) if self._adapters else (
            lambda p: _without(p, self.drop))
        return models.init_params(self.config, self.seed, shardings, select=select)

    def init_trainable(self, shardings: Any, frozen: Any, init_base: Callable | None) -> Any:
        """The trained part in `shardings`: the starting weights (full), fresh adapter sets, or LoRA factors (B = 0;
        DoRA magnitudes from the base) with copies of the modules to save."""
        if self._adapters:
            return models.init_params(self.config, self.seed, shardings,
                                      select=lambda p: adapters.split_trainable(_without(p, self.drop))[0])
        if self.lora is None:
            return self._read_base(init_base, shardings)
        logical, saved, config, seed = self._float_base[1], self._lora_saved_paths(), self.lora, self.seed

        def create(base):
            base = _float32(quant.dequantize_tree(base))
            lora_params, _ = lora.init_lora(base, logical, config, jax.random.PRNGKey(seed))
            return {"lora": lora_params, "saved": jax.tree.map(jnp.copy, lora.select_leaves(base, saved))}

        return jax.jit(create, out_shardings=shardings)(frozen)

    def init_trainable_copying(self, shardings: Any, frozen: Any, weights: Any) -> Any:
        """The trained part from full weights already in memory: a copy of `weights` (less what this model does not
        hold) for full fine-tuning; fresh adapters on `frozen` — the base it shares — otherwise."""
        if self.frozen_base:
            return self.init_trainable(shardings, frozen, None)
        return jax.jit(lambda w: jax.tree.map(jnp.copy, {k: v for k, v in w.items() if k in shardings}),
                       out_shardings=shardings)(weights)

    # --- forward ---------------------------------------------------------------------------------------------

    def params(self, trainable: Any, frozen: Any, rng: jax.Array | None = None) -> Any:
        """The params the module runs on: the trained weights, the adapter sets joined to the base, or the base
        with the modules to save put in and each LoRA target a `LoraWeight` (dropout only when `rng` is given)."""
        if self._adapters:
            return adapters.join(trainable, frozen)
        if self.lora is None:
            return trainable
        base = lora.replace_leaves(frozen, trainable["saved"])
        return adapted.attach_lora(base, trainable["lora"], self.lora, rng)

    def forward_frozen(self, frozen: Any) -> Any:
        """The part of `frozen` that `model` reads: the frozen base (LoRA, adapters), nothing under full fine-tuning
        (where a stage may keep its reference copy in the same place)."""
        return frozen if self.frozen_base else {}

    def model(self, trainable: Any, frozen: Any, rng: jax.Array | None = None) -> models.CausalLM:
        return models.merge(self.graphdef, self._complete(self.params(trainable, frozen, rng)))

    def base_model(self, trainable: Any, frozen: Any) -> models.CausalLM:
        """The frozen base with adapters off — the zero-copy reference (not differentiated)."""
        if not self.frozen_base:
            raise ValueError("full fine-tuning has no frozen base; its reference is a copy (`layout_with_reference`)")
        if self._adapters:
            params = adapters.join(jax.lax.stop_gradient(trainable), frozen)
            return models.merge(self._reference_graphdef, self._complete(params))
        return models.merge(self.graphdef, self._complete(frozen))

    def _complete(self, params: dict) -> dict:
        """A model without its LM head (`drop`) gets an unused one so the module can be rebuilt."""
        return heads.with_unused_lm_head(params, self.config) if "lm_head" in self.drop else params

    def merged(self, trainable: Any, frozen: Any) -> dict:
        """Plain float32 params of the trained model: LoRA merged, a quantized base dequantized, adapter sets kept."""
        if self._adapters:
            return _float32(quant.dequantize_tree(adapters.join(trainable, frozen)))
        if self.lora is None:
            return trainable
        base = lora.replace_leaves(_float32(quant.dequantize_tree(frozen)), trainable["saved"])
        return lora.merge(base, trainable["lora"], self.lora)

    # --- as a Task's param layout ----------------------------------------------------------------------------

    def layout(self, init_base: Callable | None) -> dict:
        """The `Task` fields: params = the trained part, frozen = the frozen base ({} for full fine-tuning).
        `init_base(float shardings) -> params` reads the starting weights (random init when None)."""
        return {"abstract_params": self.abstract_trainable, "params_logical": self.trainable_logical,
                "init_params": lambda shardings, frozen: self.init_trainable(shardings, frozen, init_base),
                "abstract_frozen": self.abstract_frozen, "frozen_logical": self.frozen_logical,
                "init_frozen": lambda shardings: self.init_frozen(shardings, init_base)}

    def layout_with_reference(self, init_base: Callable | None, init_reference: Callable | None = None) -> dict:
        """`layout` whose frozen part is also the reference model (`reference_model`): the frozen base itself (no
        copy), or for full fine-tuning a frozen copy of the starting weights — or of `init_reference`'s, another
        checkpoint (only full fine-tuning can take one: a frozen base is its own reference)."""
        if self.frozen_base:
            if init_reference is not None:
                raise errors.ConfigError("reference_from needs full fine-tuning: with LoRA or adapters the "
                                         "reference is the policy's own frozen base.")
            return self.layout(init_base)
        copy_from = init_reference or init_base

        def init_params(shardings, frozen):
            if init_reference is not None:  # the policy starts from init_base, not from the reference
                return self.init_trainable(shardings, frozen, init_base)
            return jax.jit(lambda f: jax.tree.map(jnp.copy, f), out_shardings=shardings)(frozen)

        return {**self.layout(init_base), "init_params": init_params, "abstract_frozen": self.abstract_trainable,
                "frozen_logical": self.trainable_logical,
                "init_frozen": lambda shardings: self._read_base(copy_from, shardings)}

    def reference_model(self, trainable: Any, frozen: Any) -> models.CausalLM:
        """The reference of `layout_with_reference`: the frozen base with adapters off, or the frozen copy; either
        way outside the gradient."""
        if self.frozen_base:
            return self.base_model(trainable, frozen)
        return models.merge(self.graphdef, self._complete(jax.lax.stop_gradient(frozen)))

    def reference_weights(self, init_base: Callable | None, init_reference: Callable | None = None) -> tuple:
        """(abstract, logical axes, init(shardings)) of the weights a reference scored once, before training, runs on
        (DPO's "precomputed" reference): another checkpoint's float weights (`init_reference`), else the frozen base —
        quantized for QLoRA, as the adapters-off reference of training would run it — else the starting weights."""
        if init_reference is None and self.frozen_base:
            return self.abstract_frozen, self.frozen_logical, lambda shardings: self.init_frozen(shardings, init_base)
        plain = TrainableModel(self.config.without_adapters(), drop=self.drop, seed=self.seed)
        read = init_reference or init_base
        return (plain.abstract_trainable, plain.trainable_logical,
                lambda shardings: plain.init_trainable(shardings, {}, read))

    def reference_forward(self, weights: Any) -> models.CausalLM:
        """The module on `reference_weights`' weights (no adapters, outside the gradient)."""
        return models.merge(self._base_graphdef, self._complete(jax.lax.stop_gradient(weights)))

    @functools.cached_property
    def _base_graphdef(self):
        return models.abstract_model(self.config.without_adapters())[0]

    def reference_mode(self, requested: str, *, reference_from: bool) -> str:
        """The reference a config asks for (`reference`: auto | copy | base | precomputed), checked against the
        method: "auto" is "base" on a frozen base and "copy" for full fine-tuning."""
        modes = ("auto", "copy", "base", "precomputed")
        if requested not in modes:
            raise errors.ConfigError(f"unknown reference {requested!r}; valid: {', '.join(modes)}.")
        mode = ("base" if self.frozen_base else "copy") if requested == "auto" else requested
        if mode == "base" and not self.frozen_base:
            raise errors.ConfigError("reference='base' needs LoRA (lora.rank > 0) or adapters; full fine-tuning "
                                     "uses 'copy' or 'precomputed'.")
        if mode == "copy" and self.frozen_base:
            raise errors.ConfigError("with LoRA or adapters the reference is the frozen base: use reference='base' "
                                     "or 'precomputed'.")
        if reference_from and mode == "base":
            raise errors.ConfigError("reference_from needs reference='copy' or 'precomputed' (the 'base' reference "
                                     "is the policy's own frozen base).")
        return mode

    def sibling(self, seed: int) -> "TrainableModel":
        """Another model of the same kind with its own trained part (e.g. PPO's value model on the policy's base)."""
        return dataclasses.replace(self, seed=seed)


@dataclasses.dataclass(frozen=True)
class ScalarModel:
    """A backbone with a scalar head r = h·kernel + bias on its final hidden states: the reward model (read at each
    sequence's last real token) and PPO's value model (at every response position). Params
    `{"model": backbone's trained part, "head": {"kernel", "bias"}}`; frozen: the backbone's frozen part. The head
    starts at N(0, 1/(d+1)) (reward, Ziegler et al.) or at zero (`zero_head`, a value model)."""

    backbone: TrainableModel
    zero_head: bool = False

    @property
    def abstract_trainable(self) -> dict:
        return {"model": self.backbone.abstract_trainable,
                "head": heads.abstract_scalar_head(self.backbone.config.d_model)}

    @property
    def trainable_logical(self) -> dict:
        return {"model": self.backbone.trainable_logical, "head": heads.HEAD_LOGICAL}

    def init_head(self, shardings) -> dict:
        d, seed, std = self.backbone.config.d_model, self.backbone.seed, 0.0 if self.zero_head else None
        return jax.jit(lambda: heads.init_scalar_head(d, seed, std=std), out_shardings=shardings)()

    def layout(self, init_base: Callable | None) -> dict:
        """The `Task` fields of a scalar model trained on its own (the reward stage)."""
        base = self.backbone.layout(init_base)

        def init_params(shardings, frozen):
            return {"model": base["init_params"](shardings["model"], frozen), "head": self.init_head(shardings["head"])}

        return {**base, "abstract_params": self.abstract_trainable, "params_logical": self.trainable_logical,
                "init_params": init_params}

    def hidden(self, params: dict, frozen: Any, tokens, positions, mask, rng=None):
        return self.backbone.model(params["model"], frozen, rng)(tokens, positions, mask)

    def sequence_scores(self, params: dict, frozen: Any, tokens, mask, positions, rng=None) -> jax.Array:
        """r(x, y) `[B]` (float32): the head on each sequence's last real token."""
        return heads.sequence_scores(self.hidden(params, frozen, tokens, positions, mask, rng), mask, params["head"])


VALUE_FROM = ("auto", "reward", "policy")


def value_model(policy: TrainableModel, value_from: str, reward_config: models.ModelConfig) -> tuple[ScalarModel, str]:
    """PPO's value model (zero head) and where its trained part starts, "policy" or "reward". On a frozen base
    (LoRA, adapters, QLoRA) it is the policy's own base with its own LoRA / adapters — no copy ("auto" → "policy");
    with full fine-tuning, a full copy of the reward model's backbone ("auto" → "reward") or of the policy's
    starting weights."""
    if value_from not in VALUE_FROM:
        raise errors.ConfigError(f"unknown value_from {value_from!r}; valid: {', '.join(VALUE_FROM)}.")
    if value_from == "auto":
        value_from = "policy" if policy.frozen_base else "reward"
    if policy.frozen_base:
        if value_from == "reward":
            raise errors.ConfigError("with LoRA or adapters the value model is the policy's frozen base with its own "
                                     "LoRA or adapters: use value_from='policy' (or 'auto').")
        return ScalarModel(policy.sibling(policy.seed + 1), zero_head=True), value_from
    config = reward_config if value_from == "reward" else policy.config
    backbone = TrainableModel(config, drop=UNUSED_BY_SCALAR, seed=policy.seed + 1)
    return ScalarModel(backbone, zero_head=True), value_from

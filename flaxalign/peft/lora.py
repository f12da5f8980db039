"""LoRA, rsLoRA and DoRA as pure functions over the parameter tree (optax / `jax.tree` style).

Training runs LoRA in activation space: `peft.adapted.attach_lora(params, lora_params, config)` replaces each
adapted weight W by a `LoraWeight` (W and its factors, never their product), and the model's dense layers compute

    y = x·W + s·(dropout(x)·A)·B

so the backward pass forms no `[d_in, d_out]` gradient for the frozen W — only the low-rank ones, for A and B. The
base params never change and no copy of them is kept; only `lora_params` (plus any `modules_to_save`) train.
`apply_lora` / `merge` / `unmerge` form W' = W + s·A·B as tree transforms, for export, merging and parity.

Which params are linear weights, and how they split into input and output axes, comes from the logical axes tree
(`models.abstract_model`). A leading "layers" axis (the scanned stack) is kept as a batch axis: the adapter of a
stacked weight is stacked too, one independent adapter per layer. Of the rest,

    (..., "embed")          input = every axis before "embed", output = ("embed",)      attn o, mlp down
    (first, ...rest)        input = (first,),                  output = rest            q/k/v, gate/up, lm_head

A lookup table (first axis "vocab": the token embedding) and 1-D params (norm scales, biases) are never targets.
For a weight W [*L, *in, *out] with I = prod(in), O = prod(out) and rank r the adapter is

    a          [*L, *in, r]     logical axes (*L, *in, None)     kaiming-uniform(a=√5) = U(±1/√I), or N(0, (1/r)²)
    b          [*L, r, *out]    logical axes (*L, None, *out)    zeros, so the adapted model equals the base at init
    magnitude  [*L, *out]       logical axes (*L, *out)          DoRA only: ‖W‖ over the input axes

so A and B shard like the matching axes of W. Paths are '/'-joined keys, e.g. "layers/attn/q".
"""

import dataclasses
import functools
import math
import re
import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flaxalign import errors

VARIANTS = ("lora", "rslora", "dora")
INITS = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"
LM_HEAD = "lm_head"  # excluded from "all-linear", as in PEFT
LAYERS_AXIS = "layers"
LOOKUP_AXIS = "vocab"  # a weight whose *first* axis is the vocabulary is indexed by token ids, not multiplied


# --- config ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT names in brackets). Hashable, so it can be a static argument of `jax.jit`.

    rank            [r] adapter rank; 0 turns LoRA off.
    alpha           [lora_alpha] scale numerator: s = α/r (lora, dora) or α/√r (rslora).
    targets         [target_modules] "all-linear" (every linear weight but the LM head), a list of names matched
                    at a '/' boundary ("q" matches "layers/attn/q"; entries may be regexes), or one regex string
                    matched against the whole path ("layers/attn/(q|v)").
    exclude         [exclude_modules] names or regexes, matched like list targets.
    variant         "lora", "rslora" [use_rslora] or "dora" [use_dora].
    dropout         [lora_dropout] dropout on the adapter branch's input, a fresh mask per token and weight
                    (PEFT's); training only.
    init            "kaiming" [init_lora_weights=True] or "gaussian" [init_lora_weights="gaussian"].
    rank_pattern    [rank_pattern] {regex: rank}, matched like list targets; the first match wins.
    alpha_pattern   [alpha_pattern] {regex: alpha}, likewise.
    modules_to_save [modules_to_save] names of params trained fully (e.g. ["lm_head"]); see `trainable_mask`.
    """

    rank: int = 0
    alpha: float = 8.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    exclude: tuple[str, ...] = ()
    variant: str = "lora"
    dropout: float = 0.0
    init: str = "kaiming"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        # Lists and dicts become tuples so that the config stays hashable (a jit static argument).
        normalised = dict(
            exclude=_as_tuple(self.exclude), modules_to_save=_as_tuple(self.modules_to_save),
            rank_pattern=tuple((str(k), int(v)) for k, v in dict(self.rank_pattern).items()),
            alpha_pattern=tuple((str(k), float(v)) for k, v in dict(self.alpha_pattern).items()))
        if not isinstance(self.targets, str):
            normalised["targets"] = tuple(self.targets)
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self):
        if self.rank < 0:
            raise errors.ConfigError(f"lora.rank must be 0 (off) or positive, not {self.rank}.")
        if self.alpha < 0:
            raise errors.ConfigError(f"lora.alpha must not be negative, got {self.alpha}.")
        if self.variant not in VARIANTS:
            raise errors.ConfigError(f"lora.variant must be one of {list(VARIANTS)}, not {self.variant!r}.")
        if self.init not in INITS:
            raise errors.ConfigError(f"lora.init must be one of {list(INITS)}, not {self.init!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise errors.ConfigError(f"lora.dropout must be in [0, 1), not {self.dropout}.")
        for pattern, rank in self.rank_pattern:
            if rank < 1:
                raise errors.ConfigError(
                    f"lora.rank_pattern[{pattern!r}] = {rank} must be positive; use lora.exclude to skip a path.")
        for pattern, alpha in self.alpha_pattern:
            if alpha < 0:
                raise errors.ConfigError(f"lora.alpha_pattern[{pattern!r}] = {alpha} must not be negative.")
        patterns = ([] if self.targets == ALL_LINEAR else [self.targets] if isinstance(self.targets, str)
                    else list(self.targets))
        patterns += list(self.exclude) + [p for p, _ in self.rank_pattern + self.alpha_pattern]
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise errors.ConfigError(f"lora pattern {pattern!r} is not a valid regular expression: {e}.") from e

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @classmethod
    def from_dict(cls, values: Any) -> "LoraConfig":
        """From a dict or an `ml_collections.ConfigDict` (e.g. `config.lora`); unknown keys are a `ConfigError`."""
        return cls(**errors.dataclass_fields(cls, values, "lora config"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists and dicts), the inverse of `from_dict`."""
        return dict(rank=self.rank, alpha=self.alpha,
                    targets=self.targets if isinstance(self.targets, str) else list(self.targets),
                    exclude=list(self.exclude), variant=self.variant, dropout=self.dropout, init=self.init,
                    rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
                    modules_to_save=list(self.modules_to_save))


# --- the maths -------------------------------------------------------------------------------------------------


def lora_scale(alpha: float, rank: int, variant: str) -> float:
    """s = α/r for LoRA and DoRA; s = α/√r for rsLoRA (Kalajdzievski 2023), which keeps the update's scale
    independent of r."""
    return alpha / math.sqrt(rank) if variant == "rslora" else alpha / rank


def low_rank_delta(a: jax.Array, b: jax.Array, n_layers: int) -> jax.Array:
    """ΔW = A·B contracted over the rank: [*L, *in, r] × [*L, r, *out] → [*L, *in, *out], in float32 at full
    precision. An einsum over named dims (no reshape to [I, O]) keeps W's sharding for GSPMD to follow."""
    letters = iter(string.ascii_letters)
    layers = "".join(next(letters) for _ in range(n_layers))
    inputs = "".join(next(letters) for _ in range(a.ndim - 1 - n_layers))
    outputs = "".join(next(letters) for _ in range(b.ndim - 1 - n_layers))
    rank = next(letters)
    spec = f"{layers}{inputs}{rank},{layers}{rank}{outputs}->{layers}{inputs}{outputs}"
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def column_norm(w: jax.Array, n_layers: int, n_inputs: int) -> jax.Array:
    """‖W‖ per output feature: sqrt(Σ_in W²) over the input axes, [*L, *in, *out] → [*L, *out] (PEFT's
    `weight_norm`, the L2 norm of each row of HF's [out, in] weight)."""
    input_axes = tuple(range(n_layers, n_layers + n_inputs))
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=input_axes))


def lora_weight(w: jax.Array, delta: jax.Array, scale: float) -> jax.Array:
    """W' = W + s·A·B."""
    return w.astype(jnp.float32) + scale * delta


def dora_weight(w: jax.Array, delta: jax.Array, magnitude: jax.Array, scale: float, n_layers: int,
                n_inputs: int) -> jax.Array:
    """W' = m ⊙ (W + s·A·B) / sg(‖W + s·A·B‖), norm per output feature over the input axes (Liu et al. 2024).

    sg = stop_gradient: as PEFT does (it detaches `weight_norm`, DoRA paper §4.3), the norm is a constant in the
    backward pass. The forward value is the exact DoRA weight.
    """
    direction = lora_weight(w, delta, scale)
    norm = jax.lax.stop_gradient(column_norm(direction, n_layers, n_inputs))
    per_input = tuple(range(n_layers, n_layers + n_inputs))
    return direction * jnp.expand_dims(magnitude.astype(jnp.float32) / norm, per_input)


# --- which params are targets ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearLayout:
    """How a weight's logical axes split: the scanned layer axes, then input axes, then output axes."""

    layer_axes: tuple[str, ...]
    input_axes: tuple[str | None, ...]
    output_axes: tuple[str | None, ...]


def linear_layout(logical_axes: tuple[str | None, ...]) -> LinearLayout | None:
    """The split of one weight (module docstring), or None if it is not a linear weight."""
    n_layers = 0
    while n_layers < len(logical_axes) and logical_axes[n_layers] == LAYERS_AXIS:
        n_layers += 1
    axes = tuple(logical_axes[n_layers:])
    if len(axes) < 2 or axes[0] == LOOKUP_AXIS:
        return None
    split = len(axes) - 1 if axes[-1] == "embed" else 1
    return LinearLayout(tuple(logical_axes[:n_layers]), axes[:split], axes[split:])


@dataclasses.dataclass(frozen=True)
class _Target:
    path: str
    layout: LinearLayout
    shape: tuple[int, ...]
    rank: int

    @property
    def n_layers(self) -> int:
        return len(self.layout.layer_axes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_layers:self.n_layers + len(self.layout.input_axes)]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_layers + len(self.layout.input_axes):]


def name_matches(pattern: str, path: str) -> bool:
    """PEFT's list / pattern rule: the pattern matches the whole path or a suffix starting after a '/'."""
    return re.fullmatch(rf"(?:.*/)?(?:{pattern})", path) is not None


def _is_target(path: str, config: LoraConfig) -> bool:
    if any(name_matches(pattern, path) for pattern in config.exclude):
        return False
    if config.targets == ALL_LINEAR:
        return path.split("/")[-1] != LM_HEAD
    if isinstance(config.targets, str):
        return re.fullmatch(config.targets, path) is not None
    return any(name_matches(pattern, path) for pattern in config.targets)


def _first_match(patterns: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    return next((value for pattern, value in patterns if name_matches(pattern, path)), default)


def rank_for(path: str, config: LoraConfig) -> int:
    """The rank of one target: the first `rank_pattern` entry that matches its path, else `config.rank`."""
    return _first_match(config.rank_pattern, path, config.rank)


def alpha_for(path: str, config: LoraConfig) -> float:
    """The alpha of one target: the first `alpha_pattern` entry that matches its path, else `config.alpha`."""
    return _first_match(config.alpha_pattern, path, config.alpha)


def _targets(params: Any, logical_axes: Any, config: LoraConfig) -> list[_Target]:
    """The targets in path order, checked: something matched and every rank fits its weight."""
    if not config.enabled:
        return []
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten_paths(params).items()}
    linear = {path: layout for path, axes in flatten_paths(logical_axes).items()
              if (layout := linear_layout(axes)) is not None}
    chosen = [_Target(path, linear[path], shapes[path], rank_for(path, config))
              for path in sorted(linear) if _is_target(path, config)]
    if not chosen:
        raise errors.ConfigError(
            f"lora.targets={_show(config.targets)} with lora.exclude={list(config.exclude)} matches no linear "
            f"parameter; available: {sorted(linear)[:12]}.")
    for target in chosen:
        fan_in, fan_out = math.prod(target.input_shape), math.prod(target.output_shape)
        if target.rank > min(fan_in, fan_out):
            raise errors.ConfigError(
                f"lora rank {target.rank} for {target.path!r} exceeds min(input {fan_in}, output {fan_out}) of "
                f"its weight; lower lora.rank or set lora.rank_pattern for this path.")
    return chosen


def target_paths(params: Any, logical_axes: Any, config: LoraConfig) -> list[str]:
    """The '/'-joined paths that get adapters, sorted; [] when LoRA is off. Raises the same errors as
    `init_lora`."""
    return [target.path for target in _targets(params, logical_axes, config)]


# --- init / apply / merge --------------------------------------------------------------------------------------


def init_lora(params: Any, logical_axes: Any, config: LoraConfig, rng: jax.Array) -> tuple[dict, dict]:
    """(lora_params, lora_logical_axes): nested dicts like `params` holding only the targets, each replaced by
    {"a", "b"[, "magnitude"]} (shapes and init in the module docstring). B = 0, so `apply_lora` returns the base
    weights exactly at init. The A's are cut, in path order, from one draw of `rng`. Both trees are ({}, {}) when LoRA
    is off."""
    targets = tuple(_targets(params, logical_axes, config))
    flat_params = flatten_paths(params)
    dora_weights = {t.path: flat_params[t.path] for t in targets} if config.variant == "dora" else {}
    lora_flat = _init_adapters(targets, config.init, config.variant, rng, dora_weights) if targets else {}
    lora_axes = {}
    for target in targets:
        layers, inputs, outputs = target.layout.layer_axes, target.layout.input_axes, target.layout.output_axes
        axes = {"a": layers + inputs + (None,), "b": layers + (None,) + outputs}
        if config.variant == "dora":
            axes["magnitude"] = layers + outputs
        lora_axes[target.path] = axes
    return unflatten_paths(lora_flat), unflatten_paths(lora_axes)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_adapters(targets: tuple[_Target, ...], init: str, variant: str, rng: jax.Array,
                   dora_weights: dict[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """{path: adapter} in one compiled call (static: only what shapes the graph, so that configs differing in alpha
    or dropout share it). All A's come from one draw, cut into pieces: XLA CPU compile time grows steeply with the
    number of separate threefry draws (7 draws ~17 s against ~0.5 s for one)."""
    a_shapes = [t.shape[:t.n_layers] + t.input_shape + (t.rank,) for t in targets]
    sizes = [math.prod(shape) for shape in a_shapes]
    if init == "kaiming":
        noise = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    else:
        noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    adapters = {}
    offset = 0
    for target, a_shape, size in zip(targets, a_shapes, sizes):
        piece = noise[offset:offset + size].reshape(a_shape)
        offset += size
        if init == "kaiming":
            # torch's kaiming_uniform_(a=√5) on A's [r, I] weight: gain √(2/(1+5)), bound gain·√(3/I) = 1/√I
            a = piece / math.sqrt(math.prod(target.input_shape))
        else:  # PEFT's "gaussian": normal with std 1/r
            a = piece / target.rank
        layer_shape = target.shape[:target.n_layers]
        adapter = {"a": a, "b": jnp.zeros(layer_shape + (target.rank,) + target.output_shape, jnp.float32)}
        if variant == "dora":
            adapter["magnitude"] = column_norm(dora_weights[target.path], target.n_layers,
                                               len(target.layout.input_axes))
        adapters[target.path] = adapter
    return adapters


def _adapted_weight(path: str, w: jax.Array, adapter: Mapping[str, jax.Array], config: LoraConfig) -> jax.Array:
    a, b = adapter["a"], adapter["b"]
    n_layers = a.ndim + b.ndim - 2 - w.ndim  # w [*L, *in, *out], a [*L, *in, r], b [*L, r, *out]
    n_inputs = a.ndim - 1 - n_layers
    scale = lora_scale(alpha_for(path, config), a.shape[-1], config.variant)
    delta = low_rank_delta(a, b, n_layers)
    if config.variant == "dora":
        check_dora(path, adapter, config)
        new = dora_weight(w, delta, adapter["magnitude"], scale, n_layers, n_inputs)
    else:
        new = lora_weight(w, delta, scale)
    return new.astype(w.dtype)


def check_dora(path: str, adapter: Mapping[str, jax.Array], config: LoraConfig) -> None:
    if config.variant == "dora" and "magnitude" not in adapter:
        raise errors.ConfigError(f"lora.variant is 'dora' but the adapter of {path!r} has no magnitude; "
                                 "were the lora params initialised with another variant?")


def apply_lora(params: Any, lora_params: Any, config: LoraConfig) -> Any:
    """The effective params (same structure as `params`): every adapted weight W replaced by, in float32,

        lora / rslora:   W' = W + s·A·B
        dora:            W' = m ⊙ (W + s·A·B) / sg(‖W + s·A·B‖)      (see `dora_weight` for the stop-gradient)

    The merged form, for export, evaluation and parity: training multiplies in activation space instead
    (`peft.adapted.attach_lora`), which gives the same outputs and A/B gradients without forming W'. Untouched
    leaves are returned as the same objects. No dropout: it belongs to the activation-space path.
    """
    adapters = weights_with_adapters(params, lora_params)
    if not adapters:
        return params
    updated = {path: _adapted_weight(path, w, adapter, config) for path, (w, adapter) in adapters.items()}
    return replace_at_paths(params, updated)


def merge(params: Any, lora_params: Any, config: LoraConfig) -> Any:
    """The merged params for export or inference: `apply_lora`, exact in float32."""
    return apply_lora(params, lora_params, config)


def unmerge(merged: Any, lora_params: Any, config: LoraConfig) -> Any:
    """The base params back from `merge`'s output, for LoRA and rsLoRA: W = W' − s·A·B (float32 rounding apart).

    DoRA raises a `ConfigError`: W' = m ⊙ V/‖V‖ keeps only the direction of V = W + s·A·B, and for each output
    feature any length t of V, W = t·W'/m − s·A·B, is consistent with W', m, A and B. PEFT can unmerge only because
    it caches ‖V‖ at merge time; here the base params are never modified (training never merges), so
    keep them instead of unmerging.
    """
    if config.variant == "dora":
        raise errors.ConfigError("unmerge is not defined for lora.variant='dora' because the merged weight has lost "
                                 "the norm of W + s·A·B; keep the unmerged base params instead.")
    adapters = weights_with_adapters(merged, lora_params)
    updated = {}
    for path, (w, adapter) in adapters.items():
        a, b = adapter["a"], adapter["b"]
        n_layers = a.ndim + b.ndim - 2 - w.ndim
        scale = lora_scale(alpha_for(path, config), a.shape[-1], config.variant)
        updated[path] = (w.astype(jnp.float32) - scale * low_rank_delta(a, b, n_layers)).astype(w.dtype)
    return replace_at_paths(merged, updated) if updated else merged


def concatenate_adapters(params: Any, adapters: list[tuple[LoraConfig, Any]]) -> tuple[LoraConfig, dict]:
    """One LoRA adapter on `params` (abstract params do) whose update is the sum of `adapters`' — each a
    (config, lora params) pair — as when a LoRA run is trained on the merged weights of another:

        Σ_k s_k·A_k·B_k = [A_1 … A_n] · [s_1·B_1; …; s_n·B_n],   rank Σ_k r_k, scale 1 (α = r, plain LoRA).

    Exact for LoRA and rsLoRA. DoRA's update is not a sum of low-rank terms, and `modules_to_save` replaces
    weights instead of adding to them: both raise a `ConfigError`."""
    pieces: dict[str, list] = {}
    for config, lora_params in adapters:
        if config.variant == "dora" or config.modules_to_save:
            raise errors.ConfigError("adapters with lora.variant='dora' or lora.modules_to_save cannot be summed into "
                                     "one LoRA adapter.")
        for path, (w, adapter) in weights_with_adapters(params, lora_params).items():
            a, b = adapter["a"], adapter["b"]
            scale = lora_scale(alpha_for(path, config), a.shape[-1], config.variant)
            n_layers = a.ndim + b.ndim - 2 - w.ndim
            pieces.setdefault(path, []).append((a, scale * jnp.asarray(b, jnp.float32), n_layers))
    if not pieces:
        raise errors.ConfigError("the adapters adapt no weight; there is nothing to concatenate.")
    flat, ranks = {}, {}
    for path, parts in pieces.items():
        n_layers = parts[0][2]  # b's rank axis follows its layer axes
        flat[f"{path}/a"] = jnp.concatenate([jnp.asarray(a, jnp.float32) for a, _, _ in parts], axis=-1)
        flat[f"{path}/b"] = jnp.concatenate([b for _, b, _ in parts], axis=n_layers)
        ranks[path] = flat[f"{path}/a"].shape[-1]
    rank = max(ranks.values())
    config = LoraConfig(rank=rank, alpha=float(rank), targets=tuple(ranks),
                        rank_pattern={p: r for p, r in ranks.items() if r != rank},
                        alpha_pattern={p: float(r) for p, r in ranks.items() if r != rank})
    return config, unflatten_paths(flat)


# --- trainable parts -------------------------------------------------------------------------------------------


def modules_to_save_paths(params: Any, config: LoraConfig) -> list[str]:
    """The '/'-joined paths of the base params trained fully (`config.modules_to_save`), sorted."""
    if not config.modules_to_save:
        return []
    paths = sorted(flatten_paths(params))
    chosen = [p for p in paths if any(name_matches(name, p) for name in config.modules_to_save)]
    if not chosen:
        raise errors.ConfigError(
            f"lora.modules_to_save={list(config.modules_to_save)} matches no parameter (a tied LM head has no "
            f"'lm_head'); available: {paths[:12]}.")
    return chosen


def trainable_mask(params: Any, config: LoraConfig) -> Any:
    """A bool tree like `params`: True for the leaves in `modules_to_save`, False for the frozen base. (Every leaf
    of `lora_params` is trainable.) With LoRA off everything is trainable: it is full fine-tuning."""
    if not config.enabled:
        return jax.tree.map(lambda _: True, params)
    saved = set(modules_to_save_paths(params, config))
    return unflatten_paths({path: path in saved for path in flatten_paths(params)})


def select_leaves(tree: Any, paths: list[str]) -> dict:
    """The nested sub-dict of `tree` holding only the leaves at `paths` (e.g. the modules to save)."""
    flat = flatten_paths(tree)
    return unflatten_paths({path: flat[path] for path in paths})


def replace_leaves(tree: Any, subtree: Any) -> dict:
    """`tree` with the leaves of `subtree` put in at their paths; the other leaves are shared, not copied."""
    return replace_at_paths(tree, flatten_paths(subtree)) if subtree else tree


def count_params(tree: Any) -> int:
    """The number of scalars in a tree of arrays (e.g. `lora_params`: the adapter's size)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --- nested-dict helpers ---------------------------------------------------------------------------------------


def flatten_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'/'-joined path: leaf} of a nested mapping; tuples (logical axes) and arrays are leaves."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten_paths(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def unflatten_paths(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        _set(tree, path, value)
    return tree


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def weights_with_adapters(params: Any, lora_params: Any, prefix: str = "") -> dict[str, tuple[Any, Mapping]]:
    """{path: (base weight, adapter dict)}, walking both trees together so that a param named "a" or "b" can never
    be taken for an adapter."""
    found = {}
    for key, node in (lora_params or {}).items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if key not in params:
            raise ValueError(f"lora params have {path!r}, which the base params do not")
        if isinstance(params[key], Mapping):
            found.update(weights_with_adapters(params[key], node, path))
        else:
            found[path] = (params[key], node)
    return found


def replace_at_paths(tree: Mapping, updated: Mapping[str, Any], prefix: str = "") -> dict:
    """A copy of the dict spine of `tree` with the leaves at `updated`'s paths replaced; other leaves are shared."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            inside = any(p.startswith(path + "/") for p in updated)
            out[key] = replace_at_paths(value, updated, path) if inside else value
        else:
            out[key] = updated.get(path, value)
    return out


def _as_tuple(names: str | Any) -> tuple[str, ...]:
    """One name or a list of names as a tuple."""
    return (names,) if isinstance(names, str) else tuple(names)


def _show(targets: str | tuple[str, ...]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))

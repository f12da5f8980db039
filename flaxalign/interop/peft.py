"""Hugging Face PEFT adapter directories ↔ flaxalign LoRA / rsLoRA / DoRA params (`flaxalign.peft.lora`).

A directory holds `adapter_config.json` (PEFT's `LoraConfig` fields) and `adapter_model.safetensors`. For an adapted
HF module M (`model.layers.{i}.self_attn.q_proj`, ..., `lm_head`; see `interop.hf` for the module names) the tensors
are

    base_model.model.M.lora_A.weight           [r, I]   = a[i].reshape(I, r)ᵀ
    base_model.model.M.lora_B.weight           [O, r]   = b[i].reshape(r, O)ᵀ
    base_model.model.M.lora_magnitude_vector   [O]      = magnitude[i].reshape(O)          (DoRA only)

with I and O flattened exactly as `interop.hf` flattens the base weight (HF's W [O, I] is our kernel reshaped to
[I, O] and transposed, q/k/v outputs and o inputs head-major), so that PEFT's ΔW = B·A is the transpose of our
A·B. Our stacked layer axis becomes one module per layer. Both directions adapt a weight in every layer or none:
PEFT's per-layer options (`layers_to_transform`, per-layer ranks) are refused. Ranks and alphas travel per module
as PEFT `rank_pattern` / `alpha_pattern` entries keyed by the HF module name ("v_proj"), whatever regexes produced
them. Not supported: `modules_to_save` (the API carries adapters only), adapters on embeddings, a tied LM head,
a resized vocabulary and PEFT options that change the forward or the base weights (each named in the error).
PEFT's copies of the base LM head / embedding weights (`...lm_head.base_layer.weight`, written when lm_head is a
target) are checked for shape and otherwise ignored: the base params supply those weights.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxalign import errors, models
from flaxalign.interop import hf
from flaxalign.interop.safetensors_io import SafetensorsFiles, write_safetensors
from flaxalign.models.config import ModelConfig
from flaxalign.peft import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The digest of the base weights an adapter was trained on, in adapter_model.safetensors' metadata (adapter_config.json
# keeps PEFT's own fields only: PEFT warns about any other key).
BASE_DIGEST = "flaxalign.base_digest"
_MAGNITUDE = "lora_magnitude_vector"
# PEFT options whose non-empty value changes the forward pass, the adapted modules or the base weights.
_UNSUPPORTED = ("layers_to_transform", "layer_replication", "modules_to_save", "lora_bias", "target_parameters",
                "trainable_token_indices", "use_qalora", "alora_invocation_tokens", "megatron_config", "use_bdlora",
                "arrow_config", "kasa_config", "velora_config", "monteclora_config")
_INITS = (True, False, "gaussian", "orthogonal", "eva")  # inits that leave the base weights as they are


@dataclasses.dataclass(frozen=True)
class _Module:
    """One adaptable linear weight: our '/'-path, its HF module name (`{i}` when stacked) and our kernel's split."""

    path: str
    hf_name: str
    stacked: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def short(self) -> str:
        return self.hf_name.rsplit(".", 1)[-1]

    def names(self, n_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(n_layers)] if self.stacked else [self.hf_name]


@functools.lru_cache(maxsize=8)
def _model(config: ModelConfig) -> tuple[dict, dict[str, Any], dict[str, _Module]]:
    """(abstract params, {path: linear layout} of every linear weight, {path: _Module} of those with an HF name, in
    HF order)."""
    _, abstract, logical = models.abstract_model(config)
    shapes = lora.flatten_paths(abstract)
    linear = {path: layout for path, axes in lora.flatten_paths(logical).items()
              if (layout := lora.linear_layout(axes)) is not None}
    specs = [(spec, True) for spec in hf.layer_tensors(config)]
    specs += [(spec, False) for spec in hf.global_tensors(config)]
    modules = {}
    for spec, stacked in specs:
        path = "/".join((("layers",) if stacked else ()) + spec.path)
        if path not in linear or not spec.hf_name.endswith(".weight") or spec.rows is not None:
            continue  # a row part of a fused HF tensor (Phi-3's qkv_proj) is no HF module of its own
        n_layers, n_inputs = len(linear[path].layer_axes), len(linear[path].input_axes)
        shape = tuple(shapes[path].shape)
        module = _Module(path, spec.hf_name[:-len(".weight")], stacked, shape[n_layers:n_layers + n_inputs],
                         shape[n_layers + n_inputs:])
        if spec.hf_shape != (math.prod(module.output_shape), math.prod(module.input_shape)):
            raise ValueError(f"interop.hf's layout of {path!r} is no longer W.reshape(I, O)ᵀ; update interop.peft")
        modules[path] = module
    return abstract, linear, modules


# --- export ----------------------------------------------------------------------------------------------------


def base_digest(params: Any) -> str:
    """A sha256 of a model's weights — each path, shape and value rounded to bfloat16, so that a float32 base and
    its bfloat16 copy agree — naming the exact base an adapter applies to."""
    import ml_dtypes

    digest = hashlib.sha256()
    for path, leaf in sorted(lora.flatten_paths(params).items()):
        value = np.asarray(leaf, np.float32).astype(ml_dtypes.bfloat16)
        digest.update(f"{path}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_peft_adapter(directory: str, model_config: ModelConfig, lora_config: lora.LoraConfig, lora_params: Any, *,
                      base_model_name_or_path: str = "", base_weights_digest: str = "") -> None:
    """Writes `lora_params` (as made by `lora.init_lora` and trained) as a PEFT adapter directory that
    `peft.PeftModel.from_pretrained(hf_model, directory)` loads: adapter_config.json and float32
    adapter_model.safetensors (layout in the module docstring). `base_model_name_or_path` names the base it
    applies to and `base_weights_digest` (`base_digest`) pins it, checked by `load_peft_adapter`.

    Raises `ConfigError` for what PEFT cannot express: LoRA off, `modules_to_save`, an adapted param with no HF
    module (e.g. a bottleneck-adapter weight), or adapter shapes that do not fit `model_config` (naming the path).
    """
    if not lora_config.enabled:
        raise errors.ConfigError("save_peft_adapter needs LoRA on (lora.rank > 0); there is no adapter to save.")
    if lora_config.modules_to_save:
        raise errors.ConfigError(f"lora.modules_to_save={list(lora_config.modules_to_save)} cannot be written as a "
                                 "PEFT adapter here; merge those params and export the model with save_hf instead.")
    abstract, _, modules = _model(model_config)
    try:
        adapters = lora.weights_with_adapters(abstract, lora_params)
    except ValueError as e:
        raise errors.ConfigError(f"lora params do not fit the model config: {e}.") from e
    if not adapters:
        raise errors.ConfigError("lora params hold no adapters; there is nothing to save.")
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    for path, (_, adapter) in adapters.items():
        fused = _fused_module(model_config, path)
        if fused:
            raise errors.ConfigError(f"lora target {path!r} is a part of HF's fused {fused} ({model_config.family}), "
                                     f"which PEFT adapts as one Linear, so a PEFT adapter cannot express it; adapt "
                                     f"only {sorted(modules)} to export one, or merge it and export with save_hf.")
        if path not in modules:
            raise errors.ConfigError(f"lora target {path!r} has no Hugging Face module, so a PEFT adapter cannot "
                                     f"express it; PEFT adapters cover {sorted(modules)}.")
        module = modules[path]
        ranks[module.short] = _check_adapter(module, adapter, lora_config.variant, model_config.n_layers)
        alphas[module.short] = lora.alpha_for(path, lora_config)
        host = {k: np.asarray(v, np.float32) for k, v in adapter.items()}
        for i, name in enumerate(module.names(model_config.n_layers)):
            tensors.update(_to_peft(module, name, {k: v[i] if module.stacked else v for k, v in host.items()}))
    peft_config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path or None,
        r=lora_config.rank, lora_alpha=lora_config.alpha, target_modules=sorted(ranks), exclude_modules=None,
        rank_pattern={k: v for k, v in sorted(ranks.items()) if v != lora_config.rank},
        alpha_pattern={k: v for k, v in sorted(alphas.items()) if v != lora_config.alpha},
        use_rslora=lora_config.variant == "rslora", use_dora=lora_config.variant == "dora",
        lora_dropout=lora_config.dropout, init_lora_weights=True if lora_config.init == "kaiming" else "gaussian",
        bias="none", fan_in_fan_out=False, lora_bias=False, modules_to_save=None, layers_to_transform=None,
        layers_pattern=None, inference_mode=True, revision=None)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(peft_config, f, indent=2)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors,
                      {BASE_DIGEST: base_weights_digest} if base_weights_digest else None)


def _fused_module(config: ModelConfig, path: str) -> str | None:
    """The fused HF tensor (e.g. "model.layers.{i}.self_attn.qkv_proj.weight") that layer param `path` is a row part
    of, or None."""
    return next((spec.hf_name for spec in hf.layer_tensors(config)
                 if spec.rows is not None and "/".join(("layers",) + spec.path) == path), None)


def _check_adapter(module: _Module, adapter: Mapping[str, Any], variant: str, n_layers: int) -> int:
    """The adapter's rank, after checking its leaves' shapes against the model config and the variant."""
    keys = ["a", "b", "magnitude"] if variant == "dora" else ["a", "b"]
    if sorted(adapter) != sorted(keys):
        raise errors.ConfigError(f"lora params of {module.path!r} have {sorted(adapter)}, but lora.variant="
                                 f"{variant!r} needs {sorted(keys)}.")
    layers = (n_layers,) if module.stacked else ()
    rank = adapter["a"].shape[-1]
    expected = {"a": layers + module.input_shape + (rank,), "b": layers + (rank,) + module.output_shape,
                "magnitude": layers + module.output_shape}
    for key in keys:
        if tuple(adapter[key].shape) != (shape := expected[key]):
            raise errors.ConfigError(f"lora param {module.path}/{key} has shape {tuple(adapter[key].shape)}, but the "
                                     f"model config needs {shape}.")
    return rank


def _to_peft(module: _Module, name: str, layer: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    fan_in, fan_out = math.prod(module.input_shape), math.prod(module.output_shape)
    rank = layer["a"].shape[-1]
    out = {f"{PREFIX}{name}.lora_A.weight": layer["a"].reshape(fan_in, rank).T,
           f"{PREFIX}{name}.lora_B.weight": layer["b"].reshape(rank, fan_out).T}
    if "magnitude" in layer:
        out[f"{PREFIX}{name}.{_MAGNITUDE}"] = layer["magnitude"].reshape(fan_out)
    return {key: np.asarray(value, np.float32) for key, value in out.items()}


# --- import ----------------------------------------------------------------------------------------------------


def load_peft_adapter(directory: str, model_config: ModelConfig, base_params: Any = None
                      ) -> tuple[lora.LoraConfig, dict]:
    """(lora_config, lora_params) of a PEFT LoRA / rsLoRA / DoRA adapter directory (written by PEFT or by
    `save_peft_adapter`) for the base model of `model_config`: float32 params in exactly the tree `lora.init_lora`
    makes for that config, so `lora.apply_lora(params, lora_params, lora_config)` runs the adapted model.

    The config is canonical: targets "all-linear" when every linear weight but the LM head is adapted, else our
    names ("q", "lm_head"; full paths where a name is ambiguous); rank_pattern / alpha_pattern list the weights whose
    rank / alpha differ from r / lora_alpha. Raises `CheckpointError` for a missing directory, config or weights
    file, a non-LORA peft_type, unsupported options (named), a missing, misshapen (named) or unexpected tensor, and
    a weight adapted in some layers only, and — when `base_params` are given and the adapter records the digest of
    its base (`save_peft_adapter`) — base weights other than those it was trained on.
    """
    peft_config = _read_config(directory)
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        legacy = " (adapter_model.bin is not read; re-save with safe_serialization=True)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""
        raise errors.CheckpointError(f"PEFT adapter directory {directory!r} has no {WEIGHTS_FILE}{legacy}.")
    tensors = SafetensorsFiles([weights])
    expected = tensors.metadata.get(BASE_DIGEST)
    if base_params is not None and expected and base_digest(base_params) != expected:
        raise errors.CheckpointError(
            f"PEFT adapter {directory!r} was trained on other base weights than these: load it on "
            f"{peft_config.get('base_model_name_or_path') or 'the base it was trained on'}.")
    _, linear, modules = _model(model_config)
    rank, alpha = peft_config.get("r", 8), peft_config.get("lora_alpha", 8)
    variant = "dora" if peft_config.get("use_dora") else "rslora" if peft_config.get("use_rslora") else "lora"
    lora_flat, ranks, alphas, used = {}, {}, {}, set()
    for path, module in modules.items():
        names = module.names(model_config.n_layers)
        chosen = [name for name in names if _peft_targets(peft_config, name)]
        if not chosen:
            continue
        if len(chosen) != len(names):
            raise errors.CheckpointError(
                f"PEFT adapter adapts {module.short} in {len(chosen)} of {len(names)} layers (e.g. {chosen[0]!r}); "
                "flaxalign adapts a weight in all layers or none.")
        ranks[path] = _per_weight(peft_config.get("rank_pattern") or {}, names, rank, "rank_pattern")
        alphas[path] = _per_weight(peft_config.get("alpha_pattern") or {}, names, alpha, "alpha_pattern")
        lora_flat[path] = _read_adapter(tensors, module, names, ranks[path], variant == "dora", used)
    leftover = sorted(set(tensors) - used - _base_copies(tensors, model_config))
    if leftover:
        raise errors.CheckpointError(
            f"PEFT adapter tensor {leftover[0]!r} ({len(leftover)} in all) belongs to no adapter flaxalign can load "
            "for this model config (embeddings, norms and a tied LM head are never adapted; check target_modules).")
    if not lora_flat:
        raise errors.CheckpointError(f"PEFT adapter in {directory!r} adapts none of the model's linear weights.")
    config = _canonical_config(linear, ranks, alphas, dict(
        rank=rank, alpha=float(alpha), variant=variant, dropout=float(peft_config.get("lora_dropout", 0.0)),
        init="gaussian" if peft_config.get("init_lora_weights") == "gaussian" else "kaiming"), directory)
    return config, lora.unflatten_paths(lora_flat)


def _base_copies(tensors: SafetensorsFiles, config: ModelConfig) -> set[str]:
    """PEFT's copies of the base embedding / LM head weights of a targeted lm_head (`save_embedding_layers`, on by
    default then): ignored, since the base model supplies them, after checking that the vocabulary is not resized."""
    copies = {f"{PREFIX}{name}.base_layer.weight" for name in ("lm_head", "model.embed_tokens")} & set(tensors)
    for name in copies:
        if tensors.shape(name) != (config.vocab_size, config.d_model):
            raise errors.CheckpointError(
                f"PEFT adapter tensor {name!r} has shape {tensors.shape(name)}, but the model config needs "
                f"{(config.vocab_size, config.d_model)}; was the vocabulary resized?")
    return copies


def _read_config(directory: str) -> dict[str, Any]:
    """adapter_config.json, checked for what this module can load."""
    if not os.path.isdir(directory):
        raise errors.CheckpointError(f"PEFT adapter directory {directory!r} does not exist.")
    file = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(file):
        raise errors.CheckpointError(f"PEFT adapter directory {directory!r} has no {CONFIG_FILE}.")
    try:
        with open(file) as f:
            config = json.load(f)
    except ValueError as e:
        raise errors.CheckpointError(f"PEFT adapter config {file!r} is not valid JSON: {e}.") from e
    if config.get("peft_type") != "LORA":
        raise errors.CheckpointError(
            f"PEFT adapter {file!r} has peft_type={config.get('peft_type')!r}; only 'LORA' adapters can be loaded.")
    bad = [f"{key}={config[key]!r}" for key in _UNSUPPORTED if config.get(key) not in (None, False, [], {}, "")]
    if config.get("fan_in_fan_out"):
        bad.append("fan_in_fan_out=True")
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r}")
    if config.get("use_dora") and config.get("use_rslora"):
        bad.append("use_dora=True with use_rslora=True")
    if config.get("init_lora_weights", True) not in _INITS:
        bad.append(f"init_lora_weights={config['init_lora_weights']!r}")
    if config.get("target_modules") is None:
        bad.append("target_modules=None")
    if not isinstance(config.get("r", 8), int) or config.get("r", 8) < 1:
        bad.append(f"r={config.get('r')!r}")
    patterns = [config.get(k) for k in ("target_modules", "exclude_modules") if isinstance(config.get(k), str)]
    for pattern in patterns + list(config.get("rank_pattern") or {}) + list(config.get("alpha_pattern") or {}):
        try:
            re.compile(pattern)
        except re.error:
            bad.append(f"the invalid regular expression {pattern!r}")
    if bad:
        raise errors.CheckpointError(f"PEFT adapter {file!r} uses option(s) flaxalign does not support: "
                                     f"{', '.join(bad)}.")
    return config


def _peft_targets(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT adapts HF module `name` (peft.tuners.tuners_utils.check_target_module_exists, LoRA part)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            return False
        if not isinstance(exclude, str) and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == lora.ALL_LINEAR:
            return name != "lm_head"  # PEFT leaves out the output embedding
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _per_weight(patterns: Mapping[str, Any], names: list[str], default: Any, field: str) -> Any:
    """The one rank (or alpha) that PEFT's first matching pattern (`peft.utils.other.get_pattern_key`) gives every
    layer of a weight."""
    values = [next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default) for name in names]
    if len(set(values)) > 1:
        raise errors.CheckpointError(f"PEFT adapter's {field} gives {names[0]} and {names[-1]} different values "
                                     f"{values[0]} and {values[-1]}; flaxalign needs one value per stacked weight.")
    return values[0]


def _read_adapter(tensors: SafetensorsFiles, module: _Module, names: list[str], rank: int, dora: bool,
                  used: set[str]) -> dict[str, Any]:
    fan_in, fan_out = math.prod(module.input_shape), math.prod(module.output_shape)

    def take(name: str, suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        key = f"{PREFIX}{name}.{suffix}"
        if key not in tensors:
            raise errors.CheckpointError(f"PEFT adapter has no tensor {key!r}, which its target_modules need.")
        if tensors.shape(key) != shape:
            raise errors.CheckpointError(f"PEFT adapter tensor {key!r} has shape {tensors.shape(key)}, but the model "
                                         f"config with rank {rank} needs {shape}.")
        used.add(key)
        return np.asarray(tensors[key], np.float32)

    adapter = {"a": [take(n, "lora_A.weight", (rank, fan_in)).T.reshape(module.input_shape + (rank,)) for n in names],
               "b": [take(n, "lora_B.weight", (fan_out, rank)).T.reshape((rank,) + module.output_shape)
                     for n in names]}
    if dora:
        adapter["magnitude"] = [take(n, _MAGNITUDE, (fan_out,)).reshape(module.output_shape) for n in names]
    return {k: jnp.asarray(np.stack(v) if module.stacked else v[0], jnp.float32) for k, v in adapter.items()}


def _canonical_config(linear: Mapping[str, Any], ranks: dict[str, int], alphas: dict[str, float],
                      fields: dict[str, Any], directory: str) -> lora.LoraConfig:
    """The LoraConfig that selects exactly the adapted paths and gives each its rank and alpha."""
    paths = list(ranks)  # HF order: q, k, v, o, gate, up, down, lm_head
    all_linear = {p for p in linear if p.split("/")[-1] != lora.LM_HEAD}

    def name(path: str, among: list[str]) -> str:  # the last key where it picks out `path` alone
        short = path.split("/")[-1]
        return short if [p for p in among if lora.name_matches(short, p)] == [path] else path

    targets = lora.ALL_LINEAR if set(paths) == all_linear else tuple(name(p, sorted(linear)) for p in paths)
    try:
        return lora.LoraConfig(
            targets=targets, **fields,
            rank_pattern={name(p, paths): r for p, r in ranks.items() if r != fields["rank"]},
            alpha_pattern={name(p, paths): float(a) for p, a in alphas.items() if float(a) != fields["alpha"]})
    except errors.ConfigError as e:
        raise errors.CheckpointError(f"PEFT adapter in {directory!r} has an invalid LoRA setting: {e}") from e

"""Hugging Face transformers ↔ flaxalign: tensor-layout conversion as pure functions, and model directories read
and written (the config.json mapping is `hf_config.py`, re-exported here).

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (SmolLM is a
Llama), Gemma3ForCausalLM (`gemma3_text`) and Phi3ForCausalLM. The state-dict conversions work on in-memory arrays
only: numpy in, numpy out, no torch. On top of them:

- `load_pretrained(directory)` reads an HF model directory (config.json, model.safetensors or sharded files with
  model.safetensors.index.json, optional tokenizer.json) into a `Pretrained` (config, params, tokenizer); with a
  mesh each device's shard of a param is read as a region of the memory-mapped files (`place_params`), so no full
  host copy of the model exists.
- `save_hf(config, params, directory)` writes a transformers-loadable directory (config.json, a causal LM's
  generation_config.json, float32 safetensors sharded with an index above `max_shard_bytes`); given the
  `source_fields` of the config.json (or GGUF file) the model came from, as run metadata keeps them, it writes the
  same architecture class, special ids and window spelling back (`hf_config.hf_config_dict`).
- `apply_lm(config, params, input_ids, attention_mask)` gives float32 logits the way an HF causal LM does for a
  (right- or left-) padded batch.

Safetensors files are read and written with the `safetensors` package's numpy framework (`safetensors_io.py`), so
bfloat16 checkpoints load without torch.
Reward models map to `*ForSequenceClassification`: the backbone without LM head plus `score.weight` [1, D] (our head
kernel; HF's score layer has no bias, so a non-zero head bias is kept in config.json under `flaxalign_score_bias`).

Layout (HF `nn.Linear.weight` is [out, in]; flaxalign kernels are [in, ...out] and stacked over a leading layer
axis):

    model.embed_tokens.weight                      [V, D]       -> embed                 [V, D]
    model.layers.{i}.self_attn.q_proj.weight       [H·Dh, D]    -> layers.attn.q         [L, D, H, Dh]
    model.layers.{i}.self_attn.{k,v}_proj.weight   [K·Dh, D]    -> layers.attn.{k,v}     [L, D, K, Dh]
    model.layers.{i}.self_attn.o_proj.weight       [D, H·Dh]    -> layers.attn.o         [L, H, Dh, D]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias   [H·Dh]/[K·Dh]-> layers.attn.{q,k,v}_bias [L, H|K, Dh]
    model.layers.{i}.mlp.{gate,up}_proj.weight     [F, D]       -> layers.mlp.{gate,up}  [L, D, F]
    model.layers.{i}.mlp.down_proj.weight          [D, F]       -> layers.mlp.down       [L, F, D]
    model.layers.{i}.input_layernorm.weight        [D]          -> layers.attn_norm.scale [L, D]
    model.layers.{i}.post_attention_layernorm.weight [D]        -> layers.mlp_norm.scale  [L, D]
    model.norm.weight                              [D]          -> final_norm.scale      [D]
    lm_head.weight                                 [V, D]       -> lm_head               [D, V] (absent when tied)
    score.weight (reward models)                   [1, D]       -> head.kernel           [D]

Gemma 3 (`models/gemma.py`'s table) has the same names plus four layer norms: input_layernorm → attn_norm,
post_attention_layernorm → post_attn_norm, pre_feedforward_layernorm → mlp_norm, post_feedforward_layernorm →
post_mlp_norm, and q_norm / k_norm. Phi-3 (`models/phi3.py`) fuses q/k/v into `self_attn.qkv_proj.weight` and
gate/up into `mlp.gate_up_proj.weight`: each part is rows of the fused tensor (`HFTensor.rows`), read as a region
of those rows and written concatenated. Each family's table lives next to its module (`models.families`).

HF splits the q/k/v output features head-major (`view(B, T, heads, head_dim)`), which is exactly a reshape of the
transposed kernel to [D, heads, head_dim]; RoPE uses the same rotate_half layout on both sides, so no permutation
of head_dim is needed (unlike Meta's original checkpoints).
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flaxalign import errors, models, sharding
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.interop.hf_config import (  # noqa: F401 - the config mapping is part of this module's API
    ARCHITECTURES,
    ID_FIELDS,
    SCORE_ARCHITECTURES,
    SCORE_BIAS_FIELD,
    SOURCE_FIELD,
    generation_config_dict,
    gguf_source_fields,
    hf_config_dict,
    is_score_model,
    model_config_from_hf,
    source_fields,
)
from flaxalign.interop.safetensors_io import SafetensorsFiles, write_safetensors
from flaxalign.models import families
from flaxalign.models.apply import apply_lm, apply_reward  # noqa: F401 - part of flaxalign.interop's API
from flaxalign.models.config import ModelConfig
from flaxalign.models.tensors import (  # noqa: F401 - HFTensor is part of this module's API
    HFTensor,
    Index,
    assemble,
    whole_shapes,
)

# Buffers that some transformers versions put into state dicts; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def global_tensors(config: ModelConfig, score: bool = False) -> list[HFTensor]:
    """Embedding, final norm and the output layer: the LM head, or with `score` a reward model's score row (at
    params path ("score",), shape [D]) — the table of `config.family` (`models.families`)."""
    return families.family(config).global_tensors(config, score)


def layer_tensors(config: ModelConfig) -> list[HFTensor]:
    """The tensors of layer `{i}` in the table of `config.family` (Llama's: q, k, v, o, gate, up, down, the two
    norms, then q/k/v biases and q/k norms; Gemma's has four layer norms)."""
    return families.family(config).layer_tensors(config)


def params_from_hf_state_dict(config: ModelConfig, tensors: Mapping[str, np.ndarray], *,
                              score: bool = False) -> dict[str, Any]:
    """flaxalign's nested float32 param dict (numpy, layers stacked) from an HF state dict of numpy arrays.

    Raises `CheckpointError` naming the first missing tensor, a tensor whose shape does not fit `config`, or
    tensors the model has no place for. Tolerated and dropped: rotary `inv_freq` buffers, an `lm_head.weight`
    equal to the embedding when embeddings are tied, and all-zero `o_proj.bias` (Llama `attention_bias=True`).
    """
    params: dict[str, Any] = {}
    used: set[str] = set()
    shapes = whole_shapes(global_tensors(config, score) + layer_tensors(config))  # fused tensors whole
    for spec in global_tensors(config, score):
        _set(params, spec.path, spec.to_flax(spec.part(_take(tensors, spec.hf_name, shapes[spec.hf_name], used))))
    for spec in layer_tensors(config):
        per_layer = [spec.to_flax(spec.part(_take(tensors, spec.hf_name.format(i=i), shapes[spec.hf_name], used)))
                     for i in range(config.n_layers)]
        _set(params, ("layers",) + spec.path, np.stack(per_layer))
    _check_leftovers(config, tensors, used, lambda: params["embed"])
    return params


def params_to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any], *,
                            score: bool = False) -> dict[str, np.ndarray]:
    """The HF state dict (float32 numpy, HF names and layouts) of flaxalign params; the inverse of
    `params_from_hf_state_dict`. Tied models get no `lm_head.weight`, as in HF's own safetensors files; a fused HF
    tensor (Phi-3's qkv_proj) is its parts concatenated."""
    pieces = [(spec.hf_name, spec, _contiguous(spec.to_hf(_get(params, spec.path))))
              for spec in global_tensors(config, score)]
    for spec in layer_tensors(config):
        stacked = _get(params, ("layers",) + spec.path)
        pieces += [(spec.hf_name.format(i=i), spec, _contiguous(spec.to_hf(stacked[i])))
                   for i in range(config.n_layers)]
    return {name: _contiguous(value) for name, value in assemble(pieces).items()}


def _take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], used: set[str]) -> np.ndarray:
    if name not in tensors:
        raise errors.CheckpointError(f"HF checkpoint has no tensor {name!r}, which this model config needs.")
    value = np.asarray(tensors[name]).astype(np.float32)
    if value.shape != shape:
        raise errors.CheckpointError(
            f"HF tensor {name!r} has shape {value.shape}, but the model config needs {shape}.")
    used.add(name)
    return value


def _check_leftovers(config: ModelConfig, tensors: Mapping[str, np.ndarray], used: set[str],
                     embed: Callable[[], np.ndarray]) -> None:
    """Refuses tensors that conversion would drop while they change the function the model computes. `embed()`
    gives the float32 embedding (read only when a tied checkpoint also stores an lm_head)."""
    unexpected = []
    for name in sorted(set(tensors) - used):
        value = np.asarray(tensors[name])
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            if not np.array_equal(value.astype(np.float32), embed()):
                raise errors.CheckpointError(
                    "HF checkpoint has an lm_head.weight that differs from the embedding, but the model config "
                    "ties embeddings; set model.tie_embeddings=False.")
            continue
        if name.endswith("self_attn.o_proj.bias") and not np.any(value):
            continue  # Llama attention_bias=True; flaxalign has no o_proj bias, but a zero one is harmless
        unexpected.append(name)
    if unexpected:
        raise errors.CheckpointError(
            f"HF checkpoint has {len(unexpected)} tensor(s) that flaxalign's model has no place for, "
            f"e.g. {unexpected[:3]}.")


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            raise errors.CheckpointError(f"flaxalign params have no {'/'.join(path)!r}; does the config match?")
        tree = tree[key]
    return tree


def _contiguous(x: Any) -> np.ndarray:
    # safetensors refuses non-contiguous arrays, and transposes are views
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Model directories

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"



@dataclasses.dataclass
class Pretrained:
    """A loaded HF model directory: flaxalign config, float32 params (device arrays) and tokenizer (None when the
    directory has no tokenizer.json). A `*ForSequenceClassification` model (a reward model) has no LM head in
    `params` and its scalar head {"kernel": [D], "bias": []} in `head`."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any = None
    head: dict[str, Any] | None = None


def load_pretrained(path: str, *, dtype: str = "auto", mesh: jax.sharding.Mesh | None = None,
                    quantizer: Callable | None = None) -> Pretrained:
    """Loads an HF Llama / Qwen2 / Qwen3 / Mistral / Gemma 3 / Phi-3 directory saved by transformers
    (`save_pretrained`, safetensors), a causal LM or a `*ForSequenceClassification` reward model.

    `dtype` is the compute dtype of the returned config ("auto", "float32", "bfloat16"); params are float32 whatever
    the file holds. With `mesh`, every param is created directly in its sharding (`sharding.tree_shardings`), each
    device's shard read from the memory-mapped files; without one, params are plain arrays on the default device.
    Raises `CheckpointError` for a missing directory, config.json or weights file and for a missing, misshapen or
    unexpected tensor, and `ConfigError` for an unsupported architecture.

    `quantizer(path, layer, n_layers)` (`peft.quant.LayerwiseQuantizer`, with a mesh) receives each stacked layer
    weight as `layer(i) -> numpy` and returns it quantized and placed, or None to place it in float32: a quantized
    base is built one layer at a time, never whole in float32.

    `flaxalign.interop.load_pretrained` (`pretrained.load_pretrained`) also reads a llama.cpp `.gguf` file.
    """
    hf_config = read_hf_config(path)
    score = is_score_model(hf_config)
    config = dataclasses.replace(model_config_from_hf(hf_config), dtype=dtype)
    tensors = SafetensorsFiles(_weight_files(path))
    check_tensors(config, tensors, score)
    params = place_params(config, tensors, mesh, score, quantizer)
    head = None
    if score:
        head = {"kernel": params.pop("score"), "bias": jnp.float32(hf_config.get(SCORE_BIAS_FIELD, 0.0))}
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = load_tokenizer(path)
    return Pretrained(config=config, params=params, tokenizer=tokenizer, head=head)


def read_hf_config(path: str) -> dict[str, Any]:
    """The config.json dict of an HF model directory."""
    if not os.path.isdir(path):
        raise errors.CheckpointError(f"HF model directory {path!r} does not exist.")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise errors.CheckpointError(f"HF model directory {path!r} has no config.json.")
    try:
        with open(config_file) as f:
            return json.load(f)
    except ValueError as e:
        raise errors.CheckpointError(f"HF config {config_file!r} is not valid JSON: {e}.") from e


def read_model_config(path: str) -> ModelConfig:
    """The `ModelConfig` of an HF model directory, from its config.json (no weights read)."""
    return model_config_from_hf(read_hf_config(path))


def _weight_files(path: str) -> list[str]:
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise errors.CheckpointError(f"HF index {index_file!r} has no readable weight_map: {e}.") from e
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise errors.CheckpointError(f"HF checkpoint shard {file!r}, listed in {INDEX_FILE}, is missing.")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise errors.CheckpointError(
        f"HF model directory {path!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; save it with safetensors.")


def check_tensors(config: ModelConfig, tensors: SafetensorsFiles, score: bool = False) -> None:
    """Names and shapes of every tensor the config needs, and no unexpected ones, before any data is read.

    `tensors` is a `SafetensorsFiles`, or another mapping of HF names with its `shape(name)` and `read(name, index)`
    (`flaxalign.interop.gguf` hands its file over this way)."""
    expected = dict(whole_shapes(global_tensors(config, score)))
    for name, shape in whole_shapes(layer_tensors(config)).items():
        expected.update({name.format(i=i): shape for i in range(config.n_layers)})
    for name, shape in expected.items():
        if name not in tensors:
            raise errors.CheckpointError(f"HF checkpoint has no tensor {name!r}, which this model config needs.")
        if tensors.shape(name) != shape:
            raise errors.CheckpointError(
                f"HF tensor {name!r} has shape {tensors.shape(name)}, but the model config needs {shape}.")

    def embed() -> np.ndarray:
        return np.asarray(tensors["model.embed_tokens.weight"], np.float32)

    _check_leftovers(config, tensors, set(expected), embed)


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    """`index` (slices of `shape`, as `make_array_from_callback` gives them: step 1) with int bounds."""
    return tuple(slice(*part.indices(n)[:2]) for part, n in zip(index, shape))


def _whole(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


def place_params(config: ModelConfig, tensors: SafetensorsFiles, mesh: jax.sharding.Mesh | None,
                 score: bool = False, quantizer: Callable | None = None) -> dict[str, Any]:
    """flaxalign's float32 params (device arrays) from checked HF `tensors` (see `check_tensors`): with `mesh`,
    each param is created in its sharding (`sharding.tree_shardings`) from per-device regions, each read from
    `tensors` as the region of the HF tensor(s) it covers (`tensors.read(name, index)`: a memory-mapped
    safetensors slice), so a sharded param is never whole on the host; without one, each param is read whole and
    put on the default device. `quantizer`: see `load_pretrained`."""
    shardings = None
    if mesh is not None:
        _, abstract, logical = models.abstract_model(config)
        shardings = sharding.tree_shardings(logical, abstract, mesh)
    params: dict[str, Any] = {}

    def put(path: tuple[str, ...], shape: tuple[int, ...], build: Callable[[Index], np.ndarray]):
        if shardings is None:
            value = jax.device_put(build(_whole(shape)))
        else:
            target = NamedSharding(mesh, PartitionSpec()) if path == ("score",) else _get(shardings, path)
            value = jax.make_array_from_callback(shape, target, lambda index: build(_bounds(index, shape)))
        _set(params, path, value)

    for spec in global_tensors(config, score):
        shape = spec.to_flax(np.empty(spec.hf_shape, np.float32)).shape
        put(spec.path, shape, lambda index, spec=spec: spec.read_flax(tensors, spec.hf_name, index))
    for spec in layer_tensors(config):
        layer_shape = spec.to_flax(np.empty(spec.hf_shape, np.float32)).shape
        if quantizer is not None:
            def layer(i, spec=spec, whole=_whole(layer_shape)):
                return spec.read_flax(tensors, spec.hf_name.format(i=i), whole)

            quantized = quantizer("/".join(("layers",) + spec.path), layer, config.n_layers)
            if quantized is not None:
                _set(params, ("layers",) + spec.path, quantized)
                continue

        def build_layers(index, spec=spec):
            return np.stack([spec.read_flax(tensors, spec.hf_name.format(i=i), index[1:])
                             for i in range(index[0].start, index[0].stop)])

        put(("layers",) + spec.path, (config.n_layers,) + layer_shape, build_layers)
    return params


def save_hf(config: ModelConfig, params: Mapping[str, Any], directory: str, *, score_head: Mapping | None = None,
            pad_token_id: int | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None,
            source: Mapping[str, Any] | None = None, max_shard_bytes: int = 2**31) -> dict[str, Any]:
    """Writes `params` as a transformers-loadable float32 model directory: config.json (`hf_config_dict`), a causal
    LM's generation_config.json (`generation_config_dict`: the bos / eos / pad ids of its config.json, when it has
    any) and model.safetensors, or model-0000i-of-0000n.safetensors files of at most `max_shard_bytes` each (a
    single larger tensor gets a file of its own) with model.safetensors.index.json. Adapter parameters are not
    written; merge or drop them first. Returns the config.json dict.

    `source` (`hf_config.source_fields` of the HF config.json or GGUF file the model came from, kept in run metadata
    under `hf_config.SOURCE_FIELD`) keeps its architecture class, special ids and window spelling; the id arguments
    fill in the ids it does not state. With `score_head` ({"kernel": [D], "bias": []}, a reward model's head on the
    backbone `params`) the directory is a `*ForSequenceClassification` model. Give it `pad_token_id`: HF scores the
    last token that is not pad."""
    if config.adapter_placement != "none":
        raise errors.ConfigError("save_hf writes base models only; the config has adapters (adapter_placement).")
    score = score_head is not None
    ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    hf_config = hf_config_dict(config, score=score, source=source, ids=ids)
    if score:
        params = {**{k: v for k, v in params.items() if k != "lm_head"}, "score": score_head["kernel"]}
        bias = float(np.asarray(score_head["bias"]))
        if bias:
            hf_config[SCORE_BIAS_FIELD] = bias
    state = params_to_hf_state_dict(config, params, score=score)
    if hf_config.get("attention_bias"):  # a Llama with q/k/v biases has an o_proj bias too; flaxalign's is zero
        state.update({f"model.layers.{i}.self_attn.o_proj.bias": np.zeros(config.d_model, np.float32)
                      for i in range(config.n_layers)})
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    generation = None if score else generation_config_dict(hf_config)  # a reward model does not generate
    generation_file = os.path.join(directory, GENERATION_CONFIG)
    if generation is not None and any(generation[key] is not None for key in ID_FIELDS):
        with open(generation_file, "w") as f:
            json.dump(generation, f, indent=2)
    elif os.path.exists(generation_file):  # an earlier export's
        os.remove(generation_file)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in state.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    for stale in (SINGLE_FILE, INDEX_FILE):  # a previous save with other sharding must not shadow this one
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0])
        return hf_config
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard)
        weight_map.update({tensor: name for tensor in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return hf_config

"""`flaxalign convert --from=SOURCE --to=DIR --format=hf|peft|checkpoint`.

SOURCE is a flaxalign run directory (`checkpoint:DIR` or just DIR), an HF model directory (`hf:DIR`, or a directory
with config.json and no checkpoints/) or a GGUF file (`gguf:FILE`, or a path ending in .gguf).

    hf          a transformers model directory (config.json, safetensors, tokenizer): a run's policy with its LoRA
                merged, a reward run as `*ForSequenceClassification`, or pretrained weights re-saved (GGUF → HF)
    peft        a LoRA run's adapter as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    checkpoint  a flaxalign run directory holding pretrained weights, for `init_from=checkpoint:DIR`, `generate`
                and `eval` (its tokenizer is written next to the checkpoints)
"""

import json
import os
import shutil

import jax

from flaxalign import errors, models, sharding, weights
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.interop import hf, pretrained
from flaxalign.policy import UNUSED_BY_SCALAR
from flaxalign.train import checkpoint

FORMATS = ("hf", "peft", "checkpoint")
TOKENIZER_DIR = "tokenizer"  # inside a converted checkpoint's run directory


GENERATION_CONFIG = "generation_config.json"


def convert(spec: str, destination: str, fmt: str, *, overwrite: bool = False) -> str:
    """Converts `spec` into `destination` in format `fmt`; returns a one-line description of what was written. A
    destination that already holds files is refused unless `overwrite` (files of the same names are then
    replaced, others left), so an export never lands silently on top of another."""
    if fmt not in FORMATS:
        raise errors.ConfigError(f"--format={fmt!r} is not one of {list(FORMATS)}.")
    if os.path.exists(destination) and not os.path.isdir(destination):
        raise errors.ConfigError(f"--to={destination} is a file; convert writes a directory.")
    if os.path.isdir(destination) and os.listdir(destination) and not overwrite:
        raise errors.ConfigError(f"--to={destination} is not empty; choose a new directory or pass --overwrite to "
                                 "write into it.")
    if fmt == "checkpoint" and os.path.exists(os.path.join(destination, "checkpoints")):
        raise errors.ConfigError(f"--to={destination} already holds a run's checkpoints; --overwrite replaces "
                                 "files, not runs: choose a new directory.")
    source = weights.source_of(spec)
    meta = weights.metadata(source)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    if fmt == "peft":
        return _to_peft(source, meta, destination, mesh)
    if pretrained.is_pretrained(source) and fmt == "checkpoint":
        return _to_checkpoint(source, meta, destination, mesh)
    if fmt == "checkpoint":
        raise errors.ConfigError(f"{spec} is already a flaxalign run; use it as checkpoint:{spec}.")
    return _to_hf(source, meta, destination, mesh)


def _weights(source: str, meta: dict, mesh):
    """(model config, LM params or reward backbone, reward head or None) of a source."""
    model_config = models.ModelConfig.from_dict(meta["model"])
    if meta.get("stage") == "reward":
        abstract, logical, load = weights.reward_model(source, model_config)
        with jax.set_mesh(mesh):
            loaded = load(sharding.tree_shardings(logical, abstract, mesh))
        return model_config, loaded["model"], loaded["head"]
    if pretrained.is_pretrained(source):
        _, abstract, logical = models.abstract_model(model_config)
        return model_config, pretrained.initializer(source)(sharding.tree_shardings(logical, abstract, mesh)), None
    with jax.set_mesh(mesh):
        model_config, params = weights.run_weights(source, mesh)
    return model_config, params, None


def _to_hf(source: str, meta: dict, destination: str, mesh) -> str:
    model_config, params, head = _weights(source, meta, mesh)
    tokenizer = load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    ids = {}
    if tokenizer is not None:  # a reward model's pad marks where HF scores; an LM's ids are for generate()
        ids = {"pad_token_id": tokenizer.pad_id} if head is not None else {
            "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    hf.save_hf(model_config, jax.device_get(params), destination, score_head=jax.device_get(head), **ids)
    written = _export_tokenizer(tokenizer, destination)
    stale = os.path.join(destination, GENERATION_CONFIG)
    if os.path.exists(stale):  # an earlier export's (with --overwrite); a reward model gets none
        os.remove(stale)
    generation = ""
    if tokenizer is not None and head is None:
        _write_generation_ids(tokenizer, destination)
        generation = f" and {GENERATION_CONFIG}"
    kind = "a *ForSequenceClassification reward model" if head is not None else "a causal LM"
    return (f"wrote {kind} to {destination}" + (f" with its tokenizer ({', '.join(written)})" if written else "")
            + generation)


def _to_checkpoint(source: str, meta: dict, destination: str, mesh) -> str:
    model_config, params, head = _weights(source, meta, mesh)
    state = {"params": {"model": params, "head": head} if head is not None else params, "frozen": {}}
    tokenizer = load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    tokenizer_dir = os.path.abspath(os.path.join(destination, TOKENIZER_DIR))
    written = _export_tokenizer(tokenizer, tokenizer_dir, model_config.vocab_size)
    run_meta = {"stage": meta["stage"], "model": model_config.to_dict(), "init_from": meta["source"],
                "tokenizer": (os.path.join(tokenizer_dir, written[0]) if written else "")}
    saver = checkpoint.Checkpointer(os.path.join(destination, "checkpoints"), async_save=False)
    saver.save(0, state, {}, run_meta)
    saver.close()
    return f"wrote a flaxalign checkpoint ({meta['stage']}) of {meta['source']} to {destination}"


def _to_peft(source: str, meta: dict, destination: str, mesh) -> str:
    from flaxalign.interop import peft

    if pretrained.is_pretrained(source) or not meta.get("lora"):
        raise errors.ConfigError(f"{source} is not a LoRA run; --format=peft exports a run trained with lora.rank > 0.")
    drop = UNUSED_BY_SCALAR if meta.get("stage") == "reward" else ()
    with jax.set_mesh(mesh):
        model, trained, _ = weights.run_parts(source, mesh, drop=drop)
    model_config, lora_config = model.config, model.lora
    if trained["saved"]:
        raise errors.ConfigError(f"{source} also trains modules_to_save {list(lora_config.modules_to_save)}; a PEFT "
                                 "export would lose them — use --format=hf (merged) instead.")
    peft.save_peft_adapter(destination, model_config, lora_config, jax.device_get(trained["lora"]))
    return f"wrote a PEFT adapter (rank {lora_config.rank}, {lora_config.variant}) to {destination}"


def _write_generation_ids(tokenizer, directory: str) -> None:
    """A generation_config.json with bos / pad and an eos list that holds the end-of-turn tokens
    (`chat.end_of_turn_ids`), so that transformers' `generate()` stops at the end of the assistant's turn (the
    ids themselves are in config.json: `hf.save_hf`)."""
    from flaxalign.data.chat import end_of_turn_ids

    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    stops = end_of_turn_ids(tokenizer)
    generation = {**ids, "eos_token_id": stops[0] if len(stops) == 1 else stops, "_from_model_config": False}
    with open(os.path.join(directory, GENERATION_CONFIG), "w") as f:
        json.dump(generation, f, indent=2)


def _export_tokenizer(tokenizer, directory: str, model_vocab_size: int | None = None) -> list[str]:
    """Writes the tokenizer into `directory`; returns the file names (first: the one `load_tokenizer` reads)."""
    if tokenizer is None:
        return []
    os.makedirs(directory, exist_ok=True)
    if tokenizer.model_path.endswith(".model"):  # SentencePiece
        shutil.copy(tokenizer.model_path, os.path.join(directory, "tokenizer.model"))
        return ["tokenizer.model"]
    files = [os.path.basename(f) for f in tokenizer.save_pretrained(directory)]
    if model_vocab_size is not None and not os.path.exists(os.path.join(directory, "config.json")):
        # the pad rule of `HFTokenizer` reads the model's vocab_size next to tokenizer.json
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"vocab_size": model_vocab_size}, f)
    return files

"""`flaxalign convert --from=SOURCE --to=DIR --format=hf|peft|checkpoint`, `--to=FILE.gguf --format=gguf`.

SOURCE is a flaxalign run directory (`checkpoint:DIR` or just DIR), an HF model directory (`hf:DIR`, or a directory
with config.json and no checkpoints/) or a GGUF file (`gguf:FILE`, or a path ending in .gguf).

    hf          a transformers model directory (config.json, safetensors, tokenizer): a run's policy with its LoRA
                merged, a reward run as `*ForSequenceClassification`, or pretrained weights re-saved (GGUF → HF)
    peft        a LoRA run's adapter as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    checkpoint  a flaxalign run directory holding pretrained weights, for `init_from=checkpoint:DIR`, `generate`
                and `eval` (its tokenizer is written next to the checkpoints)
    gguf        one llama.cpp GGUF file (--to ends in .gguf): a run's policy with its LoRA merged, or pretrained
                weights, with the tokenizer and chat template, matrices as --gguf_type (`interop.gguf_export`)
"""

import json
import os
import shutil

import jax

from flaxalign import errors, models, sharding, weights
from flaxalign.data.tokenizer import load_tokenizer
from flaxalign.interop import hf, pretrained
from flaxalign.train import checkpoint

FORMATS = ("hf", "peft", "checkpoint", "gguf")
TOKENIZER_DIR = "tokenizer"  # inside a converted checkpoint's run directory


GENERATION_CONFIG = hf.GENERATION_CONFIG


def convert(spec: str, destination: str, fmt: str, *, overwrite: bool = False, merge_parent: bool = False,
            gguf_type: str | None = None) -> str:
    """Converts `spec` into `destination` in format `fmt`; returns a one-line description of what was written. A
    destination that already holds files is refused unless `overwrite` (files of the same names are then
    replaced, others left), so an export never lands silently on top of another. `gguf_type` is the type of a
    GGUF file's weight matrices (None: `gguf_export.DEFAULT_GGUF_TYPE`)."""
    if fmt not in FORMATS:
        raise errors.ConfigError(f"--format={fmt!r} is not one of {list(FORMATS)}.")
    if gguf_type is not None and fmt != "gguf":
        raise errors.ConfigError("--gguf_type applies to --format=gguf only.")
    if merge_parent and fmt != "peft":
        raise errors.ConfigError("--merge_parent applies to --format=peft only.")
    if fmt == "gguf":
        return _to_gguf(spec, destination, overwrite, gguf_type)
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
        return _to_peft(source, meta, destination, mesh, merge_parent)
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
    # the HF class, ids and window spelling of the HF / GGUF model the run started from (none: decided by the config)
    hf_config = hf.save_hf(model_config, jax.device_get(params), destination, score_head=jax.device_get(head),
                           source=meta.get(hf.SOURCE_FIELD), **ids)
    written = _export_tokenizer(tokenizer, destination, chat_template=meta.get("chat_template", ""))
    if tokenizer is not None and head is None:
        _write_generation_ids(tokenizer, destination, hf_config)
    kind = "a *ForSequenceClassification reward model" if head is not None else "a causal LM"
    return (f"wrote {kind} to {destination} ({hf_config['architectures'][0]})"
            + (f" with its tokenizer ({', '.join(written)})" if written else "")
            + (f" and {GENERATION_CONFIG}" if head is None else ""))


def _to_gguf(spec: str, destination: str, overwrite: bool, gguf_type: str | None) -> str:
    """A causal LM — a run's policy (LoRA merged, as for --format=hf), HF or GGUF weights — as one llama.cpp GGUF
    file with its tokenizer and chat template: the run's recorded template as Jinja (`chat.JINJA`), else the
    tokenizer's own. Everything GGUF cannot hold is refused before the weights are read."""
    from flaxalign.data.chat import JINJA
    from flaxalign.interop import gguf_export

    gguf_type = gguf_type or gguf_export.DEFAULT_GGUF_TYPE
    gguf_export.check_gguf_type(gguf_type)
    if not destination.endswith(".gguf"):
        raise errors.ConfigError(f"--to={destination} must name a file ending in .gguf for --format=gguf.")
    if os.path.isdir(destination):
        raise errors.ConfigError(f"--to={destination} is a directory; --format=gguf writes one .gguf file.")
    if os.path.exists(destination) and not overwrite:
        raise errors.ConfigError(f"--to={destination} already exists; choose a new file name or pass --overwrite to "
                                 "replace it.")
    source = weights.source_of(spec)
    meta = weights.metadata(source)
    if meta.get("stage") == "reward":
        raise errors.ConfigError(f"{spec} is a reward model, and a GGUF file holds a causal LM (llama.cpp has no score "
                                 "head); use --format=hf (a *ForSequenceClassification model) instead.")
    model_config = models.ModelConfig.from_dict(meta["model"])
    gguf_export.check_exportable(model_config)
    tokenizer = load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    vocab = gguf_export.gguf_vocab(tokenizer, model_config.vocab_size) if tokenizer is not None else None
    template_name = meta.get("chat_template", "")
    template = JINJA.get(template_name) or gguf_export.own_chat_template(tokenizer)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_config, params, _ = _weights(source, meta, mesh)
    name = os.path.basename(os.path.normpath(weights.directory_of(source))).removesuffix(".gguf")
    exported = gguf_export.export_gguf(destination, model_config, params, vocab=vocab, chat_template=template,
                                       gguf_type=gguf_type, name=name)
    what = (f"wrote a {gguf_export.gguf_architecture(model_config)} GGUF file ({gguf_type}, {exported.tensors} "
            f"tensors, {exported.size / 2**20:.1f} MiB) to {destination}")
    if vocab is None:
        what += " without a tokenizer (the source has none; llama.cpp needs one to run the file)"
    else:
        kind = f"the {template_name} chat template" if template_name in JINJA else \
            "the tokenizer's chat template" if template else "no chat template"
        what += f" with its tokenizer ({len(vocab.tokens)} tokens, pre-tokenizer {vocab.pre}) and {kind}"
    if exported.fallbacks:
        what += (f"; {len(exported.fallbacks)} matrices whose rows are not whole {gguf_type} blocks are F16 "
                 f"(e.g. {exported.fallbacks[0]})")
    return what


def _to_checkpoint(source: str, meta: dict, destination: str, mesh) -> str:
    model_config, params, head = _weights(source, meta, mesh)
    state = {"params": {"model": params, "head": head} if head is not None else params, "frozen": {}}
    tokenizer = load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    tokenizer_dir = os.path.abspath(os.path.join(destination, TOKENIZER_DIR))
    written = _export_tokenizer(tokenizer, tokenizer_dir, model_config.vocab_size)
    run_meta = {"stage": meta["stage"], "model": model_config.to_dict(), "init_from": meta["source"],
                "tokenizer": (os.path.join(tokenizer_dir, written[0]) if written else ""),
                "chat_template": meta.get("chat_template", ""), hf.SOURCE_FIELD: meta.get(hf.SOURCE_FIELD)}
    saver = checkpoint.Checkpointer(os.path.join(destination, "checkpoints"), async_save=False)
    saver.save(0, state, {}, run_meta)
    saver.close()
    return f"wrote a flaxalign checkpoint ({meta['stage']}) of {meta['source']} to {destination}"


def _to_peft(source: str, meta: dict, destination: str, mesh, merge_parent: bool) -> str:
    """A LoRA run's adapter as a PEFT directory naming (and pinning by digest) the base it applies to: the run's
    `init_from`. When that is itself a LoRA run, the adapter applies to its merged weights; `merge_parent` sums the
    chain's adapters into one on the first base instead (`lora.concatenate_adapters`)."""
    from flaxalign.interop import peft
    from flaxalign.peft import lora

    model, lora_params, frozen = _lora_adapter(source, meta, mesh)
    base, chain, quantized = _parent(meta), [(model.lora, lora_params)], model.quant is not None
    if merge_parent:
        if not _is_lora_run(base):
            raise errors.ConfigError(f"--merge_parent: {source} was trained on {base or 'random weights'}, not on a "
                                     "LoRA run; its adapter already applies to that base.")
        while _is_lora_run(base):
            parent_meta = weights.metadata(base)
            parent, parent_lora, frozen = _lora_adapter(base, parent_meta, mesh)
            chain.append((parent.lora, parent_lora))
            quantized = quantized or parent.quant is not None
            base = _parent(parent_meta)
        _, abstract, _ = models.abstract_model(model.config)
        lora_config, lora_params = lora.concatenate_adapters(abstract, chain)
    else:
        lora_config = model.lora
    name = os.path.abspath(weights.directory_of(base)) if base else ""
    peft.save_peft_adapter(destination, model.config, lora_config, lora_params, base_model_name_or_path=name,
                           base_weights_digest=_base_digest(frozen, base, quantized, mesh))
    if meta.get("tokenizer"):  # with the template it trained with, as TRL saves an adapter's tokenizer beside it
        _export_tokenizer(load_tokenizer(meta["tokenizer"]), destination, chat_template=meta.get("chat_template", ""))
    what = f"wrote a PEFT adapter (rank {lora_config.rank}, {lora_config.variant}) to {destination}"
    if len(chain) > 1:
        return (f"{what}: {len(chain)} chained LoRA runs summed into one adapter on {name or 'random weights'}"
                + (" (a run in the chain had a quantized base, so on the float base it is approximate, as for any "
                   "QLoRA adapter)" if quantized else ""))
    if _is_lora_run(base):
        return (f"{what}: it applies to the merged weights of the LoRA run {base} (`convert --from={base} "
                "--format=hf` exports them), or re-export with --merge_parent for one adapter on the original base")
    if base and not pretrained.is_pretrained(base):
        return f"{what}: it applies to the weights of the run {base} (`convert --from={base} --format=hf` exports them)"
    return f"{what} for base {name or 'none (trained from random weights)'}"


def _base_digest(frozen, base: str, quantized: bool, mesh) -> str:
    """`peft.base_digest` of the weights an adapter applies to: the frozen base the (first) run of the chain saved —
    its bfloat16 rounding is the digest's own — or, for a quantized base, the source it was quantized from ("" when
    that is gone, or for random weights)."""
    from flaxalign.interop import peft

    if not quantized:
        return peft.base_digest(frozen)
    if not base or not os.path.exists(weights.directory_of(base)):
        return ""
    with jax.set_mesh(mesh):
        return peft.base_digest(jax.device_get(_weights(base, weights.metadata(base), mesh)[1]))


def _lora_adapter(source: str, meta: dict, mesh) -> tuple:
    """(the run's model, its host LoRA params, its frozen base on the device) of a LoRA run; the base is read to the
    host leaf by leaf only when it is digested."""
    if pretrained.is_pretrained(source) or not meta.get("lora"):
        raise errors.ConfigError(f"{source} is not a LoRA run; --format=peft exports a run trained with lora.rank > 0.")
    if meta.get("stage") == "reward":
        raise errors.ConfigError(f"{source} is a reward model: a PEFT adapter would lose its score head — use "
                                 "--format=hf (a *ForSequenceClassification model) instead.")
    with jax.set_mesh(mesh):
        model, trained, frozen = weights.run_parts(source, mesh)
    if trained["saved"]:
        raise errors.ConfigError(f"{source} also trains modules_to_save {list(model.lora.modules_to_save)}; a PEFT "
                                 "export would lose them — use --format=hf (merged) instead.")
    if model.config.adapter_placement != "none":
        raise errors.ConfigError(f"{source} also trains bottleneck adapters, which PEFT's LoRA format cannot hold; "
                                 "use --format=hf (merged) instead.")
    return model, jax.device_get(trained["lora"]), frozen


def _parent(meta: dict) -> str:
    """The source a run started from (its `init_from`), "" for random weights."""
    return weights.parse_source(meta["init_from"]) if meta.get("init_from") else ""


def _is_lora_run(source: str) -> bool:
    return bool(source) and not pretrained.is_pretrained(source) and bool(weights.metadata(source).get("lora"))


def _write_generation_ids(tokenizer, directory: str, hf_config: dict | None = None) -> None:
    """A generation_config.json with the bos / pad / eos ids of `hf_config` (the exported config.json; default: the
    tokenizer's) and an eos list that also holds the end-of-turn tokens (`chat.end_of_turn_ids`), so that
    transformers' `generate()` stops at the end of the assistant's turn (`hf.generation_config_dict`)."""
    from flaxalign.data.chat import end_of_turn_ids

    ids = hf_config or {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                        "pad_token_id": tokenizer.pad_id}
    with open(os.path.join(directory, GENERATION_CONFIG), "w") as f:
        json.dump(hf.generation_config_dict(ids, end_of_turn_ids(tokenizer)), f, indent=2)


def _export_tokenizer(tokenizer, directory: str, model_vocab_size: int | None = None, *,
                      chat_template: str = "") -> list[str]:
    """Writes the tokenizer into `directory`; returns the file names (first: the one `load_tokenizer` reads).
    `chat_template` names the template the run trained with: its Jinja (`chat.JINJA`) goes into
    tokenizer_config.json, so that `apply_chat_template` gives the prompts training saw ("" keeps the tokenizer's
    own, e.g. a GGUF file's)."""
    from flaxalign.data.chat import JINJA

    if tokenizer is None:
        return []
    os.makedirs(directory, exist_ok=True)
    if tokenizer.model_path.endswith(".model"):  # SentencePiece: no tokenizer_config.json to carry a template
        shutil.copy(tokenizer.model_path, os.path.join(directory, "tokenizer.model"))
        return ["tokenizer.model"]
    files = [os.path.basename(f) for f in tokenizer.save_pretrained(directory, JINJA.get(chat_template))]
    if model_vocab_size is not None and not os.path.exists(os.path.join(directory, "config.json")):
        # the pad rule of `HFTokenizer` reads the model's vocab_size next to tokenizer.json
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"vocab_size": model_vocab_size}, f)
    return files
